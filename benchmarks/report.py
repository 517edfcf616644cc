"""Write docs/benchmarks.md and its plots from a run's results: every figure on the page comes from JSON."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PLOTS = "benchmarks"
SWITCH_TARGET = 50.0
# "Independent of base size": switch time may grow at most this much from the smallest base to the largest.
SWITCH_GROWTH_LIMIT = 2.0
MEMORY_TOLERANCE = 0.05
GENERATION_TARGET = 0.98
ESTIMATE_TOLERANCE = 0.01
# "A fraction of mlx-lm's import time": the model-library issue set it at 0.15x.
STARTUP_FRACTION = 0.15


BAD_INPUT_TARGET = (
    "Bad input: every malformed adapter, config or request gives a clear error; no traceback, no hang, "
    "nothing leaked"
)


@dataclass(frozen=True)
class Verdict:
    target: str
    measured: str
    met: bool | None
    why: str


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.2f} ms" if seconds < 0.1 else f"{seconds * 1000:,.0f} ms"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _plot_switch(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fp = [r for r in rows if r["dtype"] == "float16"]
    x = [r["base_bytes"] / 2**20 for r in fp]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot(x, [r["fresh_load_s"] * 1000 for r in fp], "o-", label="fresh mlx_lm.load(base, adapter_path)")
    ax.plot(x, [r["acquire_s"] * 1000 for r in fp], "s-", label="mlxman: switch adapter on resident base")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("base weights (MiB, float16)")
    ax.set_ylabel("time to a ready model+adapter (ms, median)")
    ax.set_title("Adapter switch vs fresh load, by base size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _plot_memory(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    n = [r["adapters"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot(n, [r["copies_bytes"] / 2**20 for r in rows], "o-", label="one full model per model+adapter")
    ax.plot(n, [r["pool_bytes"] / 2**20 for r in rows], "s-", label="mlxman pool: one base, N adapters")
    ax.plot(n, [r["base_plus_adapters_bytes"] / 2**20 for r in rows], "k:", label="base + adapters' own size")
    ax.set_xticks(n)
    ax.set_xlabel("adapters")
    ax.set_ylabel("MLX active memory (MiB)")
    ax.set_title(f"Memory vs adapter count ({result['model']})")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _error(name: str, result: dict[str, Any]) -> str | None:
    return f"Not measured in this run: `{result['error']}`." if "error" in result else None


def switch_section(r: dict[str, Any], docs: Path) -> tuple[str, list[Verdict]]:
    rows = r["rows"]
    _plot_switch(rows, docs / PLOTS / "switch-vs-base-size.png")
    body = table(
        [
            "base",
            "weights",
            "adapter",
            "fresh `mlx_lm.load`",
            "mlxman switch",
            "pool's swap",
            "mode",
            "load / switch",
        ],
        [
            [
                x["model"],
                mib(x["base_bytes"]),
                mib(x["adapter_bytes"]),
                ms(x["fresh_load_s"]),
                ms(x["acquire_s"]),
                ms(x["swap_s"]),
                x["mode"],
                f"**{x['ratio']:.0f}x**",
            ]
            for x in rows
        ],
    )
    layouts = table(
        ["case (largest base)", "mlxman switch", "pool's swap", "mode"],
        [[x["case"], ms(x["acquire_s"]), ms(x["swap_s"]), x["mode"]] for x in r["layouts"]],
    )
    text = f"""## 1. Adapter switch on a resident base vs a fresh load

Time until a model+adapter is ready to generate: `pool.acquire(base, other_adapter)` on a base that stays
resident (both rank-8 LoRA adapters already in the pool; timed from the call until the `with` block
runs), against
`mlx_lm.load(base, adapter_path=...)` followed by evaluating the parameters (mlx-lm reads adapter
tensors lazily;
the first token would wait for them). Medians; adapters cover every linear of every block.

{body}

The same switch on the largest base when the next adapter has another layout:

{layouts}

