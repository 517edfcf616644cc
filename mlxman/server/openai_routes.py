"""OpenAI-compatible endpoints: models, chat and text completions (streamed or not), embeddings."""

from __future__ import annotations

import base64
import json
import struct
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any, Literal

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from mlxman.embed import EmbeddingResult, embed_texts
from mlxman.engine.events import Event, Failed, Finished, Piece
from mlxman.errors import UsageError
from mlxman.generate import GenerationRequest
from mlxman.pool import parse_keep_alive
from mlxman.server.errors import describe
from mlxman.server.jobs import EngineJob, GenerationJob
from mlxman.server.listing import servable_models
from mlxman.server.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, SamplingFields
from mlxman.server.security import ModelRef
from mlxman.server.state import ServerState
from mlxman.settings import DEFAULT_MAX_TOKENS

router = APIRouter(prefix="/v1")

Kind = Literal["chat", "text"]


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.server
    return state


def _loaded_keys(state: ServerState) -> set[str]:
    return {entry.key for entry in state.pool.status().entries}


def resolve_model(state: ServerState, name: str) -> ModelRef:
    return state.policy.resolve(name, _loaded_keys(state))


def _note(request: Request, key: str, extra: str = "") -> None:
    """Detail for the request log line."""
    request.state.log_detail = f"model={key}{extra}"


@router.get("/models")
def list_models(request: Request) -> dict[str, Any]:
    """What the server would serve now, loaded or not (see server/listing.py); on the cheap-route threads."""
    state = _state(request)
    entries = state.pool.status().entries
    return {"object": "list", "data": servable_models(state.policy, entries, int(state.started))}


@router.post("/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    # OpenAI's newer "developer" role is what chat templates call "system".
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages
    ]
    generation = GenerationRequest(
        messages=messages,
        max_tokens=body.token_limit() or DEFAULT_MAX_TOKENS,
        temperature=body.temperature if body.temperature is not None else 0.0,
        top_p=body.top_p if body.top_p is not None else 1.0,
        seed=body.seed,
        truncate_prompt_tokens=body.truncate_prompt_tokens,
    )
    return await _complete(request, body, generation)


