"""``mlxman generate`` and ``mlxman embed`` end to end on the demo kit's real models."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlxman.demo import DemoKit
from mlxman.demo.kit import DEMO_PROMPT
from tests.helpers import run_cli, run_subprocess
from tests.server_models import long_prompt


def generate_json(kit: DemoKit, *args: str) -> list[dict[str, object]]:
    result = run_cli("generate", "--model", str(kit.model), "--prompt", DEMO_PROMPT, "--json", *args)
    assert result.exit_code == 0, result.stderr
    return list(json.loads(result.stdout))


@pytest.mark.parametrize("name", ["colors", "numbers", "animals"])
def test_each_adapter_answers_as_trained(demo_kit: DemoKit, name: str) -> None:
    result = run_cli(
        "generate",
        "--model",
        str(demo_kit.model),
        "--adapter",
        str(demo_kit.adapters[name]),
        "--prompt",
        DEMO_PROMPT,
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip().startswith(demo_kit.answers[name])
    assert "tok/s" in result.stderr  # stats go to stderr, never into the data


def test_several_adapters_share_one_base_load(demo_kit: DemoKit) -> None:
    names = ["colors", "numbers", "animals"]
    args = [a for n in names for a in ("--adapter", str(demo_kit.adapters[n]))]
    answers = generate_json(demo_kit, "--adapter", "none", *args)
    assert [a["adapter"] for a in answers] == [None, *(str(demo_kit.adapters[n]) for n in names)]
    assert [a["base_was_resident"] for a in answers] == [False, True, True, True]
    for answer, name in zip(answers[1:], names, strict=False):
        assert str(answer["text"]).startswith(demo_kit.answers[name])
    assert not str(answers[0]["text"]).startswith(tuple(demo_kit.answers.values()))


def test_json_schema(demo_kit: DemoKit) -> None:
    (answer,) = generate_json(demo_kit, "--adapter", str(demo_kit.adapters["colors"]))
    types = {
        "model": str,
        "key": str,
        "kind": str,
        "text": str,
        "finish_reason": str,
        "prompt_tokens": int,
        "generation_tokens": int,
        "prompt_tps": float,
        "generation_tps": float,
        "time_to_first_token": float,
        "load_seconds": float,
        "swap_seconds": float,
        "base_was_resident": bool,
        "peak_memory_bytes": int,
    }
    for field, kind in types.items():
        assert isinstance(answer[field], kind), field
    assert answer["kind"] == "text"
    assert str(answer["key"]).endswith("::" + str(demo_kit.adapters["colors"].resolve()))
    assert answer["finish_reason"] in ("stop", "length")


def test_prompt_from_stdin(demo_kit: DemoKit) -> None:
    result = run_cli(
        "generate",
        "--model",
        str(demo_kit.model),
        "--adapter",
        str(demo_kit.adapters["numbers"]),
        input=DEMO_PROMPT,
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip().startswith(demo_kit.answers["numbers"])


def test_raw_skips_the_chat_template(demo_kit: DemoKit) -> None:
    (templated,) = generate_json(demo_kit, "--max-tokens", "4")
    (raw,) = generate_json(demo_kit, "--max-tokens", "4", "--raw")
    assert int(str(raw["prompt_tokens"])) < int(str(templated["prompt_tokens"]))


def test_system_message_changes_the_prompt(demo_kit: DemoKit) -> None:
    (plain,) = generate_json(demo_kit, "--max-tokens", "2")
    (with_system,) = generate_json(demo_kit, "--max-tokens", "2", "--system", "Be brief.")
    assert int(str(with_system["prompt_tokens"])) > int(str(plain["prompt_tokens"]))


def test_seed_makes_sampling_reproducible(endless_model: Path) -> None:
    def sample(seed: str) -> str:
        args = (
            "--model",
            str(endless_model),
            "--prompt",
            "red",
            "--temp",
            "1.5",
            "--max-tokens",
            "24",
            "--json",
        )
        result = run_cli("generate", *args, "--seed", seed)
        assert result.exit_code == 0, result.stderr
        return str(json.loads(result.stdout)[0]["text"])

    first = sample("7")
    assert first and first == sample("7")
    assert first != sample("8")


def test_embed_shape_and_unit_norm(demo_kit: DemoKit) -> None:
    result = run_cli(
        "embed", "--model", str(demo_kit.embeddings_model), "--json", "a red cat", "two blue dogs"
    )
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    vectors = [d["embedding"] for d in data["data"]]
    assert len(vectors) == 2 and len(vectors[0]) == data["dimensions"] > 0
    for v in vectors:
        assert math.isclose(math.sqrt(sum(x * x for x in v)), 1.0, rel_tol=1e-4)
    assert vectors[0] != vectors[1]


def test_embed_from_stdin_table(demo_kit: DemoKit) -> None:
    result = run_cli("embed", "--model", str(demo_kit.embeddings_model), input="first line\nsecond line\n")
    assert result.exit_code == 0, result.stderr
    assert "NORM" in result.stdout and "1.0000" in result.stdout


def assert_clean_error(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("Error:") or "\nError:" in proc.stderr
    for needle in needles:
        assert needle in proc.stderr


def test_missing_model_path(tmp_path: Path) -> None:
    proc = run_subprocess("generate", "--model", str(tmp_path / "nope"), "--prompt", "hi")
    assert_clean_error(proc, 1, "does not exist")


def test_uncached_hub_id() -> None:
    proc = run_subprocess("generate", "--model", "no-such-org/no-such-model", "--prompt", "hi")
    assert_clean_error(proc, 1, "mlxman pull no-such-org/no-such-model")


def test_adapter_failing_validation_shows_findings(demo_kit: DemoKit, tmp_path: Path) -> None:
    bad = tmp_path / "bad-adapter"
    bad.mkdir()
    config = json.loads((demo_kit.adapters["colors"] / "adapter_config.json").read_text())
    config["lora_parameters"]["rank"] = 3  # the tensors were trained with another rank
    (bad / "adapter_config.json").write_text(json.dumps(config))
    (bad / "adapters.safetensors").write_bytes(
        (demo_kit.adapters["colors"] / "adapters.safetensors").read_bytes()
    )
    proc = run_subprocess("generate", "--model", str(demo_kit.model), "--adapter", str(bad), "--prompt", "hi")
    assert_clean_error(proc, 1, "rank", "Next: see `mlxman adapter validate")
    # Every problem is listed, even when one of them (an unknown fine-tune type) is found first.
    config["fine_tune_type"] = "lorax"
    (bad / "adapter_config.json").write_text(json.dumps(config))
    proc = run_subprocess("generate", "--model", str(demo_kit.model), "--adapter", str(bad), "--prompt", "hi")
    assert_clean_error(proc, 1, "lorax", "declares lora_parameters.rank 3")


def test_model_over_budget_gives_numbers(demo_kit: DemoKit) -> None:
    proc = run_subprocess(
        "generate", "--model", str(demo_kit.model), "--prompt", "hi", "--memory-limit", "64KiB"
    )
    assert_clean_error(proc, 1, "64.0 KiB")


def test_embeddings_model_is_refused(demo_kit: DemoKit) -> None:
    proc = run_subprocess("generate", "--model", str(demo_kit.embeddings_model), "--prompt", "hi")
    assert_clean_error(proc, 2, "mlxman embed")


def test_image_on_text_model_is_refused(demo_kit: DemoKit, tmp_path: Path) -> None:
    proc = run_subprocess(
        "generate", "--model", str(demo_kit.model), "--prompt", "hi", "--image", str(tmp_path)
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [(("--max-tokens", "0"), "max_tokens"), (("--temp", "-1"), "temperature"), (("--top-p", "0"), "top_p")],
)
def test_bad_sampling_settings(demo_kit: DemoKit, args: tuple[str, str], needle: str) -> None:
    proc = run_subprocess("generate", "--model", str(demo_kit.model), "--prompt", "hi", *args)
    assert_clean_error(proc, 2, needle)


def test_a_prompt_over_the_context_is_a_clear_error(demo_kit: DemoKit) -> None:
    prompt = long_prompt(2000)  # about 10,000 tokens
    proc = run_subprocess(
        "generate", "--model", str(demo_kit.model), "--prompt", prompt, "--max-tokens", "16"
    )
    assert_clean_error(proc, 2, "max_tokens is 16", "over the context of", "--context-length")
    assert re.search(r"The prompt has \d+ tokens", proc.stderr)
    assert "Token indices" not in proc.stderr  # the tokenizer's own warning would come before the error


def test_ctrl_c_stops_cleanly(endless_model: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlxman",
            "generate",
            "--model",
            str(endless_model),
            "--prompt",
            "red",
            "--max-tokens",
            "2000",  # within the model's 2048-token context
            "--temp",
            "1.0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )
    assert proc.stdout is not None
    first = proc.stdout.read(1)  # wait until tokens stream
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert (first + rest).strip()
    assert "Traceback" not in err and "Interrupted" in err


def test_vision_model_with_an_image(demo_kit: DemoKit, tmp_path: Path) -> None:
    pytest.importorskip("mlx_vlm")
    from PIL import Image

    red, blue = tmp_path / "red.png", tmp_path / "blue.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(red)
    Image.new("RGB", (32, 32), (0, 0, 255)).save(blue)

    def describe(image: Path) -> dict[str, object]:
        result = run_cli(
            "generate", "--model", str(demo_kit.vision_model), "--prompt", "What is this?",
            "--image", str(image), "--max-tokens", "8", "--json",
        )  # fmt: skip
        assert result.exit_code == 0, result.stderr
        return dict(json.loads(result.stdout)[0])

    on_red, on_blue = describe(red), describe(blue)
    assert on_red["kind"] == "vision" and on_red["text"]
    assert on_red["text"] != on_blue["text"]  # the image reaches the model
    assert int(str(on_red["prompt_tokens"])) > 8  # image tokens are part of the prompt


def test_missing_image_is_a_clear_error(demo_kit: DemoKit, tmp_path: Path) -> None:
    pytest.importorskip("mlx_vlm")
    proc = run_subprocess(
        "generate",
        "--model",
        str(demo_kit.vision_model),
        "--prompt",
        "hi",
        "--image",
        str(tmp_path / "no.png"),
    )
    assert_clean_error(proc, 1, "no.png")


def test_embed_refuses_a_text_model(demo_kit: DemoKit) -> None:
    proc = run_subprocess("embed", "--model", str(demo_kit.model), "hello")
    assert_clean_error(proc, 2, "is a text model, not an embeddings model", "mlxman generate")
