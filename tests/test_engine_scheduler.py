"""The per-base engine: batched over mixed adapters, each request gets exactly its answer alone."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mlxman.demo import DemoKit
from mlxman.engine.events import Event, Failed, Finished, Piece, Started
from mlxman.engine.rows import Submission, Ticket
from mlxman.engine.scheduler import Engine, EngineBusy, EngineConfig
from mlxman.engine.slots import SlotBank
from mlxman.errors import MemoryBudgetError, ServerError
from mlxman.generate import GenerationRequest, prompt_tokens
from mlxman.pool.swap import AdapterWeights, read_adapter
from tests.engine_kit import serial_answer, small_variant

PROMPTS = ("Tell me something.", "What now?", "Say more things please, friend", "Hi")
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def adapter_dirs(demo_kit: DemoKit, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    kit = demo_kit.adapters
    small = small_variant(kit["numbers"], tmp_path_factory.mktemp("small") / "small", rank=4, scale=3.0)
    return {"colors": kit["colors"], "numbers": kit["numbers"], "small": small, "animals": kit["animals"]}


@pytest.fixture(scope="module")
def adapters(adapter_dirs: dict[str, Path]) -> dict[str, AdapterWeights]:
    return {name: read_adapter(path) for name, path in adapter_dirs.items()}


def make_engine(model_dir: Path, *, slots: int = 4, max_rank: int = 8, **config: int) -> Engine:
    from mlx_lm import load

    model, tokenizer = load(str(model_dir))[:2]
    bank = SlotBank(model, slots=slots, max_rank=max_rank) if slots else None
    return Engine(model, tokenizer, bank=bank, config=EngineConfig(**config))


@pytest.fixture
def engine(endless_model: Path) -> Iterator[Engine]:
    engine = make_engine(endless_model)
    yield engine
    engine.close()


def tokens_for(engine: Engine, prompt: str) -> list[int]:
    return prompt_tokens(engine.tokenizer, GenerationRequest(prompt=prompt))


def submit(
    engine: Engine,
    prompt: str,
    adapter: AdapterWeights | None = None,
    on_event: Callable[[Event], None] | None = None,
    **settings: float,
) -> Ticket:
    max_tokens = int(settings.pop("max_tokens", MAX_TOKENS))
    request = GenerationRequest(prompt=prompt, max_tokens=max_tokens, **settings)  # type: ignore[arg-type]
    return engine.submit(Submission(tokens_for(engine, prompt), request, adapter), on_event)


class Collector:
    """Events of one request, gathered on the engine thread."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.done = threading.Event()
        self.pieces = 0

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        self.pieces += isinstance(event, Piece)
        if isinstance(event, Finished | Failed):
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, Piece))

    @property
    def finished(self) -> Finished:
        assert self.done.wait(120)
        last = self.events[-1]
        assert isinstance(last, Finished), last
        return last


def test_a_batch_of_eight_over_mixed_adapters_answers_as_each_request_alone(
    engine: Engine, endless_model: Path, adapters: dict[str, AdapterWeights], adapter_dirs: dict[str, Path]
) -> None:
    """Greedy: eight rows over three adapters and none, four of them joining while the others decode."""
    plan = [
        (PROMPTS[0], "colors"),
        (PROMPTS[1], None),
        (PROMPTS[2], "numbers"),
        (PROMPTS[3], "small"),
        (PROMPTS[1], "colors"),
        (PROMPTS[0], "numbers"),
        (PROMPTS[3], None),
        (PROMPTS[2], "small"),
    ]
    collectors = [Collector() for _ in plan]
    joined_midflight = []

    def first_four(i: int) -> Callable[[Event], None]:
        def on_event(event: Event) -> None:
            collectors[i](event)
            # Each of the first four brings in one more request once it has decoded a few tokens.
            if isinstance(event, Piece) and collectors[i].pieces == 3 + i:
                prompt, name = plan[i + 4]
                joined_midflight.append(i + 4)
                submit(engine, prompt, adapters[name] if name else None, collectors[i + 4])

        return on_event

    for i in range(4):
        prompt, name = plan[i]
        submit(engine, prompt, adapters[name] if name else None, first_four(i))
    for i, (prompt, name) in enumerate(plan):
        finished = collectors[i].finished
        want = serial_answer(
            endless_model, adapter_dirs[name] if name else None, tokens_for(engine, prompt), MAX_TOKENS
        )
        assert collectors[i].text == want, f"row {i} ({name}, {prompt!r})"
        assert finished.finish_reason == "length"
        assert finished.stats.generation_tokens == MAX_TOKENS
    assert sorted(joined_midflight) == [4, 5, 6, 7]
    assert len({c.text for c in collectors}) >= 6  # the rows really answer differently
    assert engine.bank is not None and all(engine.bank.active_rows(s) == 0 for s in range(engine.bank.size))


