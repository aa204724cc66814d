"""/v2 generation: ``POST /v2/generate`` and ``POST /v2/snapshots/{id}/warm``.

Handlers parse (``GenerateBody``), call the pipeline, and render native JSON: the answer with
its decision, route, release, snapshot, reuse figures, QoS and telemetry. The profile a request
asks for is the ``x-zumik-profile`` header, as on /v1 (``Pipeline.check_profile``: 403 outside
the tenant's policy, 404 for a profile not served here).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.background import BackgroundTask

from zumik_serve.api import headers as zumik_headers
from zumik_serve.api.body import read_body
from zumik_serve.api.deps import pipeline_of, tenant_of
from zumik_serve.api.v1.wire import parse_json_body, render_usage
from zumik_serve.api.v2.models import GenerateBody, WarmBody, parse_model
from zumik_serve.engines.protocol import EngineCall
from zumik_serve.pipeline.request import GenerationRequest, StateRefs, Surface
from zumik_serve.telemetry.tracing import RequestClock, telemetry_object

router = APIRouter(prefix="/v2")


@router.post("/generate")
async def generate(request: Request) -> JSONResponse:
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
                stream=False,
                refs=StateRefs(snapshot=body.snapshot),
                admission=admission,
                clock=clock,
                profile=zumik_headers.requested_profile(request.headers),
            )  # fmt: skip
        )
    finally:
        admission.release()
    answer = generation.answer
    choice = answer["choices"][0]
    usage = render_usage(answer.get("usage")) or {}
    run, figures = generation.run, generation.figures
    result = {
        "id": answer["id"],
        "object": "generation",
        "model": generation.model,
        "output": {"role": "assistant", "content": choice.get("text") or ""},
        "finish_reason": choice.get("finish_reason"),
        "usage": usage,
        "decision_id": run.decision_id,
        "route": run.route,
        "release": generation.release.id if generation.release is not None else None,
        "snapshot": generation.snapshot,
        "reuse": figures.to_json() if figures is not None else None,
        "qos": admission.qos.value,
        "telemetry": telemetry_object(run, clock, usage),
    }
    headers = {
        **zumik_headers.route_headers(run.decision_id, run.route),
        **(zumik_headers.reuse_headers(figures) if figures is not None else {}),
        zumik_headers.SERVER_TIMING: zumik_headers.server_timing(
            generation.phases_ms, generation.phase_descriptions
        ),
    }
    if generation.release is not None:
        headers[zumik_headers.RELEASE] = generation.release.id
    if generation.snapshot is not None:
        headers[zumik_headers.SNAPSHOT] = generation.snapshot
    return JSONResponse(result, headers=headers, background=BackgroundTask(pipeline.sent, generation))


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