![switch vs base size]({PLOTS}/switch-vs-base-size.png)
"""
    fp = [x for x in rows if x["dtype"] == "float16"]
    big, small = fp[-1], fp[0]
    growth = big["acquire_s"] / small["acquire_s"]
    base_growth = big["base_bytes"] / small["base_bytes"]
    met = big["ratio"] >= SWITCH_TARGET and growth <= SWITCH_GROWTH_LIMIT
    verdicts = [
        Verdict(
            "Adapter switch at least 50x faster than a fresh `mlx_lm.load(base, adapter_path=...)`, "
            "independent of base size",
            f"{big['ratio']:.0f}x on a {mib(big['base_bytes'])} base; switch time x{growth:.2f} while the "
            f"base grows x{base_growth:.0f}",
            met,
            ("met" if met else "not met")
            + f": need >= {SWITCH_TARGET:.0f}x and switch growth <= x{SWITCH_GROWTH_LIMIT:.0f}. The largest "
            f"base here is {mib(big['base_bytes'])}; fresh-load time grows with the base while the switch "
            "does not, so the ratio grows with size.",
        )
    ]
    return text, verdicts


def memory_section(r: dict[str, Any], docs: Path) -> tuple[str, list[Verdict]]:
    _plot_memory(r, docs / PLOTS / "memory-vs-adapters.png")
    rows = r["rows"]
    body = table(
        [
            "adapters",
            "base + adapters' own",
            "mlxman pool",
            "pool / own",
            "one model per combination",
            "copies / pool",
        ],
        [
            [
                x["adapters"],
                mib(x["base_plus_adapters_bytes"]),
                mib(x["pool_bytes"]),
                f"{x['pool_vs_own']:.4f}",
                mib(x["copies_bytes"]),
                f"**{x['copies_vs_pool']:.2f}x**",
            ]
            for x in rows
        ],
    )
    text = f"""## 2. Memory: N adapters on one base vs one model per combination

MLX active memory (cache cleared) of a pool holding base `{r["model"]}` and N rank-8 LoRA adapters
(one applied),
against N real `mlx_lm.load(base, adapter_path=...)` copies held at once, which is what a copy-per-combination
pool keeps. "Own" is the base's weights plus the adapters' tensors, from their safetensors headers.

{body}

![memory vs adapter count]({PLOTS}/memory-vs-adapters.png)
"""
    eight = rows[-1]
    off = abs(eight["pool_vs_own"] - 1)
    met = off <= MEMORY_TOLERANCE
    verdict = Verdict(
        "Memory for 8 adapters on one base within 5% of base + the adapters' own size",
        f"{eight['pool_vs_own']:.4f}x base + adapters ({off * 100:.2f}% off); copies need "
        f"{eight['copies_vs_pool']:.2f}x the pool",
        met,
        ("met" if met else "not met") + f": tolerance {MEMORY_TOLERANCE:.0%}.",
    )
    return text, [verdict]


def generation_section(r: dict[str, Any], docs: Path) -> tuple[str, list[Verdict]]:
    rows = r["rows"]
    body = table(
        [
            "variant",
            "`mlx_lm.stream_generate`",
            "mlxman (pool + TextGeneration)",
            "ratio",
            "`mlxman generate --json` (in-process)",
            "ratio",
        ],
        [
            [
                x["variant"],
                f"{x['tps']['mlx_lm']:.1f} tok/s",
                f"{x['tps']['mlxman']:.1f} tok/s",
                f"**{x['ratio']:.3f}**",
                f"{x['tps']['mlxman_cli']:.1f} tok/s",
                f"{x['cli_ratio']:.3f}",
            ]
            for x in rows
        ],
    )
    text = f"""## 3. Generation tokens/s: mlxman vs mlx-lm directly

Model `{r["model"]}`, greedy, {r["max_tokens"]} tokens, the same chat-templated prompt on every side. Tokens/s
are generated tokens over the wall time of the generation call (prefill included). mlx-lm's side
loads once and
calls `stream_generate`; mlxman's side is `run_answer` (what `mlxman generate` runs per answer:
pool acquire, then
`TextGeneration`) on a resident model; the CLI column runs the whole `mlxman generate --json`
command in-process
and reads the generation time it reports (model load excluded). Sides run interleaved, each round in a rotated
order; a ratio is the median of the rounds' ratios. "Unmerged" keeps the LoRA wrappers (the pool's swap on the
mlxman side, `load(..., adapter_path=...)` on mlx-lm's); "fused" is `mlxman.adapters.fuse` output
loaded plainly.

