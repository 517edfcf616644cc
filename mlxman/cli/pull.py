"""``mlxman pull`` and ``mlxman rm``: fetch a model or adapter from the Hugging Face Hub, or remove one."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated

import typer

from mlxman.cli.options import ApiKeyEnvOption, HostOption, JsonOption
from mlxman.errors import Interrupted, UsageError
from mlxman.memory import format_bytes
from mlxman.output import out

if TYPE_CHECKING:
    from mlxman.library.hub import ProgressFn, PullPlan, PullResult, Removal

# How many skipped file names the plan line shows before "and N more".
SKIPPED_SHOWN = 3


def pull(
    repo: Annotated[
        str, typer.Argument(help="ORG/NAME or ORG/NAME@REVISION (a branch, tag or commit) on the Hub.")
    ],
    json_output: JsonOption = False,
) -> None:
    """Download a model or adapter from the Hugging Face Hub (only the files MLX loads), then check it."""
    from mlxman.library import hub
    from mlxman.library.aliases import lookup

    alias = lookup(repo.strip())
    if alias is not None:  # a name is no Hugging Face id (it has no '/'): say what it stands for
        local = alias.model.startswith("/")
        raise UsageError(
            f"'{alias.name}' is a name for {alias.target}",
            "its model is a folder here: nothing to pull" if local else f"run `mlxman pull {alias.model}`",
        )
    spec = hub.parse_spec(repo)
    with _progress_bar(spec.text) as progress:
        result = hub.pull(spec, progress, on_plan=_narrate_plan)
    for warning in result.warnings:
        out.warn(warning)
    if json_output:
        out.json(result)
        return
    out.success(f"Pulled {result.id}: {_describe(result)}")
    out.text(str(result.path))
    if result.kind == "model":
        out.hint(f"Next: mlxman generate -m {result.id} -p 'Hello'")
    else:
        base = result.details.get("base_model") or "BASE"
        out.hint(f"Next: mlxman generate -m {base} --adapter {result.path} -p 'Hello'")


def _narrate_plan(plan: PullPlan) -> None:
    what = f"{len(plan.files)} file{'' if len(plan.files) == 1 else 's'}, {format_bytes(plan.total_bytes)}"
    if plan.cached_bytes:
        what += f", {format_bytes(plan.cached_bytes)} of it already here"
    out.info(f"Pulling {plan.repo_id} at {plan.commit[:12]}: {what}")
    if plan.skipped:
        names = ", ".join(plan.skipped[:SKIPPED_SHOWN])
        more = f" and {len(plan.skipped) - SKIPPED_SHOWN} more" if len(plan.skipped) > SKIPPED_SHOWN else ""
        files = "file" if len(plan.skipped) == 1 else "files"
        out.hint(f"Skipping {len(plan.skipped)} {files} MLX does not load: {names}{more}")


def _describe(result: PullResult) -> str:
    d = result.details
    if result.kind == "adapter":
        from mlxman.adapters.formats import FORMAT_NAMES

        kind = f"{FORMAT_NAMES.get(str(d.get('format')), d.get('format'))} {d.get('fine_tune_type') or ''}"
        parts = [f"{kind.strip().replace('lora', 'LoRA').replace('dora', 'DoRA')} adapter"]
        if d.get("checked_against"):
            parts.append(f"fits {d.get('base_model')}")
    else:
        parts = [str(d.get("model_type") or "model"), str(d.get("quantization") or d.get("dtype") or "")]
        parts.append(f"{format_bytes(int(d.get('weight_bytes') or 0))} of weights")
    fetched = format_bytes(result.downloaded_bytes) if result.downloaded_bytes else "nothing new"
    return ", ".join(p for p in parts if p) + f"; fetched {fetched}, checked"


@contextmanager
def _progress_bar(title: str) -> Iterator[ProgressFn | None]:
    """A rich bar on stderr, fed by the pull (from its watcher thread too); none when stderr is a pipe."""
    if not out.stderr.is_terminal:
        yield None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    bar = Progress(
        TextColumn("[key]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=out.stderr,
        transient=True,
    )
    task = bar.add_task(title, total=None)

    def update(done: int, total: int, current: str | None) -> None:
        bar.update(task, completed=done, total=total, description=f"{title} {current}" if current else title)

    with bar:
        yield update


def rm(
    name: Annotated[
        str, typer.Argument(help="ORG/NAME (every cached revision) or ORG/NAME@REVISION (one of them).")
    ],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Remove without asking.")] = False,
    host: HostOption = None,
    api_key_env: ApiKeyEnvOption = None,
    json_output: JsonOption = False,
) -> None:
    """Remove a model or adapter from the Hugging Face cache; refused while a running server holds it."""
    from mlxman.client import api_key_from_env
    from mlxman.library import hub

    removal = hub.plan_removal(name)
    hub.refuse_if_held(removal, host, api_key_from_env(api_key_env))
    revisions = ", ".join(
        r.commit[:12] + (f" ({', '.join(r.refs)})" if r.refs else "") for r in removal.revisions
    )
    what = f"{removal.repo_id} [{revisions}], {format_bytes(removal.freed_bytes)}"
    if not yes and not _confirmed(f"Remove {what}?"):
        out.info(f"Kept {removal.repo_id}.")
        raise typer.Exit(1)
    freed = hub.remove(removal)
    stale = _names_left_without(removal)
    if json_output:
        out.json({"removed": removal, "freed_bytes": freed})
    else:
        out.success(f"Removed {removal.repo_id}: freed {format_bytes(freed)}")
    if stale:
        out.hint(
            f"Names that stood for it no longer work: {', '.join(stale)}; point them elsewhere with "
            f"`mlxman alias NAME MODEL`, or forget them with `mlxman alias rm {' '.join(stale)}`."
        )


def _names_left_without(removal: Removal) -> list[str]:
    """The names (``mlxman alias``) whose model or adapter was in what ``rm`` removed."""
    from pathlib import Path

    from mlxman.errors import MlxmanError
    from mlxman.library.aliases import load_aliases

    try:
        aliases = load_aliases()
    except MlxmanError:
        return []
    removed = [r.path for r in removal.revisions]
    stale = []
    for alias in aliases.values():
        repo, _, revision = alias.model.partition("@")
        model_gone = repo == removal.repo_id and (
            removal.whole_repo
            or any(
                (revision or "main") in r.refs or r.commit.startswith(revision or "-")
                for r in removal.revisions
            )
        )
        adapter_gone = alias.adapter is not None and any(
            Path(alias.adapter).is_relative_to(p) for p in removed
        )
        if model_gone or adapter_gone:
            stale.append(alias.name)
    return sorted(stale)


def _confirmed(question: str) -> bool:
    """The user's answer; no answer (stdin closed, Ctrl-C) is an error that names ``--yes``."""
    try:
        return typer.confirm(question, default=False, err=True)
    except typer.Abort:
        out.info("")  # end the question's line
        if sys.stdin is not None and sys.stdin.isatty():
            raise Interrupted("Interrupted; nothing was removed") from None
        raise UsageError(
            "No answer to the question (stdin is closed); nothing was removed",
            "pass --yes to remove without asking",
        ) from None
