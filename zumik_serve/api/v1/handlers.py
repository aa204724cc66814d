"""/v1: the OpenAI-compatible surface. Handlers parse, call the pipeline, render; nothing more.

Zumik's own data never enters a /v1 body: decision, route, release, snapshot, QoS, reuse figures
and timings go out as ``x-zumik-*`` / ``Server-Timing`` headers (``api/headers.py``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from zumik_serve.api import headers as zumik_headers
from zumik_serve.api.body import read_body
from zumik_serve.api.deps import pipeline_of, tenant_of
from zumik_serve.api.v1.wire import (
    PreparedRequest,
    StreamRenderer,
    parse_json_body,
    prepare_request,
    render_chat_completion,
    render_completion,
    render_error,
    render_stream_error,
    render_usage,
)
from zumik_serve.engines.protocol import EngineCall, EngineChunks, EngineFailure, parse_stream_error
from zumik_serve.errors import InvalidRequestError, NotFoundError, ZumikError
from zumik_serve.pipeline.pipeline import Pipeline
from zumik_serve.pipeline.request import (
    Admission,
    Completion,
    Generation,
    GenerationRequest,
    StateRefs,
    Surface,
)
from zumik_serve.telemetry.tracing import RequestClock
from zumik_serve.tenancy.tenant import Tenant

router = APIRouter(prefix="/v1")


@router.get("/models")
async def list_models(request: Request) -> JSONResponse:
    await tenant_of(request)
    cards = pipeline_of(request).context.models.cards
    return JSONResponse(
        {"object": "list", "data": [_model_object(c.id, c.created_s, c.owned_by) for c in cards]}
    )


@router.get("/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> JSONResponse:
    await tenant_of(request)
    card = pipeline_of(request).context.models.card(model_id)
    if card is None:
        raise NotFoundError(
            f"The model '{model_id}' does not exist. GET /v1/models lists the models you can use.",
            param="model",
            code="model_not_found",
        )
    return JSONResponse(_model_object(card.id, card.created_s, card.owned_by))


@router.post("/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await _generate(request, EngineCall.CHAT)


@router.post("/completions")
async def completions(request: Request) -> Response:
    return await _generate(request, EngineCall.COMPLETION)


async def _generate(request: Request, call: EngineCall) -> Response:
    clock = RequestClock()
    pipeline = pipeline_of(request)
    tenant = await tenant_of(request)
    body = parse_json_body(await read_body(request, pipeline.context.max_body_bytes))
    prepared = prepare_request(call, body)
    admission = await admit(pipeline, tenant, request, clock)  # the body is in: no slot waits on it
    try:
        generation = await pipeline.run(
            GenerationRequest(
                tenant=tenant,
                surface=Surface.V1,
                call=call,
                model=prepared.model,
                body=prepared.engine_body,
                stream=prepared.stream,
                refs=_state_refs(request, call),
                admission=admission,
                clock=clock,
                hints=prepared.hints,
                profile=zumik_headers.requested_profile(request.headers),
            )  # fmt: skip
        )
        headers = generation_headers(generation)
        if not prepared.stream:
            render = render_chat_completion if call is EngineCall.CHAT else render_completion
            rendered = render(generation.answer, generation.model)
            if generation.figures is not None:
                headers.update(zumik_headers.reuse_headers(generation.figures))
            admission.release()
            return JSONResponse(
                rendered, headers=headers, background=BackgroundTask(pipeline.sent, generation)
            )
        if generation.opportunity_tokens is not None:
            headers[zumik_headers.REUSE_OPPORTUNITY_TOKENS] = str(generation.opportunity_tokens)
    except BaseException:
        admission.release()
        raise
    return StreamingResponse(
        _sse(pipeline_of(request), generation, prepared, admission),
        media_type="text/event-stream",
        headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        background=release_when_sent(admission),  # also when the client left early
    )


def release_when_sent(admission: Admission) -> BackgroundTask:
    """A streamed answer's slot, given back once the response is over, on the event loop:
    a slot handed on to a waiting request completes that request's future, which only the
    loop's own thread may do (Starlette runs a plain function's background task on a worker
    thread, where the waiter would not wake until the loop next woke for something else)."""

    async def release() -> None:
        admission.release()

    return BackgroundTask(release)


async def admit(pipeline: Pipeline, tenant: Tenant, request: Request, clock: RequestClock) -> Admission:
    """A /v1 generation's admission, from its ``x-zumik-qos`` and ``x-zumik-timeout-s`` headers.
    It comes once the body is read and parsed: a slow or bad upload never holds a slot."""
    qos, timeout = zumik_headers.QOS, zumik_headers.TIMEOUT
    return await pipeline.admit(
        tenant, qos=request.headers.get(qos), timeout_s=request.headers.get(timeout), clock=clock,
        qos_param=qos, timeout_param=timeout,
    )  # fmt: skip


def _state_refs(request: Request, call: EngineCall) -> StateRefs:
    snapshot = request.headers.get(zumik_headers.SNAPSHOT) or None
    session = request.headers.get(zumik_headers.SESSION) or None
    if (snapshot or session) and call is not EngineCall.CHAT:
        header = zumik_headers.SNAPSHOT if snapshot else zumik_headers.SESSION
        raise InvalidRequestError(f"{header} applies to /v1/chat/completions only.", param=header)
    return StateRefs(snapshot=snapshot, session=session)


def generation_headers(generation: Generation) -> dict[str, str]:
    run = generation.run
    headers = zumik_headers.route_headers(run.decision_id, run.route)
    headers[zumik_headers.QOS] = generation.request.admission.qos.value
    if generation.release is not None:
        headers[zumik_headers.RELEASE] = generation.release.id
    if generation.snapshot is not None:
        headers[zumik_headers.SNAPSHOT] = generation.snapshot
    if generation.phases_ms:
        headers[zumik_headers.SERVER_TIMING] = zumik_headers.server_timing(
            generation.phases_ms, generation.phase_descriptions
        )
    return headers


async def _sse(
    pipeline: Pipeline, generation: Generation, prepared: PreparedRequest, admission: Admission
) -> AsyncIterator[bytes]:
    """Re-render the engine's stream; a failure after the first byte is an error event, then
    ``[DONE]`` (never a made-up ``finish_reason``); so is the request's deadline passing."""
    try:
        async for chunk in _sse_events(pipeline, generation, prepared):
            yield chunk
    finally:
        admission.release()
        await pipeline.sent(generation)