{body}
"""
    worst = min(rows, key=lambda x: x["ratio"])
    met = worst["ratio"] >= GENERATION_TARGET
    verdict = Verdict(
        "Generation through mlxman at least 0.98x the tokens/s of mlx-lm directly",
        ", ".join(f"{x['variant']} {x['ratio']:.3f}x" for x in rows)
        + " (CLI: "
        + ", ".join(f"{x['cli_ratio']:.3f}x" for x in rows)
        + ")",
        met,
        ("met" if met else "not met")
        + f": the lowest is {worst['ratio']:.3f}x ({worst['variant']}). Both sides run the same mlx-lm "
        "decode loop, so differences are run-to-run noise on a machine shared with other processes.",
    )
    return text, [verdict]


def estimate_section(r: dict[str, Any], docs: Path) -> tuple[str, list[Verdict]]:
    rows = r["rows"]
    body = table(
        [
            "model",
            "dtype",
            "estimated (headers)",
            "measured active memory",
            "estimate / measured",
            "estimate took",
        ],
        [
            [
                x["model"],
                x["dtype"],
                f"{x['estimated_bytes']:,} B",
                f"{x['measured_bytes']:,} B",
                f"**{x['ratio']:.6f}**",
                ms(x["estimate_seconds"]),
            ]
            for x in rows
        ],
    )
    text = f"""## 4. Estimate before load vs measured active memory

`ModelPool.estimate(model).weights_bytes`, read from the safetensors headers without loading, against the MLX
active-memory delta of `mlx_lm.load(model)` with its parameters evaluated. (The pool also reserves KV-cache
headroom for its context, which is not part of the weights and not in this comparison.)

{body}
"""
    worst = max(rows, key=lambda x: abs(x["ratio"] - 1))
    off = abs(worst["ratio"] - 1)
    met = off <= ESTIMATE_TOLERANCE
    verdict = Verdict(
        "Estimate before load within 1% of the measured active memory for the weights",
        f"worst {worst['ratio']:.6f}x ({worst['model']}) over {len(rows)} models in "
        + ", ".join(sorted({x["dtype"] for x in rows})),
        met,
        ("met" if met else "not met") + f": largest deviation {off * 100:.4f}%.",
    )
    return text, [verdict]


def startup_section(r: dict[str, Any], docs: Path) -> tuple[str, list[Verdict]]:
    rows = r["rows"]
    body = table(
        ["command", "median wall time", f"vs `{r['baseline']}`"],
        [[f"`{x['command']}`", ms(x["seconds"]), f"**{x['ratio']:.2f}x**"] for x in rows],
    )
    text = f"""## 5. CLI start-up vs importing mlx-lm

Each command as a fresh subprocess (the installed `mlxman` script), median wall time, interleaved after one
warm-up each. `ls` lists a model folder with one model and a rank-8 adapter (and an empty Hugging Face
cache); `adapter validate` checks that adapter against its base (`--model`). `python -c 'pass'` is the
interpreter's own floor. Commands are imported only when they run, and none of these four imports mlx-lm,
transformers or pydantic.

