"""Sharded runs: hostfiles, the checks ranks agree on, and 2 real ranks on loopback via mlx.launch (CPU)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from mlxman.demo import DemoKit
from mlxman.distributed.checks import RankShare, share_problems, version_problem
from mlxman.distributed.hostfile import parse_hostfile, read_hostfile
from mlxman.errors import UsageError
from tests.server_harness import running_server, wait_until

MLXMAN = [sys.executable, "-m", "mlxman"]
LOOPBACK = {"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}
# A hang detector, not a timing assertion: every run here ends in seconds.
RUN_LIMIT = 240


@pytest.fixture
def hosts(tmp_path: Path) -> Path:
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps({"backend": "ring", "hosts": [LOOPBACK, LOOPBACK]}))
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MLXMAN, *args],
        capture_output=True,
        text=True,
        timeout=RUN_LIMIT,
        env=_env(),
        stdin=subprocess.DEVNULL,
    )


def _answers(*args: str) -> list[dict[str, Any]]:
    done = _run("generate", *args, "--json")
    assert done.returncode == 0, done.stderr
    answers: list[dict[str, Any]] = json.loads(done.stdout)
    return answers


# --- hostfiles ---------------------------------------------------------------------------------------------


def test_hostfile_in_both_forms_mlx_writes(tmp_path: Path) -> None:
    listed = parse_hostfile([LOOPBACK, {"ssh": "mac2", "ips": ["10.0.0.2"]}], tmp_path / "h.json")
    assert [h.ssh for h in listed.hosts] == ["127.0.0.1", "mac2"] and listed.backend == "ring"
    assert not listed.all_local and listed.hosts[0].is_local
    doc = {
        "backend": "jaccl",
        "envs": ["MLX_METAL_FAST_SYNCH=1"],
        "hosts": [
            {"ssh": "m1", "ips": ["10.0.0.1"], "rdma": [None, "rdma_en2"]},
            {"ssh": "m2", "ips": ["10.0.0.2"], "rdma": ["rdma_en2", None], "memory_limit": "48GB"},
        ],
    }
    jaccl = parse_hostfile(doc, tmp_path / "h.json")
    assert jaccl.backend == "jaccl" and jaccl.envs == ("MLX_METAL_FAST_SYNCH=1",)
    assert jaccl.hosts[1].memory_limit == "48GB"
    # The flag wins over the file's backend; JACCL's RDMA devices are then not needed for the ring.
    assert parse_hostfile(doc, tmp_path / "h.json", backend="ring").backend == "ring"


def test_malformed_hostfile_lists_every_problem(tmp_path: Path) -> None:
    doc = {
        "hosts": [
            {"ssh": "", "ips": ["not-an-ip"]},
            {"ips": []},
            "mac3",
            {"ssh": "m4", "memory_limit": "lots"},
        ]
    }
    with pytest.raises(UsageError) as caught:
        parse_hostfile(doc, tmp_path / "h.json")
    message = caught.value.message
    for part in (
        "hosts[0] has no 'ssh'",
        "'not-an-ip', which is not an IP",
        "hosts[1] has no 'ssh'",
        "hosts[2] is a JSON string",
        "hosts[3].memory_limit",
        "needs 'ips' for every host",
    ):
        assert part in message
    with pytest.raises(UsageError, match="it holds a JSON null, not a list of hosts"):
        parse_hostfile(None, tmp_path / "h.json")
    with pytest.raises(UsageError, match="at least 2"):
        parse_hostfile([LOOPBACK], tmp_path / "h.json")
    with pytest.raises(UsageError, match="JACCL needs one per host"):
        parse_hostfile([LOOPBACK, LOOPBACK], tmp_path / "h.json", backend="jaccl")
    with pytest.raises(UsageError, match="not supported"):
        parse_hostfile([LOOPBACK, LOOPBACK], tmp_path / "h.json", backend="mpi")


def test_hostfile_that_is_missing_or_not_json(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="missing"):
        read_hostfile(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{hosts: ")
    with pytest.raises(UsageError, match="not valid JSON"):
        read_hostfile(bad)


def test_bad_hostfile_on_the_command_line_is_one_error_line(demo_kit: DemoKit, tmp_path: Path) -> None:
    bad = tmp_path / "hosts.json"
    bad.write_text(json.dumps({"hosts": [{"ssh": "127.0.0.1"}, {"ssh": "127.0.0.1"}]}))
    done = _run("generate", "--hosts", str(bad), "-m", str(demo_kit.model), "-p", "hi")
    assert done.returncode == 2
    assert done.stderr.startswith("Error: Hostfile") and "Traceback" not in done.stderr
    assert "needs 'ips'" in done.stderr


@pytest.mark.skipif(shutil.which("ssh") is None, reason="no ssh client on this machine")
def test_unreachable_host_is_named_before_anything_starts(demo_kit: DemoKit, tmp_path: Path) -> None:
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps([LOOPBACK, {"ssh": "no-such-host.invalid", "ips": ["192.0.2.1"]}]))
    done = _run("generate", "--hosts", str(path), "-m", str(demo_kit.model), "-p", "hi")
    assert done.returncode == 1, done.stderr
    assert "rank 1 (no-such-host.invalid) cannot be reached by SSH" in done.stderr
    assert "Traceback" not in done.stderr


# --- checks every rank agrees on (plain numbers) -----------------------------------------------------------


def test_versions_must_match_on_every_rank() -> None:
    same = "mlxman 0.1.0, mlx 0.32.4, mlx-lm 0.32.2"
    assert version_problem([same, same], ["a", "b"]) is None
    problem = version_problem([same, "mlxman 0.2.0, mlx 0.32.4, mlx-lm 0.32.2", same], ["a", "b", "c"])
    assert problem is not None
    assert "rank 1 (b) has mlxman 0.2.0" in problem and "rank 0 (a) has mlxman 0.1.0" in problem
    assert "rank 2" not in problem


def test_each_share_is_checked_against_its_own_machine() -> None:
    mib = 1024**2
    shares = [
        RankShare(0, "mac1", 300 * mib, 100 * mib, 0, budget_bytes=512 * mib, available_bytes=2048 * mib),
        RankShare(
            1, "mac2", 300 * mib, 100 * mib, 10 * mib, budget_bytes=256 * mib, available_bytes=2048 * mib
        ),
        RankShare(2, "mac3", 300 * mib, 100 * mib, 0, budget_bytes=2048 * mib, available_bytes=64 * mib),
    ]
    problems = share_problems(shares)
    assert len(problems) == 2
    assert problems[0].startswith("rank 1 (mac2) needs 410.0 MiB") and "budget is 256.0 MiB" in problems[0]
    assert problems[1].startswith("rank 2 (mac3)") and "only 64.0 MiB is available" in problems[1]


# --- 2 ranks on loopback -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_process(demo_kit: DemoKit, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """What one process answers to the tests' prompt, per adapter ("none": the base), in one run."""
    names = ["none", *(str(demo_kit.adapters[n]) for n in ("colors", "numbers", "animals"))]
    args = ["generate", "-m", str(demo_kit.model), "-p", "hello", "--max-tokens", "16", "--json"]
    for a in names:
        args += ["-a", a]
    env = {**_env(), "MLXMAN_HOME": str(tmp_path_factory.mktemp("one-process-home"))}
    done = subprocess.run([*MLXMAN, *args], capture_output=True, text=True, timeout=RUN_LIMIT, env=env)
    assert done.returncode == 0, done.stderr
    return {name: a["text"] for name, a in zip(names, json.loads(done.stdout), strict=True)}


