"""Pool policy on plain numbers: keep-alive parsing, admission and victim choice, expiry."""

from __future__ import annotations

import pytest

from mlxman.errors import UsageError
from mlxman.pool.policy import EntryView, admit, evictable_units, expired, expires_at, parse_keep_alive

GIB = 1024**3


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("5m", 300.0),
        ("30s", 30.0),
        ("1h30m", 5400.0),
        ("250ms", 0.25),
        (" 10 ", 10.0),
        ("0", 0.0),
        (0, 0.0),
        ("-1", -1.0),
        ("-5m", -1.0),
        (-3, -1.0),
        (2.5, 2.5),
        ("1.5h", 5400.0),
    ],
)
def test_parse_keep_alive(text: str | float, seconds: float) -> None:
    assert parse_keep_alive(text) == seconds


@pytest.mark.parametrize("text", ["", "5 minutes", "m", "5x", "1h-3m", "nan", "inf", True])
def test_parse_keep_alive_rejects(text: str | bool) -> None:
    with pytest.raises(UsageError) as info:
        parse_keep_alive(text)
    assert "keep-alive" in info.value.message and info.value.hint


def test_expires_at_never_for_negative() -> None:
    assert expires_at(100.0, -1.0) is None
    assert expires_at(100.0, 0.0) == 100.0
    assert expires_at(100.0, 300.0) == 400.0


def view(key: str, gib: float, last_used: float, **kw: object) -> EntryView:
    return EntryView(key=key, nbytes=int(gib * GIB), last_used=last_used, **kw)  # type: ignore[arg-type]


def run(
    entries: list[EntryView],
    needed_gib: float,
    limit_gib: float = 10,
    available_gib: float = 100,
    max_models: int = 8,
    adds_model: bool = True,
):  # type: ignore[no-untyped-def]
    return admit(
        entries,
        int(needed_gib * GIB),
        int(limit_gib * GIB),
        int(available_gib * GIB),
        max_models=max_models,
        adds_model=adds_model,
    )


def test_fits_without_eviction() -> None:
    adm = run([view("a", 4, 1)], 5)
    assert adm.fits and adm.victims == [] and adm.to_free == 0


def test_evicts_least_recently_used_first() -> None:
    entries = [view("new", 3, 30), view("old", 3, 10), view("mid", 3, 20)]
    adm = run(entries, 3)
    assert adm.fits and adm.victims == ["old"] and adm.freed == 3 * GIB


def test_victims_free_no_more_than_needed() -> None:
    # Oldest first gives old(1) + big(5) + ...; "old" is not needed once "big" goes, so it is spared.
    entries = [view("old", 1, 10), view("big", 5, 20), view("recent", 1, 30), view("x", 2, 40)]
    adm = run(entries, 3)  # 9 in use + 3 needed - 10 limit = 2 to free
    assert adm.to_free == 2 * GIB
    assert adm.victims == ["big"]
    # Two small ones suffice: both go, the newest stays.
    entries = [view("a", 1, 10), view("b", 1, 20), view("c", 4, 30), view("d", 3, 40)]
    adm = run(entries, 3)
    assert adm.victims == ["a", "b"] and adm.freed == 2 * GIB


def test_pinned_and_in_use_are_never_victims() -> None:
    entries = [view("pinned", 4, 1, pinned=True), view("busy", 4, 2, in_use=1), view("idle", 1, 3)]
    adm = run(entries, 3)
    assert not adm.fits
    assert adm.evictable == ["idle"] and adm.evictable_bytes == GIB
    assert adm.reason == "not enough memory"


def test_base_goes_with_its_adapters_and_not_while_one_is_busy() -> None:
    entries = [
        view("base", 4, 5),
        view("base::a", 0.5, 1, parent="base"),
        view("base::b", 0.5, 9, parent="base"),
        view("other", 4, 6),
    ]
    units = evictable_units(entries)
    assert [u.key for u in units] == ["base::a", "other", "base::b", "base"]
    assert units[-1].keys == ("base::a", "base::b", "base") and units[-1].nbytes == 5 * GIB
    adm = run(entries, 5)  # 9 in use, 4 to free
    assert adm.victims == ["other"]
    busy = [*entries[:2], view("base::b", 0.5, 9, parent="base", in_use=1), entries[3]]
    assert "base" not in [u.key for u in evictable_units(busy)]


def test_adapter_entries_alone_can_make_room() -> None:
    entries = [
        view("base", 8, 50),
        view("base::a", 0.5, 1, parent="base"),
        view("base::b", 0.5, 2, parent="base"),
    ]
    adm = run(entries, 0.5, adds_model=False)  # 9 + 0.5 - 10 = 0 -> fits
    assert adm.fits and adm.victims == []
    adm = run(entries, 1.5, adds_model=False)
    assert adm.victims == ["base::a"]


def test_system_memory_shortfall_counts() -> None:
    adm = run([view("a", 2, 1)], 3, limit_gib=100, available_gib=1)
    assert adm.to_free == 2 * GIB and adm.victims == ["a"]


def test_larger_than_limit_is_refused_outright() -> None:
    adm = run([], 11)
    assert not adm.fits and adm.reason == "larger than the pool limit"


def test_max_models_forces_a_model_out() -> None:
    entries = [view("a", 1, 1), view("a::x", 0.1, 5, parent="a"), view("b", 1, 2)]
    adm = run(entries, 1, max_models=2)
    assert adm.fits and adm.models_to_free == 1 and adm.victims == ["b"]
    adm = run([view("a", 1, 1, pinned=True), view("b", 1, 2, in_use=2)], 1, max_models=2)
    assert not adm.fits and adm.reason == "too many models"


def test_reserved_bytes_count_as_used() -> None:
    adm = admit([], 6 * GIB, 10 * GIB, 100 * GIB, max_models=8, adds_model=True, reserved=5 * GIB)
    assert not adm.fits and adm.in_use == 5 * GIB and adm.to_free == GIB


def test_models_loading_count_toward_the_model_limit() -> None:
    """A model still loading is a model: two concurrent loads must not both fit under max_models=1."""
    adm = admit([], GIB, 10 * GIB, 100 * GIB, max_models=1, adds_model=True, reserved=GIB, reserved_models=1)
    assert not adm.fits and adm.reason == "too many models" and adm.models_to_free == 1
    adm = admit([], GIB, 10 * GIB, 100 * GIB, max_models=2, adds_model=True, reserved=GIB, reserved_models=1)
    assert adm.fits
    adapter = admit([], GIB, 10 * GIB, 100 * GIB, max_models=1, adds_model=False, reserved_models=1)
    assert adapter.fits


def test_expiry() -> None:
    entries = [
        view("a", 1, 0, keep_alive=300.0),
        view("b", 1, 0, keep_alive=-1.0),
        view("c", 1, 0, keep_alive=0.0),
        view("d", 1, 0, keep_alive=10.0, in_use=1),
        view("e", 1, 0, keep_alive=10.0, pinned=True),
        view("f", 1, 0, keep_alive=10.0),
        view("f::x", 1, 0, keep_alive=-1.0, parent="f"),
        view("g", 1, 0, keep_alive=10.0),
        view("g::y", 1, 0, keep_alive=5.0, parent="g"),
    ]
    assert expired(entries, 0.0) == ["c"]
    assert expired(entries, 20.0) == ["g::y", "c", "g"]
    assert expired(entries, 300.0) == ["g::y", "a", "c", "g"]