{body}
"""
    ours = [x for x in rows if x["command"].startswith("mlxman")]
    worst = max(ours, key=lambda x: x["ratio"])
    met = worst["ratio"] <= STARTUP_FRACTION
    verdict = Verdict(
        "`mlxman --help`, `status`, `ls`, `adapter validate`: each at most "
        f"{STARTUP_FRACTION:.2f}x the time of `python -c 'import mlx_lm'`",
        ", ".join(f"{x['command'].removeprefix('mlxman ')} {x['ratio']:.2f}x" for x in ours)
        + f" of {ms(next(x['seconds'] for x in rows if x['command'] == r['baseline']))}",
        met,
        ("met" if met else "not met") + f": the slowest is {worst['command']} at {worst['ratio']:.2f}x.",
    )
    return text, [verdict]


def _plot_server(load: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    styles = {0: "-", 2: ":", 4: "--", 8: "-."}
    for side, colour, label in (
        ("mlx_lm", "tab:orange", "mlx-lm server"),
        ("mlxman", "tab:blue", "mlxman serve"),
    ):
        for n in sorted({r["adapters"] for r in load}):
            rows = [r for r in load if r["adapters"] == n]
            if len(rows) < 2:
                continue  # a case measured at one client count is in the table, not a line
            ax.plot(
                [r["clients"] for r in rows],
                [r[side]["tps"] for r in rows],
                styles.get(n, "-"),
                color=colour,
                marker="o" if side == "mlxman" else "s",
                label=f"{label}, {rows[0]['case']}",
            )
    ax.set_xscale("log", base=2)
    clients = sorted({r["clients"] for r in load})
    ax.set_xticks(clients, [str(c) for c in clients])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("aggregate tokens/s")
    ax.set_title("Serving under load: mlxman vs mlx-lm's server")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def _ttft(run: dict[str, Any]) -> str:
    return "-" if run["ttft_p50"] is None else f"{_seconds(run['ttft_p50'])} / {_seconds(run['ttft_p95'])}"


def _failed(run: dict[str, Any]) -> str:
    return f" ({len(run['errors'])} failed)" if run["errors"] else ""


def server_section(r: dict[str, Any], docs: Path) -> tuple[str, list[Verdict]]:
    _plot_server(r["load"], docs / PLOTS / "server-throughput.png")
    spec = r["spec"]
    load = table(
        [
            "case",
            "clients",
            "requests",
            "mlx-lm tok/s",
            "mlxman tok/s",
            "mlxman / mlx-lm",
            "TTFT p50 / p95, mlx-lm",
            "TTFT p50 / p95, mlxman",
            "same text",
        ],
        [
            [
                x["case"],
                x["clients"],
                x["mlxman"]["requests"],
                f"{x['mlx_lm']['tps']:.1f}{_failed(x['mlx_lm'])}",
                f"{x['mlxman']['tps']:.1f}{_failed(x['mlxman'])}",
                f"**{x['ratio']:.2f}x**",
                _ttft(x["mlx_lm"]),
                _ttft(x["mlxman"]),
                f"{x['same_text']:.0%}",
            ]
            for x in r["load"]
        ],
    )
    prefix = table(
        [
            "server",
            "clients",
            "prompt tokens (turn 2)",
            "turn 1 TTFT p50",
            "turn 2 TTFT p50 / p95, shared prefix",
            "cached tokens reported",
            "turn 2 TTFT p50 / p95, fresh prefix",
            "shared / fresh",
        ],
        [
            [
                "mlx-lm server" if side == "mlx_lm" else "mlxman serve",
                p["clients"],
                ", ".join(str(t) for t in p[side]["fresh_prefix"]["prompt_tokens"]),
                _seconds(p[side]["first_turn"]["ttft_p50"]),
                _ttft(p[side]["shared_prefix"]),
                ", ".join("-" if c is None else str(c) for c in p[side]["cached_tokens"]) or "-",
                _ttft(p[side]["fresh_prefix"]),
                f"**{p[side]['ratio']:.2f}x**",
            ]
            for p in r["prefix"]
            for side in ("mlx_lm", "mlxman")
        ],
    )
    servers = r["servers"]
    threads = "; ".join(
        f"{name} {servers[key]['before']['threads']} -> {servers[key]['after']['threads']} OS threads (after "
        f"each cell: {', '.join(str(t) for t in servers[key]['threads_by_cell'])}), RSS "
        f"{mib(servers[key]['before']['rss_bytes'])} -> {mib(servers[key]['after']['rss_bytes'])}"
        for key, name in (("mlx_lm", "mlx-lm"), ("mlxman", "mlxman"))
    )
    problems = [
        f"- {name}: `{line.replace('`', chr(39))}`"
        for key, name in (("mlx_lm", "mlx-lm"), ("mlxman", "mlxman"))
        for line in servers[key]["log_problems"]
    ]
    problem_text = (
        "Lines of the servers' logs that report a problem:\n\n" + "\n".join(problems)
        if problems
        else "Neither server logged an error."
    )
    text = f"""## 6. The server under load: `mlxman serve` vs `python -m mlx_lm server`