def test_adapters_that_cannot_use_a_slot_run_swapped_in_and_still_answer_right(
    endless_model: Path, adapters: dict[str, AdapterWeights], adapter_dirs: dict[str, Path]
) -> None:
    """DoRA (animals) and a rank above the slot maximum (colors, rank 8 > 4) take the swap path."""
    engine = make_engine(endless_model, max_rank=4)
    try:
        assert engine.bank is not None
        assert engine.bank.problem(adapters["animals"]) and engine.bank.problem(adapters["colors"])
        plan = [("animals", PROMPTS[0]), ("small", PROMPTS[1]), ("colors", PROMPTS[2]), (None, PROMPTS[3])]
        plan += [("animals", PROMPTS[1]), ("small", PROMPTS[0])]
        tickets = [(name, p, submit(engine, p, adapters[name] if name else None)) for name, p in plan]
        for name, prompt, ticket in tickets:
            text, finished = ticket.result(timeout=120)
            want = serial_answer(
                endless_model, adapter_dirs[name] if name else None, tokens_for(engine, prompt), MAX_TOKENS
            )
            assert text == want, f"{name}, {prompt!r}"
            assert finished.finish_reason == "length"
        assert engine.status().swapped_adapter is None  # back on the plain base with its slots
    finally:
        engine.close()


def test_end_of_sequence_and_text_stops_end_a_row_with_the_text_mlx_lm_gives(
    demo_kit: DemoKit, adapters: dict[str, AdapterWeights]
) -> None:
    engine = make_engine(demo_kit.model)
    try:
        prompt = PROMPTS[0]
        text, finished = submit(engine, prompt, adapters["colors"], max_tokens=50).result(timeout=60)
        assert text == "red green blue yellow orange"
        # Six tokens: the end-of-sequence token counts (as in mlx-lm) but is no text.
        assert finished.finish_reason == "stop" and finished.stats.generation_tokens == 6
        request = GenerationRequest(prompt=prompt, max_tokens=50)
        ticket = engine.submit(Submission(tokens_for(engine, prompt), request, adapters["colors"], ("blue",)))
        text, finished = ticket.result(timeout=60)
        assert (text, finished.finish_reason) == ("red green ", "stop")
        stats = finished.stats
        assert stats.prompt_tokens == len(tokens_for(engine, prompt)) and stats.time_to_first_token > 0
    finally:
        engine.close()


def test_cancel_ends_a_decoding_row_at_the_next_step_and_frees_its_slot(
    engine: Engine, adapters: dict[str, AdapterWeights], endless_model: Path, adapter_dirs: dict[str, Path]
) -> None:
    stay = Collector()
    submit(engine, PROMPTS[0], adapters["numbers"], stay, max_tokens=40)
    leave = Collector()
    holder: list[Ticket] = []

    def on_event(event: Event) -> None:
        leave(event)
        if isinstance(event, Piece) and leave.pieces == 2:
            holder[0].cancel()

    holder.append(submit(engine, PROMPTS[1], adapters["colors"], on_event, max_tokens=400))
    finished = leave.finished
    assert finished.finish_reason == "cancelled"
    assert finished.stats.generation_tokens < 10
    assert stay.finished.finish_reason == "length"
    want = serial_answer(endless_model, adapter_dirs["numbers"], tokens_for(engine, PROMPTS[0]), 40)
    assert stay.text == want
    assert engine.bank is not None
    colors_slot = engine.bank.slot_of(adapters["colors"])
    assert colors_slot is not None and engine.bank.active_rows(colors_slot) == 0


def test_cancel_during_a_long_prefill_stops_it_before_any_token(endless_model: Path) -> None:
    engine = make_engine(endless_model, prefill_step_size=16)
    try:
        long_prompt = " ".join(["red green blue"] * 300)
        collector = Collector()
        holder: list[Ticket] = []

        def on_event(event: Event) -> None:
            collector(event)
            if isinstance(event, Started):
                holder[0].cancel()

        holder.append(submit(engine, long_prompt, None, on_event))
        finished = collector.finished
        assert finished.finish_reason == "cancelled" and finished.stats.generation_tokens == 0
        text, _ = submit(engine, PROMPTS[0], max_tokens=5).result(timeout=60)  # the engine carries on
        assert text
    finally:
        engine.close()