async def _sse_events(
    pipeline: Pipeline, generation: Generation, prepared: PreparedRequest
) -> AsyncIterator[bytes]:
    renderer = StreamRenderer(prepared.call, generation.model, prepared.include_usage)
    reply: list[str] = []
    completed = False
    usage: dict[str, Any] | None = None
    try:
        async for item in engine_stream(pipeline, generation):
            if isinstance(item, StreamFault):
                yield _data(render_stream_error(item.error))
                break
            if item.get("usage"):  # the engine's usage, sent to the client or not (``include_usage``)
                usage = render_usage(item["usage"])
            rendered = renderer.render(item)
            if rendered is None:
                continue
            for choice in rendered["choices"]:
                if choice["index"] == 0:
                    reply.append(choice.get("delta", {}).get("content") or choice.get("text") or "")
                    completed = completed or choice["finish_reason"] is not None
            yield _data(rendered)
        if completed:
            await pipeline.finish(generation, Completion("".join(reply), usage))
    except ZumikError as exc:
        yield _data(render_error(exc.message, exc.type, exc.param, exc.code))
    except Exception as exc:  # the replica died or the handle broke mid-stream
        yield _data(
            render_error(
                f"The engine failed while streaming ({type(exc).__name__}); the output is "
                "incomplete. Retry the request.",
                "server_error",
                None,
                "engine_error",
            )
        )
    yield b"data: [DONE]\n\n"


@dataclass(frozen=True)
class StreamFault:
    """The engine's failure inside a stream, as an error object (``message``, ``type``,
    ``param``, ``code``: the status when the engine gave one)."""

    error: Mapping[str, Any]


async def engine_stream(
    pipeline: Pipeline, generation: Generation
) -> AsyncIterator[dict[str, Any] | StreamFault]:
    """A streamed generation's chunks as the engine sent them (JSON objects, in order); a
    failure, the engine's event or an in-stream error payload, ends it as one ``StreamFault``."""
    async for event in pipeline.events(generation):
        if isinstance(event, EngineFailure):
            yield StreamFault(
                {"message": event.message, "type": event.type, "param": event.param, "code": event.status}
            )
            return
        if not isinstance(event, EngineChunks):
            continue
        for payload in event.payloads:
            if not payload or payload == "[DONE]":
                continue
            error = parse_stream_error(payload)
            if error is not None:
                yield StreamFault(error)
                return
            yield json.loads(payload)


def _data(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def _model_object(model_id: str, created_s: int, owned_by: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created_s, "owned_by": owned_by}