Both servers run at once, each in its own process, on the same random-weight llama
(`{r["model"]}`: hidden {spec["hidden"]}, {spec["layers"]} blocks, {r["dtype"]}), with their default settings;
mlxman preloads the base and every adapter. Requests go through the official `openai` client, streamed,
greedy, `max_tokens` {r["max_tokens"]}, client *i* sending the *i*-th of 8 short prompts, each behind a fresh
tag so that no prompt cache can skip a prefill (the shared-prefix case below measures that); each cell runs on
one server, then on the other, the order alternating from cell to cell, {r["rounds"]} round(s). Aggregate
tokens/s are all completion tokens over the wall time from releasing the clients together to the last answer;
time to first token (TTFT) is to the first chunk carrying text. Adapters are rank-{r["adapter_rank"]} LoRA on
every linear, spread over the requests (the *k*-th request goes to adapter *k* mod *n*); mlxman names them
`BASE::ADAPTER`, mlx-lm takes `"adapters": PATH` in the body. mlx-lm's server batches only requests for the
model and adapter it has loaded: a request for another adapter makes it finish the running batch, then reload
the whole base with the new adapter from disk. "Same text" is the share of requests whose greedy answer is
identical on both servers. On a CPU, mlxman's engine keeps float32 weights column-major in memory (the same
values; see docs/server.md), which the BLAS in MLX's Linux build multiplies 2.2-2.4x faster than the row-major
layout both servers load: on this model that, not batching, is most of the lead over mlx-lm's server. What
batching across adapters adds on its own is the ratio of mlxman's 4-adapter to its one-base rate (in the
targets).

{load}

![aggregate tokens/s against clients](benchmarks/server-throughput.png)

A long shared system prompt in a two-turn chat, per client: turn 1 under the system prompt, then turn 2
(the first turn's prefix plus the answer and a new question), then the same turn 2 under a system prompt with
a fresh tag in front, which no earlier request shares: the same length, no prefix to reuse. "Shared / fresh"
compares the two turn-2 TTFTs (p50): what a prefix cache saves. mlx-lm's server keeps an LRU prompt cache
(10 entries by default); "cached tokens" is what each server reports in `usage.prompt_tokens_details`.

{prefix}

Server processes from after the warm-up to the end: {threads}.

{problem_text}
"""
    verdicts = []
    for v in r["verdicts"]:
        value = v["value"]
        target = f"{v['direction']} {v['target']:.1f}x"
        if value is None:
            verdicts.append(
                Verdict(f"Server: {v['what']} {target}", "not measured", None, "not in this plan")
            )
            continue
        met = value >= v["target"] if v["direction"] == ">=" else value <= v["target"]
        verdicts.append(
            Verdict(
                f"Server: {v['what']} {target}",
                f"{value:.3f}x",
                met,
                ("met" if met else "not met")
                + f" ({r['max_tokens']} tokens per request, {r['rounds']} round(s); target {target}).",
            )
        )
    return text, verdicts


def bad_input_section(r: dict[str, Any], docs: Path) -> tuple[str, list[Verdict]]:
    body = table(
        [
            "class",
            "malformed input",
            "command",
            "exit",
            "clear error",
            "traceback",
            "seconds",
            "the message (CASES, MODELS: the benchmark's folders)",
        ],
        [
            [
                x.get("class", "adapter"),
                x["case"],
                f"`{x['command']}`",
                x["exit"],
                "yes" if x["clear"] else "**no**",
                "**yes**" if x["traceback"] else "no",
                f"{x['seconds']:.2f}",
                x.get("message", "").replace("|", "\\|"),
            ]
            for x in r["rows"]
        ],
    )
    threads = r.get("threads")
    thread_line = (
        f" Over {threads['requests']} requests alternating adapters, the server's OS threads went from "
        f"{threads['before']} to {threads['after']} (no thread per request)."
        if threads
        else ""
    )
    text = f"""## 7. Bad input

Broken adapters (each a sound one with one thing wrong), hostile files in model and adapter folders (FIFOs,
links to devices, sparse giants, deep nesting, symlink loops) and bad arguments through the installed CLI, as
subprocesses; hostile HTTP requests against a real `mlxman serve` with an API key, `--adapter-root` and a
512-token context (for these, "exit" is the HTTP status, and "clear" also needs the expected status and the
same connection still answering); plus a pool asked for an adapter of the wrong shapes: its MLX active memory
after it is closed differs from before by {r["pool_leak_bytes"]:+d} bytes.{thread_line}

{body}
"""
    return text, [Verdict(BAD_INPUT_TARGET, r["measured"], r["met"], r["why"])]


def distributed_section(r: dict[str, Any], docs: Path) -> tuple[str, list[Verdict]]:
    from mlxman.memory import format_bytes

    whole, one = r["weights_bytes"], r["tps"]["one process"]
    rows = [["one process", "-", format_bytes(whole), "1.00x", "-", "-", f"{one:.1f}", "1.00x"]]
    for name in ("pipeline", "tensor"):
        t = r["tps"][name]
        for row in r["ranks"][name]:
            held = row["weights_bytes"]
            rows.append(
                [
                    name,
                    str(row["rank"]),
                    format_bytes(held),
                    f"{held / whole:.2f}x",
                    format_bytes(row["weights_measured_bytes"]),
                    format_bytes(row["active_bytes"]),
                    f"{t:.1f}",
                    f"**{t / one:.2f}x**",
                ]
            )
    body = table(
        ["run", "rank", "weights held", "of one process", "measured (MLX)", "MLX active", "tok/s", "vs one"],
        rows,
    )
    text = f"""## 8. Distributed: 2 loopback ranks on one host

Model: {r["model"]}; greedy, {r["tokens"]} tokens through `mlxman generate --hosts`
(ring backend, started by `mlx.launch`), median of {r["rounds"]} interleaved rounds. Both ranks share this
host's CPU cores and talk over loopback, so the tokens/s ratio is the overhead of sharding (communication and
synchronisation per token), not a speed-up: that needs a second machine. Each rank's weights are estimated
from the safetensors headers before loading and checked against that machine's budget; "measured" is MLX's
active memory for them.