@pytest.mark.parametrize("shard", ["pipeline", "tensor"])
def test_sharded_greedy_tokens_equal_one_process_with_adapter_swaps(
    demo_kit: DemoKit, hosts: Path, shard: str, one_process: dict[str, str]
) -> None:
    adapters = ["none", str(demo_kit.adapters["colors"]), str(demo_kit.adapters["numbers"])]
    if shard == "pipeline":
        adapters.append(str(demo_kit.adapters["animals"]))  # DoRA: whole blocks per rank take it
    args = [
        "--hosts",
        str(hosts),
        "--shard",
        shard,
        "-m",
        str(demo_kit.model),
        "-p",
        "hello",
        "--max-tokens",
        "16",
    ]
    for a in adapters:
        args += ["-a", a]
    sharded = _answers(*args)
    assert [a["text"] for a in sharded] == [one_process[a] for a in adapters]
    assert [a["swap"] for a in sharded][:3] == [
        "none",
        "structural",
        "weights",
    ]  # numbers fills colors' wrappers
    assert all(a["base_was_resident"] for a in sharded[1:])
    for answer in sharded:
        ranks = answer["ranks"]
        assert [r["rank"] for r in ranks] == [0, 1]
        for row in ranks:
            # The share estimated from shapes before any weight was read is what MLX holds after reading.
            assert row["weights_bytes"] == row["weights_measured_bytes"] > 0
            assert row["active_bytes"] >= row["weights_bytes"]
    # Each rank wears only its part of the adapter. Pipeline stages split it by blocks, so the parts add up to
    # it; tensor shards split one of A and B of each linear and repeat the other (rank-sized) one.
    parts = [r["adapter_bytes"] for r in sharded[1]["ranks"]]
    whole = _adapter_bytes(demo_kit.adapters["colors"])
    if shard == "pipeline":
        assert sum(parts) == whole
    else:
        assert all(0 < part < whole for part in parts) and sum(parts) > whole