@router.post("/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> Any:
    prompt = body.prompt_text()
    if not prompt:
        raise UsageError("The prompt is empty", "send a non-empty prompt")
    generation = GenerationRequest(
        prompt=prompt,
        raw=True,
        max_tokens=body.token_limit() or DEFAULT_MAX_TOKENS,
        temperature=body.temperature if body.temperature is not None else 0.0,
        top_p=body.top_p if body.top_p is not None else 1.0,
        seed=body.seed,
        truncate_prompt_tokens=body.truncate_prompt_tokens,
    )
    return await _complete(request, body, generation, prompt if body.echo else "")


def keep_alive_of(body: SamplingFields | EmbeddingRequest) -> float | None:
    return None if body.keep_alive is None else parse_keep_alive(body.keep_alive)


async def _complete(
    request: Request, body: SamplingFields, generation: GenerationRequest, prefix: str = ""
) -> Any:
    state = _state(request)
    generation.check()
    keep_alive = keep_alive_of(body)
    ref = await anyio.to_thread.run_sync(resolve_model, state, body.model)
    _note(request, ref.key)
    acquire = lambda: state.pool.acquire(ref.model, ref.adapter, keep_alive=keep_alive)  # noqa: E731
    job: GenerationJob
    if state.engines is not None:
        # Batched on the base's engine when it can batch; else the one-request path, in the model's lane.
        hold = lambda: state.pool.hold(ref.model, ref.adapter, keep_alive=keep_alive)  # noqa: E731
        job = EngineJob(ref.model, acquire, hold, state.engines, generation, body.stop_sequences())
    else:
        job = GenerationJob(ref.model, acquire, generation, body.stop_sequences())
    state.submit(job)
    shape = _Shape("chat" if isinstance(body, ChatCompletionRequest) else "text", ref.shown)
    if not body.stream:
        try:
            return await _collect(state, job, shape, prefix, request)
        finally:
            state.release(job)
    # Wait until the model is held and the prompt fits before sending headers, so that a failed load or an
    # over-long prompt is still a plain 4xx; from then on (prefill included) errors arrive as stream events.
    events = job.events()
    try:
        first = await _first_event(state, events, request, job)
        if isinstance(first, Failed):
            _raise(first.error)
    except BaseException:
        await events.aclose()
        state.release(job)
        raise
    stream = _stream(first, events, shape, body.include_usage(), prefix, request)
    return EventStream(stream, on_close=lambda: state.release(job))


async def _collect(
    state: ServerState, job: GenerationJob, shape: _Shape, prefix: str, request: Request
) -> dict[str, Any]:
    text = prefix
    outcome: Finished | Failed | None = None
    async with anyio.create_task_group() as group:
        # A client that hangs up on a non-streamed request also stops its generation (prefill included).
        group.start_soon(_cancel_on_disconnect, state, request, job)
        async with aclosing(job.events()) as events:
            async for event in events:
                if isinstance(event, Piece):
                    text += event.text
                elif isinstance(event, Finished | Failed):
                    outcome = event
        group.cancel_scope.cancel()
    if isinstance(outcome, Failed):
        _raise(outcome.error)
    assert isinstance(outcome, Finished), "a generation always ends with Finished or Failed"
    _note(request, shape.model, _stats_note(outcome))
    return shape.whole(text, outcome)


async def _cancel_on_disconnect(state: ServerState, request: Request, job: GenerationJob) -> None:
    while not await request.is_disconnected():
        await anyio.sleep(0.25)
    state.cancel(job)


async def _first_event(
    state: ServerState, events: AsyncGenerator[Event, None], request: Request, job: GenerationJob
) -> Event:
    async with anyio.create_task_group() as group:
        group.start_soon(_cancel_on_disconnect, state, request, job)
        first = await anext(events)
        group.cancel_scope.cancel()
    return first


async def _stream(
    first: Event,
    events: AsyncGenerator[Event, None],
    shape: _Shape,
    include_usage: bool,
    prefix: str,
    request: Request,
) -> AsyncGenerator[str, None]:
    # The first chunk carries the role (and an echoed prompt); pieces follow as they are decoded.
    yield _sse(shape.chunk(prefix, first=True))
    async with aclosing(events):
        event: Event | None = first
        while event is not None:
            if isinstance(event, Piece):
                yield _sse(shape.chunk(event.text))
            elif isinstance(event, Failed):
                # Headers are sent already: the error goes into the stream, in the OpenAI error shape.
                yield _sse(describe(event.error)[1])
            elif isinstance(event, Finished):
                _note(request, shape.model, _stats_note(event))
                yield _sse(shape.chunk("", finish_reason=event.finish_reason))
                if include_usage:
                    yield _sse(shape.usage_chunk(event))
            event = await anext(events, None)
    yield "data: [DONE]\n\n"


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _raise(error: BaseException) -> None:
    if isinstance(error, Exception):
        raise error
    raise RuntimeError(f"generation stopped: {error!r}")


def _stats_note(event: Finished) -> str:
    s = event.stats
    # A generation stopped while reading its prompt says how far it got.
    prefilled = f" prefilled={s.prefilled_tokens}" if s.prefilled_tokens < s.prompt_tokens else ""
    return (
        f" prompt={s.prompt_tokens}{prefilled} completion={s.generation_tokens} "
        f"tps={s.generation_tps:.1f} finish={event.finish_reason}"
    )


class _Shape:
    """Builds chat or text completion bodies and chunks with one id and timestamp."""

    def __init__(self, kind: Kind, model: str) -> None:
        self.kind = kind
        self.model = model
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    @staticmethod
    def usage(event: Finished) -> dict[str, int]:
        p, c = event.stats.prompt_tokens, event.stats.generation_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    @staticmethod
    def reason(event: Finished) -> str:
        return event.finish_reason if event.finish_reason in ("stop", "length") else "stop"

    def whole(self, text: str, event: Finished) -> dict[str, Any]:
        if self.kind == "chat":
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": self.reason(event),
                "logprobs": None,
            }
            return {**self._base("chat.completion"), "choices": [choice], "usage": self.usage(event)}
        choice = {"index": 0, "text": text, "finish_reason": self.reason(event), "logprobs": None}
        return {**self._base("text_completion"), "choices": [choice], "usage": self.usage(event)}

    def chunk(self, text: str, *, first: bool = False, finish_reason: str | None = None) -> dict[str, Any]:
        if finish_reason is not None and finish_reason not in ("stop", "length"):
            finish_reason = "stop"
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {"content": text}
            if finish_reason is not None:
                delta = {}
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            return {**self._base("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        return {**self._base("text_completion"), "choices": [choice]}

    def usage_chunk(self, event: Finished) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._base(obj), "choices": [], "usage": self.usage(event)}


class EventStream(StreamingResponse):
    """Server-sent events whose producer is always closed, so a dropped client stops its generation."""

    def __init__(self, content: AsyncGenerator[str, None], on_close: Callable[[], None]) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self._source = content
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
            await self._source.aclose()


@router.post("/embeddings", response_model=None)
async def embeddings(body: EmbeddingRequest, request: Request) -> Any:
    state = _state(request)
    texts = body.texts()
    if any(not t for t in texts):
        raise UsageError("An input text is empty", "send non-empty strings in `input`")
    keep_alive = keep_alive_of(body)
    ref = await anyio.to_thread.run_sync(resolve_model, state, body.model)
    _note(request, ref.key)

    def embed() -> EmbeddingResult:
        with state.pool.acquire(ref.model, ref.adapter, keep_alive=keep_alive) as lease:
            if lease.kind != "embeddings":
                raise UsageError(
                    f"{ref.shown} is a {lease.kind} model, not an embeddings model",
                    "name an embeddings model (such as a sentence-transformers BERT) in `model`",
                )
            return embed_texts(lease.model, lease.tokenizer, texts)

    # Model work: on the workers, in the model's lane, counted against the pending limit.
    result = await state.call(ref.model, embed)
    data = [
        {"object": "embedding", "index": i, "embedding": _encode(vector, body.encoding_format)}
        for i, vector in enumerate(result.vectors)
    ]
    usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
    return JSONResponse({"object": "list", "data": data, "model": ref.shown, "usage": usage})


def _encode(vector: list[float], encoding: str) -> Any:
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector
