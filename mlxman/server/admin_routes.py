"""Pool admin endpoints (status, load, unload, pin, unpin, estimate), the server's counters, and health."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import anyio
from fastapi import APIRouter, Request

from mlxman import __version__
from mlxman.errors import UsageError
from mlxman.pool import EntryStatus, Estimate, parse_keep_alive
from mlxman.pool.keys import SEPARATOR
from mlxman.server.listing import entry_names
from mlxman.server.schemas import EstimateRequest, KeyRequest, LoadRequest
from mlxman.server.security import ADMIN_SCOPE_KEY, ModelRef, check_names
from mlxman.server.state import ServerState

health_router = APIRouter()
router = APIRouter(prefix="/api/pool")
server_router = APIRouter(prefix="/api")


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.server
    return state


def _confined(request: Request) -> bool:
    """Whether this caller's paths must keep to the roots, as on /v1.

    Unconfined: the admin key's holder, or anyone when there are neither roots nor an admin key (the operator
    of a loopback server). With roots or an admin key, everyone else keeps to the roots and what is loaded, so
    an API key alone cannot load, estimate or name any other path on the machine.
    """
    if getattr(request.state, ADMIN_SCOPE_KEY, False):
        return False
    state = _state(request)
    return bool(state.policy.roots) or state.config.admin_key is not None


def _loaded(state: ServerState) -> set[str]:
    return {entry.key for entry in state.pool.status().entries}


async def _resolve(request: Request, model: str, adapter: str | None) -> ModelRef:
    """``model`` (and ``adapter``) as the pool should get them: checked against the roots when confined."""
    check_names(model, "model")
    if adapter is not None:
        check_names(adapter, "adapter")
        if SEPARATOR in model:
            raise UsageError(
                "Two adapters given: one in `model` and one in `adapter`", "name the adapter once"
            )
    if not _confined(request):
        return ModelRef(model, adapter)
    state = _state(request)
    spec = model if adapter is None else f"{model}{SEPARATOR}{adapter}"
    return await anyio.to_thread.run_sync(lambda: state.policy.resolve(spec, _loaded(state)))


async def _entry_key(request: Request, key: str) -> str:
    """The loaded entry a key names; confined callers may name only loaded entries, never probe the disk."""
    check_names(key, "key")
    if not _confined(request):
        return key
    state = _state(request)
    return await anyio.to_thread.run_sync(lambda: state.policy.loaded_key(key, _loaded(state)))


@health_router.get("/health")
def health(request: Request) -> dict[str, Any]:
    return {"status": "ok", "version": __version__}


@server_router.get("/server")
def server_info(request: Request) -> dict[str, Any]:
    """This process's MLX memory counters, RSS and threads: what `mlxman status` shows of a running server."""
    from mlxman.system import mlx_info, mlx_memory, process_info

    state = _state(request)
    mlx = {**dataclasses.asdict(mlx_info()), **dataclasses.asdict(mlx_memory())}
    return {
        "version": __version__,
        "uptime_seconds": round(time.time() - state.started, 3),
        **dataclasses.asdict(process_info()),
        "mlx": mlx,
        # Each batching base's engine (rows, queue, slot and KV bytes, steps and tokens); none without.
        "engines": state.engines.status() if state.engines is not None else {},
    }


@router.get("")
def pool_status(request: Request) -> dict[str, Any]:
    state = _state(request)
    status = state.pool.status().as_dict(state.config.budget)
    names = entry_names([e["key"] for e in status["entries"]])
    for entry in status["entries"]:
        entry["names"] = names.get(entry["key"], [])  # the `mlxman alias` names that stand for it
    return status


@router.post("/load")
async def load(body: LoadRequest, request: Request) -> dict[str, Any]:
    pool = _state(request).pool
    keep_alive = parse_keep_alive(body.keep_alive) if body.keep_alive is not None else None
    ref = await _resolve(request, body.model, body.adapter)

    def run() -> EntryStatus:
        entry: EntryStatus = pool.load(
            ref.model, ref.adapter, pin=body.pin, keep_alive=keep_alive, kind=body.kind
        )
        return entry

    # Loading touches MLX: on the model workers (long-lived threads), counted like any model request. No lane:
    # a load takes no base lock, so it need not wait for the base's generations.
    return (await _state(request).call(None, run)).as_dict()


@router.post("/unload")
async def unload(body: KeyRequest, request: Request) -> dict[str, Any]:
    key = await _entry_key(request, body.key)
    pool = _state(request).pool
    await _state(request).call(None, lambda: pool.unload(key))  # freeing touches MLX too
    return {"key": key, "unloaded": True}


@router.post("/pin")
async def pin(body: KeyRequest, request: Request) -> dict[str, Any]:
    key = await _entry_key(request, body.key)
    await anyio.to_thread.run_sync(_state(request).pool.pin, key)
    return {"key": key, "pinned": True}


@router.post("/unpin")
async def unpin(body: KeyRequest, request: Request) -> dict[str, Any]:
    key = await _entry_key(request, body.key)
    await anyio.to_thread.run_sync(_state(request).pool.unpin, key)
    return {"key": key, "pinned": False}


@router.post("/estimate")
async def estimate(body: EstimateRequest, request: Request) -> dict[str, Any]:
    pool = _state(request).pool
    if body.adapters:
        refs = [await _resolve(request, body.model, adapter) for adapter in body.adapters]
        model, adapters = refs[0].model, [ref.adapter for ref in refs if ref.adapter is not None]
    else:
        model, adapters = (await _resolve(request, body.model, None)).key, []

    def run() -> Estimate:
        return pool.estimate(model, adapters)

    return estimate_json(await anyio.to_thread.run_sync(run))


def estimate_json(estimate: Estimate) -> dict[str, Any]:
    return estimate.as_dict()