def _adapter_bytes(path: Path) -> int:
    from mlxman.safetensors_header import read_header

    return read_header(path / "adapters.safetensors").data_bytes


def test_dora_is_refused_under_tensor_parallelism_before_loading(demo_kit: DemoKit, hosts: Path) -> None:
    done = _run(
        "generate",
        "--hosts",
        str(hosts),
        "--shard",
        "tensor",
        "-m",
        str(demo_kit.model),
        "-a",
        str(demo_kit.adapters["animals"]),
        "-p",
        "hi",
    )
    assert done.returncode == 1
    assert "is DoRA, which cannot be split over tensor-parallel ranks" in done.stderr
    assert "--shard pipeline" in done.stderr and "Loaded" not in done.stderr


def test_a_share_over_the_budget_is_refused_naming_rank_and_host(demo_kit: DemoKit, hosts: Path) -> None:
    done = _run(
        "generate",
        "--hosts",
        str(hosts),
        "-m",
        str(demo_kit.model),
        "-p",
        "hi",
        "--memory-limit",
        "600KiB",
    )
    assert done.returncode == 1, done.stderr
    assert "rank 0 (127.0.0.1) needs" in done.stderr and "rank 1 (127.0.0.1) needs" in done.stderr
    assert "budget is 600.0 KiB" in done.stderr and "Loaded" not in done.stderr


