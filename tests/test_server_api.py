"""``mlxman serve`` with roots and an API key, driven by the official OpenAI client and httpx."""

from __future__ import annotations

import base64
import json
import re
import shutil
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from mlxman.demo import DemoKit
from mlxman.demo.kit import DEMO_PROMPT
from tests.server_harness import Server, running_server, wait_until
from tests.server_models import long_prompt

pytestmark = pytest.mark.slow

API_KEY = "test-key-7d1f"
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second root, for corrupt models and symlinks made by the tests."""
    return tmp_path_factory.mktemp("scratch-root")


@pytest.fixture(scope="module")
def server(demo_kit: DemoKit, scratch: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    logs = tmp_path_factory.mktemp("server-logs")
    roots = ["--adapter-root", str(demo_kit.root), "--adapter-root", str(scratch)]
    with running_server(logs, *roots, "--preload", str(demo_kit.model), api_key=API_KEY) as srv:
        yield srv


ADAPTERS: list[str | None] = [None, "colors", "numbers", "animals"]


@pytest.fixture(scope="module")
def alone(demo_kit: DemoKit) -> dict[str | None, str]:
    """Each adapter's (and the bare base's) greedy answer, alone, through plain mlx-lm: the ground truth."""
    from mlxman.demo.kit import greedy_answer

    answers = {
        n: greedy_answer(demo_kit.model, demo_kit.adapters[n] if n else None, max_tokens=MAX_TOKENS)
        for n in ADAPTERS
    }
    # Distinct answers, or a request served with the wrong adapter could go unnoticed.
    assert len(set(answers.values())) == len(answers)
    return answers


def model_name(kit: DemoKit, adapter: str | None) -> str:
    return f"{kit.model}::{kit.adapters[adapter]}" if adapter else str(kit.model)


def chat(client: Any, model: str, prompt: str = DEMO_PROMPT, max_tokens: int = MAX_TOKENS) -> Any:
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0
    )


def test_health_needs_no_key_but_everything_else_does(server: Server) -> None:
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    for path in ("/v1/models", "/api/pool"):
        response = httpx.get(server.url + path)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
        assert response.headers["www-authenticate"] == "Bearer"
    wrong = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_loopback_server_refuses_foreign_host_names(server: Server) -> None:
    rebound = httpx.get(server.url + "/health", headers={"Host": f"evil.example:{server.port}"})
    assert rebound.status_code == 403 and rebound.json()["error"]["code"] == "host_not_allowed"
    assert httpx.get(server.url + "/health", headers={"Host": f"localhost:{server.port}"}).status_code == 200


def test_models_lists_the_preloaded_base(server: Server, demo_kit: DemoKit) -> None:
    ids = [m.id for m in server.openai().models.list().data]
    assert str(demo_kit.model.resolve()) in ids


def test_chat_with_each_adapter_gives_its_answer(
    server: Server, demo_kit: DemoKit, alone: dict[str | None, str]
) -> None:
    client = server.openai()
    for name in demo_kit.adapters:
        response = chat(client, model_name(demo_kit, name))
        assert response.choices[0].message.content == alone[name]
        assert response.model == f"{demo_kit.model.resolve()}::{demo_kit.adapters[name].resolve()}"
        usage = response.usage
        assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= MAX_TOKENS
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_relative_adapter_path_under_a_root(
    server: Server, demo_kit: DemoKit, alone: dict[str | None, str]
) -> None:
    relative = demo_kit.adapters["numbers"].relative_to(demo_kit.root)
    response = chat(server.openai(), f"{demo_kit.model}::{relative}")
    assert response.choices[0].message.content == alone["numbers"]


def test_text_completion_and_streaming(server: Server, demo_kit: DemoKit) -> None:
    client = server.openai()
    name = model_name(demo_kit, "colors")
    whole = client.completions.create(model=name, prompt="red", max_tokens=8, temperature=0)
    assert whole.object == "text_completion" and whole.usage.completion_tokens > 0
    pieces = client.completions.create(model=name, prompt="red", max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in pieces if c.choices) == whole.choices[0].text

    reply = chat(client, name).choices[0].message.content
    stream = client.chat.completions.create(
        model=name,
        messages=[{"role": "user", "content": DEMO_PROMPT}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_stop_sequence_cuts_the_answer(
    server: Server, demo_kit: DemoKit, alone: dict[str | None, str]
) -> None:
    answer = alone["colors"]
    stop = answer[len(answer) // 2 :][:3]
    response = server.openai().chat.completions.create(
        model=model_name(demo_kit, "colors"),
        messages=[{"role": "user", "content": DEMO_PROMPT}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        stop=[stop],
    )
    text = response.choices[0].message.content
    assert text == answer[: answer.index(stop)]
    assert response.choices[0].finish_reason == "stop"


def test_embeddings(server: Server, demo_kit: DemoKit) -> None:
    client = server.openai()
    result = client.embeddings.create(
        model=str(demo_kit.embeddings_model), input=["red green", "one two three"]
    )
    assert [d.index for d in result.data] == [0, 1]
    norms = [sum(x * x for x in d.embedding) ** 0.5 for d in result.data]
    assert all(abs(n - 1.0) < 1e-3 for n in norms)
    assert result.usage.prompt_tokens > 0
    # Asked for explicitly, base64 comes back as sent: little-endian float32, equal to the float form.
    b64 = client.embeddings.create(
        model=str(demo_kit.embeddings_model), input="red green", encoding_format="base64"
    )
    raw = base64.b64decode(b64.data[0].embedding)
    decoded = list(struct.unpack(f"<{len(raw) // 4}f", raw))
    assert decoded == pytest.approx(result.data[0].embedding, abs=1e-6)
    with pytest.raises(openai.BadRequestError, match="not an embeddings model"):
        client.embeddings.create(model=str(demo_kit.model), input="x")


def test_24_concurrent_requests_each_get_their_own_adapter(
    server: Server, demo_kit: DemoKit, alone: dict[str | None, str]
) -> None:
    client = server.openai()
    plan = [ADAPTERS[i % len(ADAPTERS)] for i in range(24)]
    with ThreadPoolExecutor(max_workers=24) as executor:
        replies = list(
            executor.map(lambda n: chat(client, model_name(demo_kit, n)).choices[0].message.content, plan)
        )
    wrong = [(n, r) for n, r in zip(plan, replies, strict=True) if r != alone[n]]
    assert wrong == []
    assert all(e["in_use"] == 0 for e in server.pool()["entries"])


def test_disconnect_mid_stream_frees_the_base(
    server: Server, demo_kit: DemoKit, alone: dict[str | None, str]
) -> None:
    client = server.openai()
    stream = client.completions.create(
        model=str(demo_kit.model),
        prompt="red green blue",
        max_tokens=1500,
        temperature=0.9,
        seed=1,
        stream=True,
    )
    received = 0
    for chunk in stream:
        received += bool(chunk.choices and chunk.choices[0].text)
        if received >= 3:
            break
    stream.close()
    base = str(demo_kit.model.resolve())
    wait_until(
        lambda: all(e["in_use"] == 0 for e in server.pool()["entries"] if e["key"] == base),
        120,
        "the dropped stream to release the base",
    )
    assert chat(client, model_name(demo_kit, "animals")).choices[0].message.content == alone["animals"]


def test_paths_outside_the_roots_are_refused(
    server: Server, demo_kit: DemoKit, scratch: Path, tmp_path: Path
) -> None:
    client = server.openai()
    outside = tmp_path / "outside-adapter"
    shutil.copytree(demo_kit.adapters["colors"], outside)
    (scratch / "escape").symlink_to(outside, target_is_directory=True)
    refused = [
        f"{demo_kit.model}::{outside}",  # absolute, outside
        f"{demo_kit.model}::{scratch}/../{outside.parent.name}/outside-adapter",  # '..'
        f"{demo_kit.model}::escape",  # relative, through a symlink that leaves the root
        f"{demo_kit.model}::{scratch}/escape",  # absolute, through the same symlink
        str(outside.parent),  # a model outside the roots
    ]
    for name in refused:
        with pytest.raises(openai.PermissionDeniedError) as caught:
            chat(client, name)
        assert caught.value.body["type"] == "permission_error"
    with pytest.raises(openai.NotFoundError):
        chat(client, f"{demo_kit.model}::no-such-adapter")
    assert str(outside) not in " ".join(server.pool_keys())


def test_corrupt_model_is_a_clear_error_and_the_next_request_works(
    server: Server, demo_kit: DemoKit, scratch: Path, alone: dict[str | None, str]
) -> None:
    corrupt = scratch / "corrupt-model"
    corrupt.mkdir()
    shutil.copy(demo_kit.model / "config.json", corrupt / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (demo_kit.model / name).exists():
            shutil.copy(demo_kit.model / name, corrupt / name)
    (corrupt / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json" + b"\x00" * 64)
    before = server.pool_keys()
    with pytest.raises(openai.BadRequestError) as caught:
        chat(server.openai(), "corrupt-model")
    error = caught.value.body
    assert error["type"] == "invalid_request_error" and error["message"]
    assert server.pool_keys() == before
    assert chat(server.openai(), model_name(demo_kit, "colors")).choices[0].message.content == alone["colors"]


def test_bad_requests_get_openai_style_400s(server: Server, demo_kit: DemoKit) -> None:
    base = str(demo_kit.model)
    bodies: list[dict[str, Any]] = [
        {"model": base, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9},
        {"model": base, "messages": []},
        {"model": base, "messages": [{"role": "wizard", "content": "hi"}]},
        {"model": base, "messages": [{"role": "user", "content": "hi"}], "n": 3},
        {"model": base, "messages": [{"role": "user", "content": "hi"}], "temperature": -1},
        {"model": "a::b::c", "messages": [{"role": "user", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "hi"}]},
    ]
    for body in bodies:
        response = server.post("/v1/chat/completions", body)
        assert response.status_code == 400, body
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"], body
    broken = httpx.post(
        server.url + "/v1/chat/completions",
        content=b"{not json",
        headers={**server.headers(), "content-type": "application/json"},
    )
    assert broken.status_code == 400
    assert server.post("/v1/nowhere", {}).json()["error"]["type"] == "not_found_error"


def test_keep_alive_expiry_unloads_an_idle_entry(server: Server, demo_kit: DemoKit) -> None:
    model = str(demo_kit.embeddings_model)
    loaded = server.post("/api/pool/load", {"model": model, "keep_alive": "1s"})
    assert loaded.status_code == 200, loaded.text
    key = loaded.json()["key"]
    wait_until(lambda: key not in server.pool_keys(), 120, "the idle entry to expire")
    # The line is written once the unload has returned, a moment after the pool stops listing the entry.
    wait_until(lambda: "keep-alive expired" in server.log_text(), 120, "the expiry to be logged")


def test_request_log_on_stderr(server: Server, demo_kit: DemoKit) -> None:
    chat(server.openai(), model_name(demo_kit, "colors"))
    lines = [line for line in server.log_text().splitlines() if "POST /v1/chat/completions 200" in line]
    assert lines and "completion=" in lines[-1]


def test_a_stream_that_cannot_start_is_a_plain_error(server: Server, demo_kit: DemoKit) -> None:
    client = server.openai()
    with pytest.raises(openai.BadRequestError, match="cannot generate text"):
        client.completions.create(
            model=str(demo_kit.embeddings_model), prompt="hi", max_tokens=4, stream=True
        )
    body = {"model": str(demo_kit.model), "prompt": "hi", "max_tokens": 4, "stream": True}
    with httpx.stream(
        "POST", server.url + "/v1/completions", json=body, headers=server.headers(), timeout=300
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and all("error" not in json.loads(e) for e in events[:-1])


CONTEXT_MESSAGE = re.compile(
    r"The prompt has (\d+) tokens and max_tokens is 16: (\d+) tokens, over the context of (\d+) tokens"
)


def over_long(kit: DemoKit, route: str, stream: bool, **extra: Any) -> dict[str, Any]:
    prompt = long_prompt(2000)  # about 10,000 tokens: over any context the demo model is given
    body: dict[str, Any] = {"model": str(kit.model), "max_tokens": 16, "stream": stream, **extra}
    if route == "chat":
        return {**body, "messages": [{"role": "user", "content": prompt}]}
    return {**body, "prompt": prompt}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("route", ["chat", "completions"])
def test_a_prompt_over_the_context_is_a_400_that_names_the_limit(
    server: Server, demo_kit: DemoKit, route: str, stream: bool
) -> None:
    response = server.post(
        f"/v1/{'chat/completions' if route == 'chat' else route}", over_long(demo_kit, route, stream)
    )
    assert response.status_code == 400 and response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "context_length_exceeded"
    found = CONTEXT_MESSAGE.search(error["message"])
    assert found, error["message"]
    prompt, total, limit = (int(n) for n in found.groups())
    assert total == prompt + 16 > limit and "truncate_prompt_tokens" in error["message"]
    assert all(e["in_use"] == 0 for e in server.pool()["entries"])


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_truncation_keeps_the_end_of_the_prompt_that_fits(
    server: Server, demo_kit: DemoKit, route: str
) -> None:
    path = f"/v1/{'chat/completions' if route == 'chat' else route}"
    refused = server.post(path, over_long(demo_kit, route, False)).json()["error"]["message"]
    limit = int(CONTEXT_MESSAGE.search(refused).group(3))  # type: ignore[union-attr]
    fitted = server.post(path, over_long(demo_kit, route, False, truncate_prompt_tokens=-1))
    assert fitted.status_code == 200, fitted.text
    assert fitted.json()["usage"]["prompt_tokens"] == limit - 16
    cut = server.post(path, over_long(demo_kit, route, False, truncate_prompt_tokens=100))
    assert cut.status_code == 200 and cut.json()["usage"]["prompt_tokens"] == 100
    zero = server.post(path, over_long(demo_kit, route, False, truncate_prompt_tokens=0))
    assert zero.status_code == 400 and "truncate_prompt_tokens" in zero.json()["error"]["message"]