def test_a_seeded_sampled_request_repeats_alone_or_in_a_batch(
    engine: Engine, adapters: dict[str, AdapterWeights]
) -> None:
    alone, _ = submit(engine, PROMPTS[2], adapters["colors"], temperature=1.0, seed=5).result(timeout=60)
    others = [submit(engine, p, adapters["numbers"], temperature=0.9, top_p=0.8) for p in PROMPTS]
    again = submit(engine, PROMPTS[2], adapters["colors"], temperature=1.0, seed=5)
    texts = [t.result(timeout=60)[0] for t in [*others, again]]
    assert texts[-1] == alone
    other_seed, _ = submit(engine, PROMPTS[2], adapters["colors"], temperature=1.0, seed=6).result(timeout=60)
    assert other_seed != alone


def test_a_full_queue_refuses_with_busy_and_the_rest_still_run(endless_model: Path) -> None:
    engine = make_engine(endless_model, max_rows=1, max_queue=2)
    try:
        release, running = threading.Event(), threading.Event()

        def blocking(event: Event) -> None:
            if isinstance(event, Started):
                running.set()
                release.wait(60)  # holds the engine thread: what follows stays queued

        first = submit(engine, PROMPTS[0], None, blocking, max_tokens=3)
        assert running.wait(60)
        queued = [submit(engine, p, max_tokens=3) for p in PROMPTS[1:3]]
        with pytest.raises(EngineBusy) as refused:
            submit(engine, PROMPTS[3], max_tokens=3)
        assert refused.value.retry_after >= 1
        release.set()
        assert first.done.wait(60)
        for ticket in queued:
            assert ticket.result(timeout=60)[1].finish_reason == "length"
    finally:
        engine.close()


class Grant:
    """A memory budget for the engine: slot stacks plus KV must stay under ``limit``."""

    def __init__(self, limit: int) -> None:
        self.ceiling = limit
        self.held = 0
        self.peak = 0

    def resize(self, nbytes: int) -> bool:
        if nbytes > self.ceiling:
            return False
        self.held = nbytes
        self.peak = max(self.peak, nbytes)
        return True