{body}
"""
    return text, []


SECTIONS = {
    "switch": switch_section,
    "memory": memory_section,
    "generation": generation_section,
    "estimate": estimate_section,
    "startup": startup_section,
    "server": server_section,
    "bad_input": bad_input_section,
    "distributed": distributed_section,
}


def machine_section(results: dict[str, Any]) -> str:
    m = results["machine"]
    return table(
        ["", ""],
        [
            ["OS", m["os"]],
            ["CPU", f"{m['cpu']}, {m['cpu_count']} cores (shared with other work while measuring)"],
            ["RAM", f"{m['ram_bytes'] / 2**30:.1f} GiB"],
            ["Python", m["python"]],
            ["MLX", f"{m['mlx']} on {m['device']}"],
            ["mlx-lm", m["mlx_lm"]],
        ],
    )


def write_report(results: dict[str, Any], docs: Path) -> Path:
    (docs / PLOTS).mkdir(parents=True, exist_ok=True)
    parts: list[str] = []
    verdicts: list[Verdict] = []
    for name, section in SECTIONS.items():
        result = results["benchmarks"].get(name)
        if result is None:
            continue
        error = _error(name, result)
        if error:
            parts.append(f"## {name}\n\n{error}\n")
            continue
        text, found = section(result, docs)
        parts.append(text)
        verdicts += found
    if "bad_input" not in results["benchmarks"]:
        verdicts.append(Verdict(BAD_INPUT_TARGET, "not measured in this run", None, "run `--only bad_input`"))
    target_lines = [
        f"- **{'met' if v.met else ('not met' if v.met is not None else 'n/a')}** — {v.target}. "
        f"Measured: {v.measured}. {v.why}"
        for v in verdicts
    ]
    mode = results["mode"]
    page = f"""# Benchmarks

<!-- Generated by `{results["command"]}` from benchmarks/results/{mode}.json;
edit benchmarks/report.py, not this page. -->

Every target in the product brief, measured side by side in one process run against what a user would
otherwise run, as ratios. Models are random-weight llamas built by the demo kit's builder (6 blocks each,
widths growing with size) in float16, bfloat16, float32 and 4-bit (`mlx_lm.convert`), and adapters are
synthesized rank-8 LoRA (and DoRA) adapters of the right shapes, all cached under `benchmarks/results/models`.
Absolute times on a CPU build of MLX are slow; the ratios are the point.

This page: the **{mode}** mode, run {results["started"]}, {results["wall_seconds"] / 60:.1f} minutes wall time
including building the models.

## Reproduce

```bash
python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[bench]"
python -m benchmarks --quick      # smaller models, fewer repeats; under 10 minutes on 2 CPU cores
python -m benchmarks              # models up to ~540 MiB, more repeats
```

Each benchmark prints its ratios as it goes; results go to `benchmarks/results/<mode>.json`, and
this page and its
plots are regenerated from them (`--report-only` regenerates without measuring, `--only switch,memory` runs a
subset).

## Machine

{machine_section(results)}

{chr(10).join(parts)}
## Targets

{chr(10).join(target_lines)}
"""
    out = docs / "benchmarks.md"
    out.write_text(page)
    return out