def test_a_rank_killed_mid_generation_ends_the_run_with_a_clear_error(
    endless_model: Path, hosts: Path
) -> None:
    proc = _generating_endlessly(endless_model, hosts)
    try:
        ranks = _rank_processes(proc.pid)
        victims = [p for p in ranks if p.environ().get("MLX_RANK") == "1"]
        assert len(ranks) == 2 and len(victims) == 1
        victims[0].send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=RUN_LIMIT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    assert (
        err.decode()
        .strip()
        .splitlines()[-1]
        .startswith("Error: Rank 1 (127.0.0.1) was killed by signal 9 while generating")
    )
    # Rank 0 did not stay behind.
    assert not [p for p in ranks if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


# --- serve --hosts -----------------------------------------------------------------------------------------


def test_serve_hosts_answers_with_adapters_and_survives_a_killed_rank(
    demo_kit: DemoKit, endless_model: Path, hosts: Path, tmp_path: Path, one_process: dict[str, str]
) -> None:
    base, colors = str(demo_kit.model), str(demo_kit.adapters["colors"])
    endless = str(endless_model)
    with running_server(
        tmp_path,
        "--hosts",
        str(hosts),
        "--preload",
        base,
        "--preload",
        f"{base}::{colors}",
    ) as server:
        health = server.get("/health").json()
        assert health["status"] == "ok" and [r["rank"] for r in health["ranks"]] == [0, 1]
        assert all(r["weights_bytes"] == r["measured_bytes"] for r in health["ranks"])
        ids = {m.id for m in server.openai().models.list().data}
        assert ids == {base, f"{base}::{colors}"}
        chat = server.openai().chat.completions.create(
            model=f"{base}::colors", messages=[{"role": "user", "content": "hello"}], max_tokens=16
        )
        assert chat.choices[0].message.content == one_process[colors]
        streamed = server.openai().chat.completions.create(
            model=base, messages=[{"role": "user", "content": "hello"}], max_tokens=16, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == one_process["none"]
        # `pool status` and `status` show a row per rank: host, weights, KV, adapter, MLX active memory.
        for command in (["pool", "status"], ["status"]):
            shown = _run(*command, "--host", server.host)
            assert shown.returncode == 0, shown.stderr
            rows = [line.split() for line in shown.stdout.splitlines() if " 127.0.0.1 " in line]
            assert [r[:2] for r in rows] == [["0", "127.0.0.1"], ["1", "127.0.0.1"]]
            assert "RANK" in shown.stdout and "MLX ACTIVE" in shown.stdout
        missing = server.post("/v1/completions", {"model": f"{base}::nope", "prompt": "hi"})
        assert missing.status_code == 404 and "was not loaded" in missing.json()["error"]["message"]

    with running_server(tmp_path, "--hosts", str(hosts), "--preload", endless) as server:
        # A client that leaves a stream cancels its request on every rank: the ranks are free for the next.
        body = {"model": endless, "prompt": "hi", "max_tokens": 3000, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=RUN_LIMIT) as stream:
            chunks = 0
            for line in stream.iter_lines():
                chunks += line.startswith("data:")
                if chunks == 3:
                    break
        after = server.post("/v1/completions", {"model": endless, "prompt": "hi", "max_tokens": 2})
        assert after.status_code == 200
        assert re.search(r"cmpl-\w+: \d+ tokens, cancelled", server.log_text())
        ranks = [
            p
            for p in psutil.Process(server.process.pid).children(recursive=True)
            if p.cmdline()[1:3] == ["-m", "mlxman.distributed.rank"]
        ]
        answers: dict[str, Any] = {}

        def long_request() -> None:
            answers["long"] = server.post(
                "/v1/completions", {"model": endless, "prompt": "hi", "max_tokens": 3000}
            )

        worker = threading.Thread(target=long_request)
        worker.start()
        wait_for = [p for p in ranks if p.environ().get("MLX_RANK") == "1"]
        assert len(ranks) == 2 and len(wait_for) == 1
        time.sleep(1.0)  # well into the request (thousands of tokens), whatever the machine's speed
        wait_for[0].send_signal(signal.SIGKILL)
        worker.join(RUN_LIMIT)
        failed = answers["long"]
        assert failed.status_code == 503
        assert failed.json()["error"]["message"].startswith("Rank 1 (127.0.0.1) was killed by signal 9")
        # The server still answers: it says why the ranks are down, and the next request starts them again.
        health = server.get("/health").json()
        assert health["status"] == "down" and "Rank 1 (127.0.0.1)" in health["error"]
        again = server.post("/v1/completions", {"model": endless, "prompt": "hi", "max_tokens": 4})
        assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 4
        assert server.get("/health").json()["status"] == "ok"


# --- logits: the split LoRA math itself --------------------------------------------------------------------

RANK_SCRIPT = """
import sys
import mlx.core as mx
import numpy as np
from pathlib import Path
from mlxman.distributed.adapters import swap_sharded
from mlxman.distributed.sharding import load_lazy, materialize, shard_model
from mlxman.pool.swap import read_adapter

model_dir, adapter_dir, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
group = mx.distributed.init(strict=True)
tokens = mx.array([[1, 5, 9, 22, 40, 7, 3]])
for mode in ("pipeline", "tensor"):
    model, _ = load_lazy(model_dir)
    plan = shard_model(model, group, mode)
    materialize(model)
    swap_sharded(model, None, read_adapter(adapter_dir), plan)
    logits = model(tokens)
    mx.eval(logits)
    if group.rank() == 0:
        np.save(out / f"{mode}.npy", np.array(logits[0]))
"""


def test_sharded_logits_with_an_adapter_match_one_process(demo_kit: DemoKit, tmp_path: Path) -> None:
    import mlx.core as mx
    import numpy as np
    from mlx_lm import load

    from mlxman.distributed.launch import _free_port, mlx_launch_path

    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    colors = demo_kit.adapters["colors"]
    cmd = [mlx_launch_path(), "--backend", "ring", "--hosts", "127.0.0.1", "-n", "2"]
    cmd += ["--starting-port", str(_free_port(2)), "--python", sys.executable]
    cmd += [str(script), str(demo_kit.model), str(colors), str(tmp_path)]
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=RUN_LIMIT, env=_env(), stdin=subprocess.PIPE
    )
    assert done.returncode == 0, done.stderr
    model, _ = load(str(demo_kit.model), adapter_path=str(colors))
    want = np.array(model(mx.array([[1, 5, 9, 22, 40, 7, 3]]))[0])
    # Pipeline stages run the same operations in the same order; tensor shards sum partial products.
    assert np.array_equal(np.load(tmp_path / "pipeline.npy"), want)
    np.testing.assert_allclose(np.load(tmp_path / "tensor.npy"), want, rtol=0, atol=1e-4)
    # The adapter moves the logits far more than that tolerance: it was applied, on every split linear.
    base, _ = load(str(demo_kit.model))
    assert np.abs(np.array(base(mx.array([[1, 5, 9, 22, 40, 7, 3]]))[0]) - want).max() > 0.1


def test_ranks_that_do_not_join_in_time_end_the_run(demo_kit: DemoKit, hosts: Path) -> None:
    done = _run(
        "generate", "--hosts", str(hosts), "-m", str(demo_kit.model), "-p", "hi", "--rank-timeout", "0.05"
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: ") and "within 0.05 s" in last


VERSION_SCRIPT = """
import os
import mlxman
from mlxman.distributed import rank

# Rank 1 stands for a machine where another mlxman is installed.
if os.environ.get("MLX_RANK") == "1":
    mlxman.__version__ = "0.0.1-other"
rank.main()
"""


def test_ranks_with_different_mlxman_versions_stop_with_both_named(demo_kit: DemoKit, tmp_path: Path) -> None:
    import mlxman
    from mlxman.distributed import protocol
    from mlxman.distributed.launch import _free_port, mlx_launch_path

    script = tmp_path / "rank.py"
    script.write_text(VERSION_SCRIPT)
    spec = {
        "hosts": ["127.0.0.1", "127.0.0.1"],
        "host_limits": [None, None],
        "backend": "ring",
        "model": str(demo_kit.model),
        "adapters": [None],
        "mode": "pipeline",
        "context_tokens": 256,
        "memory_limit": None,
    }
    cmd = [mlx_launch_path(), "--backend", "ring", "--hosts", "127.0.0.1", "-n", "2"]
    cmd += ["--starting-port", str(_free_port(2)), "--python", sys.executable, str(script)]
    cmd.append(protocol.encode_spec(spec))
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=RUN_LIMIT, env=_env(), stdin=subprocess.PIPE
    )
    events = [e for line in done.stdout.splitlines() if (e := protocol.parse_event(line))]
    errors = [e for e in events if e["event"] == protocol.ERROR]
    assert len(errors) == 1 and errors[0]["rank"] == 0  # rank 0 reports what every rank found
    message = errors[0]["message"]
    assert (
        "rank 1 (127.0.0.1) has mlxman 0.0.1-other" in message
        and f"rank 0 (127.0.0.1) has mlxman {mlxman.__version__}" in message
    )
    assert not [e for e in events if e["event"] in (protocol.SHARES, protocol.LOADED)]  # nothing was loaded


@pytest.fixture(scope="module")
def four_bit_model(demo_kit: DemoKit, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model in 4 bits, groups of 32 (each rank's half of a 64-wide input is one group or more)."""
    import contextlib
    import io

    from mlx_lm.convert import convert

    out = tmp_path_factory.mktemp("four-bit") / "model"
    with contextlib.redirect_stdout(io.StringIO()):
        convert(str(demo_kit.model), str(out), quantize=True, q_bits=4, q_group_size=32)
    return out


def test_tensor_parallel_lora_on_a_quantized_base(
    demo_kit: DemoKit, hosts: Path, four_bit_model: Path
) -> None:
    colors = str(demo_kit.adapters["colors"])
    common = ["-m", str(four_bit_model), "-a", "none", "-a", colors, "-p", "hello", "--max-tokens", "16"]
    one = [a["text"] for a in _answers(*common)]
    sharded = _answers("--hosts", str(hosts), "--shard", "tensor", *common)
    assert [a["text"] for a in sharded] == one
    assert one[1] != one[0]  # the adapter changes the answer on the 4-bit base too


@pytest.fixture(scope="module")
def qwen2_model(demo_kit: DemoKit, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny qwen2 (mlx-lm's own pipeline stages) with 3 blocks, and a LoRA on its last 2 blocks only."""

    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import qwen2

    root = tmp_path_factory.mktemp("qwen2")
    model_dir, adapter_dir = root / "model", root / "adapter"
    model_dir.mkdir()
    adapter_dir.mkdir()
    config = json.loads((demo_kit.model / "config.json").read_text())
    config.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"], num_hidden_layers=3)
    mx.random.seed(7)
    weights = dict(tree_flatten(qwen2.Model(qwen2.ModelArgs.from_dict(config)).parameters()))
    weights["lm_head.weight"] = weights["lm_head.weight"] * 8  # random heads are near flat otherwise
    mx.save_safetensors(str(model_dir / "model.safetensors"), weights)
    (model_dir / "config.json").write_text(json.dumps(config))
    for f in demo_kit.model.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, model_dir / f.name)
    hidden, kv = config["hidden_size"], config["num_key_value_heads"] * 16
    shapes = {
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.v_proj": (hidden, kv),
        "mlp.down_proj": (128, hidden),
    }
    lora = {}
    for layer in (1, 2):
        for name, (d_in, d_out) in shapes.items():
            lora[f"model.layers.{layer}.{name}.lora_a"] = mx.random.normal((d_in, 4)) * 0.2
            lora[f"model.layers.{layer}.{name}.lora_b"] = mx.random.normal((4, d_out)) * 0.2
    mx.save_safetensors(str(adapter_dir / "adapters.safetensors"), lora)
    adapter_config = {
        "fine_tune_type": "lora",
        "num_layers": 2,
        "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0, "keys": list(shapes)},
    }
    (adapter_dir / "adapter_config.json").write_text(json.dumps(adapter_config))
    return model_dir, adapter_dir


def test_mlx_lm_pipeline_model_with_an_adapter_on_its_last_blocks(
    qwen2_model: tuple[Path, Path], hosts: Path
) -> None:
    model, adapter = qwen2_model
    common = ["-m", str(model), "-a", "none", "-a", str(adapter), "-p", "hello", "--max-tokens", "12"]
    sharded = _answers("--hosts", str(hosts), *common)
    one = [a["text"] for a in _answers(*common)]
    assert [a["text"] for a in sharded] == one and one[0] != one[1]
    # 3 blocks: rank 0 runs blocks 1-2 (all of the adapter), rank 1 runs block 0 (none of it).
    held = [r["adapter_bytes"] for r in sharded[1]["ranks"]]
    assert held[0] > 0 and held[1] == 0


# --- hardening: names, stop sequences, clients that leave, shutdown ----------------------------------------


def test_generate_hosts_takes_a_name_for_a_model_with_its_adapter(
    demo_kit: DemoKit, hosts: Path, tmp_path: Path, one_process: dict[str, str]
) -> None:
    colors = str(demo_kit.adapters["colors"])
    env = {**_env(), "MLXMAN_HOME": str(tmp_path / "home")}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*MLXMAN, *args],
            capture_output=True,
            text=True,
            timeout=RUN_LIMIT,
            env=env,
            stdin=subprocess.DEVNULL,
        )

    assert run("alias", "tinycolors", f"{demo_kit.model}::{colors}").returncode == 0
    # A second adapter on a name that already has one is refused before any rank starts, as on one machine.
    both = run("generate", "--hosts", str(hosts), "-m", "tinycolors", "-a", colors + "x", "-p", "hi")
    assert both.returncode != 0 and both.stderr.startswith("Error: ") and "joined" not in both.stderr
    done = run(
        "generate", "--hosts", str(hosts), "-m", "tinycolors", "-p", "hello", "--max-tokens", "16", "--json"
    )
    assert done.returncode == 0, done.stderr
    answers = json.loads(done.stdout)
    assert [(a["adapter"], a["text"]) for a in answers] == [(colors, one_process[colors])]


def _generating_endlessly(model: Path, hosts: Path) -> subprocess.Popen[bytes]:
    """`generate --hosts` on a model that never stops, once its first text is out (both ranks are running)."""
    argv = [*MLXMAN, "generate", "--hosts", str(hosts), "-m", str(model), "-p", "hi", "--max-tokens", "3000"]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=_env()
    )
    assert proc.stdout is not None
    assert proc.stdout.read(1)  # generating
    return proc


def _rank_processes(pid: int) -> list[psutil.Process]:
    return [
        p
        for p in psutil.Process(pid).children(recursive=True)
        if p.cmdline()[1:3] == ["-m", "mlxman.distributed.rank"]
    ]


def test_serve_hosts_stop_sequences_clients_that_leave_and_shutdown(
    endless_model: Path, hosts: Path, tmp_path: Path
) -> None:
    endless = str(endless_model)
    chat = {"model": endless, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 24}
    with running_server(tmp_path, "--hosts", str(hosts), "--preload", endless) as server:
        whole = server.post("/v1/chat/completions", chat).json()["choices"][0]["message"]["content"]
        assert "tiny demo" in whole
        # A stop sequence cuts the text on rank 0 and ends the request on every rank, streamed or not.
        stopped = server.post("/v1/chat/completions", {**chat, "stop": ["demo"]})
        assert stopped.status_code == 200, stopped.text
        choice = stopped.json()["choices"][0]
        assert choice["message"]["content"] == whole[: whole.index("demo")]
        assert choice["finish_reason"] == "stop"
        streamed = server.openai().chat.completions.create(
            model=endless,
            messages=chat["messages"],
            max_tokens=24,
            stop="demo",
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(streamed)
        assert (
            "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            == whole[: whole.index("demo")]
        )
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0

        # A client that leaves a non-streamed request cancels it on every rank too.
        long = {"model": endless, "prompt": "hi", "max_tokens": 3000}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", json=long, timeout=1.5)
        after = server.post("/v1/completions", {"model": endless, "prompt": "hi", "max_tokens": 2})
        assert after.status_code == 200
        assert re.search(r"cmpl-\w+: \d+ tokens, cancelled", server.log_text())
        # One that leaves while another request holds the ranks is dropped when its turn comes.
        streamed_long = {**long, "stream": True}
        with httpx.stream(
            "POST", server.url + "/v1/completions", json=streamed_long, timeout=RUN_LIMIT
        ) as held:
            lines = held.iter_lines()  # kept: a dropped line iterator closes the connection
            next(lines)
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(server.url + "/v1/completions", json=long, timeout=1.0)
            left = lambda: server.log_text().count("the client left") == 2  # noqa: E731
            wait_until(left, RUN_LIMIT, "the server to see the waiting client leave")
        wait_until(
            lambda: "cancelled before it started" in server.log_text(),
            RUN_LIMIT,
            "the waiting one to be dropped",
        )

        # Ctrl-C or SIGTERM while a request runs: that request ends, every rank leaves, the server exits 0.
        ranks = _rank_processes(server.process.pid)
        assert len(ranks) == 2
        answers: dict[str, httpx.Response] = {}
        worker = threading.Thread(
            target=lambda: answers.update(
                long=httpx.post(server.url + "/v1/completions", json=long, timeout=RUN_LIMIT)
            )
        )
        worker.start()
        wait_until(lambda: _generating(server), RUN_LIMIT, "the request to start")
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(timeout=RUN_LIMIT)
        worker.join(RUN_LIMIT)
        assert answers["long"].status_code == 503
        assert "stopping" in answers["long"].json()["error"]["message"]
        assert not [p for p in ranks if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert "Traceback" not in server.log_text()


def _generating(server: Any) -> bool:
    pool = server.get("/api/pool").json()
    return bool(pool["entries"][0]["in_use"])


def test_serve_hosts_checks_its_flags_and_adapters_before_any_rank_starts(
    demo_kit: DemoKit, hosts: Path
) -> None:
    base = str(demo_kit.model)
    missing = _run(
        "serve", "--hosts", str(hosts), "--preload", base, "--preload", f"{base}::/no/such/adapter"
    )
    assert missing.returncode == 1 and missing.stderr.startswith("Error: Adapter path /no/such/adapter")
    assert "weights" not in missing.stderr  # no rank loaded anything
    never = _run("serve", "--hosts", str(hosts), "--preload", base, "--rank-timeout", "0")
    assert never.returncode == 2 and never.stderr.startswith("Error: --rank-timeout must be positive")
    # Two spellings of one folder are one model.
    spelled = _run("serve", "--hosts", str(hosts), "--preload", base + "/", "--preload", f"{base}::/no/such")
    assert "serves one model" not in spelled.stderr and "Adapter path /no/such" in spelled.stderr


def test_ctrl_c_on_generate_hosts_stops_every_rank(endless_model: Path, hosts: Path) -> None:
    proc = _generating_endlessly(endless_model, hosts)
    try:
        ranks = _rank_processes(proc.pid)
        assert len(ranks) == 2
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=RUN_LIMIT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert out.endswith(b"\n") and "Traceback" not in err.decode()
    assert err.decode().strip().splitlines()[-1] == "Error: Interrupted; generation stopped on every rank"
    assert not [p for p in ranks if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