def test_kv_is_admitted_against_the_budget_before_a_row_joins(
    endless_model: Path, adapters: dict[str, AdapterWeights]
) -> None:
    from mlx_lm import load

    model, tokenizer = load(str(endless_model))[:2]
    per_token = 2 * 2 * 2 * 16 * 4  # keys and values, 2 layers, 2 KV heads, head_dim 16, float32
    bank = SlotBank(model, slots=2, max_rank=8)
    slot_bytes = bank.nbytes + bank.growth_bytes(adapters["colors"])
    one_row = 256 * per_token  # prompt + max_tokens fit one 256-token cache step
    grant = Grant(slot_bytes + one_row + one_row // 2)  # room for one row at a time, never two
    engine = Engine(
        model, tokenizer, bank=bank, grant=grant, config=EngineConfig(kv_bytes_per_token=per_token)
    )
    try:
        with pytest.raises(MemoryBudgetError, match="KV cache"):
            submit(engine, PROMPTS[0], max_tokens=grant.ceiling // per_token + 1)
        tickets = [submit(engine, p, adapters["colors"], max_tokens=8) for p in PROMPTS]
        assert all(t.result(timeout=60)[1].finish_reason == "length" for t in tickets)
        assert grant.peak <= grant.ceiling and grant.peak >= slot_bytes + one_row
        status = engine.status()  # the rows' KV went back when they left; the prefix cache keeps its own
        assert grant.held == status.slot_bytes + status.prefix_bytes
    finally:
        engine.close()


def test_a_higher_rank_widens_the_slots_within_the_budget_and_counts_their_real_bytes(
    endless_model: Path, adapters: dict[str, AdapterWeights], adapter_dirs: dict[str, Path]
) -> None:
    from mlx_lm import load

    model, tokenizer = load(str(endless_model))[:2]
    bank = SlotBank(model, slots=2, max_rank=16)
    grant = Grant(1 << 30)
    engine = Engine(model, tokenizer, bank=bank, grant=grant)
    try:
        submit(engine, PROMPTS[0], adapters["small"], max_tokens=4).result(timeout=60)
        narrow = engine.status().slot_bytes
        asked = bank.growth_bytes(adapters["colors"])
        ticket = submit(engine, PROMPTS[0], adapters["colors"], max_tokens=10)  # rank 8: the stacks widen
        want = serial_answer(endless_model, adapter_dirs["colors"], tokens_for(engine, PROMPTS[0]), 10)
        assert ticket.result(timeout=60)[0] == want
        status = engine.status()
        assert bank.width == 8
        real = sum(int(m._stack.a.nbytes + m._stack.b.nbytes) for m in bank._targets.values())
        assert status.slot_bytes == real + bank.size * 4 == narrow + asked
        assert grant.held == status.slot_bytes + status.prefix_bytes
    finally:
        engine.close()


def test_more_adapters_than_slots_take_turns(
    endless_model: Path, adapters: dict[str, AdapterWeights], adapter_dirs: dict[str, Path]
) -> None:
    engine = make_engine(endless_model, slots=1)
    try:
        names = ["colors", "numbers", "small", "colors"]
        tickets = [submit(engine, PROMPTS[0], adapters[n], max_tokens=10) for n in names]
        for name, ticket in zip(names, tickets, strict=True):
            want = serial_answer(endless_model, adapter_dirs[name], tokens_for(engine, PROMPTS[0]), 10)
            assert ticket.result(timeout=60)[0] == want
    finally:
        engine.close()


def test_close_ends_running_and_waiting_requests_with_the_reason(endless_model: Path) -> None:
    engine = make_engine(endless_model, max_rows=1)
    running = Collector()
    started = threading.Event()

    def on_event(event: Event) -> None:
        running(event)
        if isinstance(event, Piece):
            started.set()

    submit(engine, PROMPTS[0], None, on_event, max_tokens=2000)
    waiting = submit(engine, PROMPTS[1])
    assert started.wait(60)
    engine.close(ServerError("The server is stopping"))
    assert isinstance(running.events[-1], Failed)
    with pytest.raises(ServerError, match="stopping"):
        waiting.result(timeout=10)


def test_one_thread_serves_every_request(engine: Engine) -> None:
    before = threading.active_count()
    for _ in range(3):
        tickets = [submit(engine, p, max_tokens=4) for p in PROMPTS]
        for t in tickets:
            t.result(timeout=60)
    assert threading.active_count() == before


def test_forgetting_an_adapter_clears_its_slot_once_its_rows_leave(
    engine: Engine, adapters: dict[str, AdapterWeights]
) -> None:
    assert engine.bank is not None
    submit(engine, PROMPTS[0], adapters["colors"], max_tokens=4).result(timeout=60)
    with_colors = engine.status().slot_bytes
    assert engine.bank.slot_of(adapters["colors"]) is not None
    running = submit(engine, PROMPTS[1], adapters["numbers"], max_tokens=30)
    engine.forget(adapters["numbers"])  # in use: cleared only after its row is done
    engine.forget(adapters["colors"])
    running.result(timeout=60)
    submit(engine, PROMPTS[2], max_tokens=2).result(timeout=60)  # one more loop of the engine
    assert engine.status().slot_adapters == ()
    assert engine.status().slot_bytes < with_colors


def test_swapped_in_rows_are_admitted_against_the_budget_too(
    endless_model: Path, adapters: dict[str, AdapterWeights]
) -> None:
    from mlx_lm import load

    model, tokenizer = load(str(endless_model))[:2]
    per_token = 2 * 2 * 2 * 16 * 4
    grant = Grant(256 * per_token * 3 // 2)  # one row's KV at a time (and no prefix cache beside it)
    config = EngineConfig(kv_bytes_per_token=per_token, prefix_cache_bytes=0)
    engine = Engine(model, tokenizer, grant=grant, config=config)
    try:
        tickets = [submit(engine, p, adapters["animals"], max_tokens=6) for p in PROMPTS]
        assert all(t.result(timeout=60)[1].finish_reason == "length" for t in tickets)
        assert grant.peak == 256 * per_token and grant.held == 0
    finally:
        engine.close()


def test_a_row_waiting_for_memory_gives_up_after_the_admission_timeout(
    endless_model: Path, adapters: dict[str, AdapterWeights]
) -> None:
    """Waiting for memory held by running rows is bounded, as the pool's own admission is."""
    from mlx_lm import load

    model, tokenizer = load(str(endless_model))[:2]
    per_token = 2 * 2 * 2 * 16 * 4
    one_row = 256 * per_token
    grant = Grant(one_row + one_row // 2)  # one row at a time
    config = EngineConfig(kv_bytes_per_token=per_token, admission_timeout=0.2)
    engine = Engine(model, tokenizer, bank=None, grant=grant, config=config)
    try:
        queued, release = threading.Event(), threading.Event()

        def hold_room(event: Event) -> None:
            if isinstance(event, Piece) and not release.is_set():
                queued.wait(60)
                release.wait(1.0)  # past the timeout, with the long row still far from done
                release.set()

        long = submit(engine, PROMPTS[0], None, hold_room, max_tokens=200)
        waiting = submit(engine, PROMPTS[1], max_tokens=8)
        queued.set()
        with pytest.raises(MemoryBudgetError, match="waited"):
            waiting.result(timeout=60)
        long.cancel()
        assert long.done.wait(60)
        assert submit(engine, PROMPTS[1], max_tokens=8).result(timeout=60)[1].finish_reason == "length"
    finally:
        engine.close()
