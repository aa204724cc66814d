"""/v2 generation: ``POST /v2/generate`` and ``POST /v2/snapshots/{id}/warm``.

Handlers parse (``GenerateBody``), call the pipeline, and render native JSON: the answer with
its decision, route, release, snapshot, reuse figures, QoS and telemetry. With ``"stream": true``
the answer comes as server-sent events: ``delta`` events with its text, then ``completed``, the
same object (``_events``). The profile a request
asks for is the ``x-zumik-profile`` header, as on /v1 (``Pipeline.check_profile``: 403 outside
the tenant's policy, 404 for a profile not served here).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from zumik_serve.api import headers as zumik_headers
from zumik_serve.api.body import read_body
from zumik_serve.api.deps import pipeline_of, tenant_of
from zumik_serve.api.v1.handlers import StreamFault, engine_stream, release_when_sent
from zumik_serve.api.v1.wire import parse_json_body, render_error, render_usage
from zumik_serve.api.v2.models import GenerateBody, WarmBody, parse_model
from zumik_serve.engines.protocol import EngineCall
from zumik_serve.errors import ZumikError
from zumik_serve.pipeline.pipeline import Pipeline
from zumik_serve.pipeline.request import (
    Admission,
    Completion,
    Generation,
    GenerationRequest,
    StateRefs,
    Surface,
)
from zumik_serve.telemetry.tracing import RequestClock, telemetry_object

router = APIRouter(prefix="/v2")


@router.post("/generate")
async def generate(request: Request) -> Response:
    clock = RequestClock()
    pipeline = pipeline_of(request)
    tenant = await tenant_of(request)
    body = parse_model(
        GenerateBody, parse_json_body(await read_body(request, pipeline.context.max_body_bytes))
    )
    admission = await pipeline.admit(tenant, qos=body.qos, timeout_s=body.timeout_s, clock=clock)
    try:
        generation = await pipeline.run(
            GenerationRequest(
                tenant=tenant,
                surface=Surface.V2,
                call=EngineCall.COMPLETION,
                model=body.model,
                body=body.engine_fields(),
                stream=body.stream,
                refs=StateRefs(snapshot=body.snapshot),
                admission=admission,
                clock=clock,
                profile=zumik_headers.requested_profile(request.headers),
            )  # fmt: skip
        )
    except BaseException:
        admission.release()
        raise
    headers = _headers(generation)
    if body.stream:
        return StreamingResponse(
            _events(pipeline, generation, admission),
            media_type="text/event-stream",
            headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            background=release_when_sent(admission),
        )
    admission.release()
    answer = generation.answer
    choice = answer["choices"][0]
    result = _result(
        generation, answer["id"], choice.get("text") or "", choice.get("finish_reason"), answer.get("usage")
    )
    if generation.figures is not None:
        headers.update(zumik_headers.reuse_headers(generation.figures))
    return JSONResponse(result, headers=headers, background=BackgroundTask(pipeline.sent, generation))


def _result(
    generation: Generation, answer_id: str, text: str, finish_reason: str | None, usage: Any
) -> dict[str, Any]:
    """The native answer: its text, with its decision, route, release, snapshot, reuse figures,
    QoS and telemetry (a streamed answer's ``completed`` event is the same object)."""
    rendered = render_usage(usage) or {}
    run, figures = generation.run, generation.figures
    return {
        "id": answer_id,
        "object": "generation",
        "model": generation.model,
        "output": {"role": "assistant", "content": text},
        "finish_reason": finish_reason,
        "usage": rendered,
        "decision_id": run.decision_id,
        "route": run.route,
        "release": generation.release.id if generation.release is not None else None,
        "snapshot": generation.snapshot,
        "reuse": figures.to_json() if figures is not None else None,
        "qos": generation.request.admission.qos.value,
        "telemetry": telemetry_object(run, generation.request.clock, rendered),
    }


def _headers(generation: Generation) -> dict[str, str]:
    run = generation.run
    headers = {
        **zumik_headers.route_headers(run.decision_id, run.route),
        zumik_headers.SERVER_TIMING: zumik_headers.server_timing(
            generation.phases_ms, generation.phase_descriptions
        ),
    }
    if generation.release is not None:
        headers[zumik_headers.RELEASE] = generation.release.id
    if generation.snapshot is not None:
        headers[zumik_headers.SNAPSHOT] = generation.snapshot
    return headers


async def _events(pipeline: Pipeline, generation: Generation, admission: Admission) -> AsyncIterator[bytes]:
    """A streamed generation as server-sent events: ``delta`` (``{"type": "delta", "text"}``) for
    each piece of text, then ``completed`` (the object a whole answer is, ``"type": "completed"``
    added), or ``error`` (``{"type": "error", "error": {...}}``) when the engine fails or the
    deadline passes after the first event. An answer cut short (no finish) ends with ``error``."""
    try:
        async for event in _stream(pipeline, generation):
            yield event
    finally:
        admission.release()
        await pipeline.sent(generation)


async def _stream(pipeline: Pipeline, generation: Generation) -> AsyncIterator[bytes]:
    text: list[str] = []
    answer_id, finish_reason, usage = "", None, None
    try:
        async for item in engine_stream(pipeline, generation):
            if isinstance(item, StreamFault):
                yield _event("error", {"error": dict(item.error)})
                return
            answer_id = answer_id or str(item.get("id") or "")
            usage = item.get("usage") or usage
            for choice in item.get("choices") or []:
                if choice.get("index", 0) != 0:
                    continue
                if choice.get("text"):
                    text.append(choice["text"])
                    yield _event("delta", {"text": choice["text"]})
                finish_reason = choice.get("finish_reason") or finish_reason
        if finish_reason is None:
            yield _failure("The engine's stream ended before the answer finished")
            return
        await pipeline.finish(generation, Completion("".join(text), render_usage(usage)))
        yield _event("completed", _result(generation, answer_id, "".join(text), finish_reason, usage))
    except ZumikError as exc:
        yield _event("error", {"error": render_error(exc.message, exc.type, exc.param, exc.code)["error"]})
    except Exception as exc:  # the replica died or the handle broke mid-stream
        yield _failure(f"The engine failed while streaming ({type(exc).__name__})")


def _failure(what: str) -> bytes:
    message = f"{what}; the output is incomplete. Retry the request."
    return _event("error", {"error": render_error(message, "server_error", None, "engine_error")["error"]})


def _event(kind: str, data: dict[str, Any]) -> bytes:
    payload = json.dumps({"type": kind, **data}, separators=(",", ":"), ensure_ascii=False)
    return f"event: {kind}\ndata: {payload}\n\n".encode()


@router.post("/snapshots/{handle}/warm")
async def warm_snapshot(handle: str, request: Request) -> JSONResponse:
    """Compute the snapshot's KV once; the engine's KV connector stores its blocks in the
    profile's tiers, where any replica with the same compat key restores them, also after a
    restart (``Pipeline.warm``)."""
    clock = RequestClock()
    pipeline = pipeline_of(request)
    tenant = await tenant_of(request)
    raw = await read_body(request, pipeline.context.max_body_bytes)
    body = parse_model(WarmBody, parse_json_body(raw) if raw.strip() else {})
    admission = await pipeline.admit(tenant, qos=body.qos, timeout_s=body.timeout_s, clock=clock)
    try:
        pipeline.check_profile(tenant, zumik_headers.requested_profile(request.headers))
        warmed = await pipeline.warm(tenant, handle, admission)
    finally:
        admission.release()
    run = warmed.generation.run
    result: dict[str, Any] = {
        "snapshot": handle,
        "num_tokens": warmed.num_tokens,
        "decision_id": run.decision_id,
        "route": run.route,
        "compilation": warmed.compiled.compilation.record(),
    }
    if warmed.compat_key is not None:
        result.update(
            {
                "compat_key": warmed.compat_key,
                "block_size": warmed.block_size,
                "num_blocks": warmed.num_blocks,
                "persisted_blocks": {"redis": warmed.persisted_redis_blocks},
            }
        )
    return JSONResponse(result, headers=zumik_headers.route_headers(run.decision_id, run.route))
