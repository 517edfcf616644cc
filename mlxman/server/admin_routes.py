"""Pool admin endpoints (status, load, unload, pin, unpin, estimate) and the unauthenticated health check."""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter, Request

from mlxman import __version__
from mlxman.pool import EntryStatus, Estimate, parse_keep_alive
from mlxman.server.schemas import EstimateRequest, KeyRequest, LoadRequest
from mlxman.server.state import ServerState

health_router = APIRouter()
# The operator's endpoints take any path the server can read: beyond loopback, use them only with an API key.
router = APIRouter(prefix="/api/pool")


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.server
    return state


@health_router.get("/health")
def health(request: Request) -> dict[str, Any]:
    return {"status": "ok", "version": __version__}


@router.get("")
def pool_status(request: Request) -> dict[str, Any]:
    state = _state(request)
    return state.pool.status().as_dict(state.config.budget)


@router.post("/load")
async def load(body: LoadRequest, request: Request) -> dict[str, Any]:
    pool = _state(request).pool
    keep_alive = parse_keep_alive(body.keep_alive) if body.keep_alive is not None else None

    def run() -> EntryStatus:
        entry: EntryStatus = pool.load(
            body.model, body.adapter, pin=body.pin, keep_alive=keep_alive, kind=body.kind
        )
        return entry

    return (await anyio.to_thread.run_sync(run)).as_dict()


@router.post("/unload")
async def unload(body: KeyRequest, request: Request) -> dict[str, Any]:
    await anyio.to_thread.run_sync(_state(request).pool.unload, body.key)
    return {"key": body.key, "unloaded": True}


@router.post("/pin")
def pin(body: KeyRequest, request: Request) -> dict[str, Any]:
    _state(request).pool.pin(body.key)
    return {"key": body.key, "pinned": True}


@router.post("/unpin")
def unpin(body: KeyRequest, request: Request) -> dict[str, Any]:
    _state(request).pool.unpin(body.key)
    return {"key": body.key, "pinned": False}


@router.post("/estimate")
async def estimate(body: EstimateRequest, request: Request) -> dict[str, Any]:
    pool = _state(request).pool

    def run() -> Estimate:
        return pool.estimate(body.model, body.adapters)

    return estimate_json(await anyio.to_thread.run_sync(run))


def estimate_json(estimate: Estimate) -> dict[str, Any]:
    return estimate.as_dict()
