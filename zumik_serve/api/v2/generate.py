"""/v2 generation: ``POST /v2/generate`` and ``POST /v2/snapshots/{id}/warm``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from profiles.model import RouteKind
from zumik_serve.api import headers as zumik_headers
from zumik_serve.api.body import read_body
from zumik_serve.api.limits import check_generation_limits
from zumik_serve.api.qos_http import Admission, admit
from zumik_serve.api.v1.wire import parse_json_body, render_usage
from zumik_serve.engines.protocol import EngineCall, EngineResponse
from zumik_serve.errors import EngineError, InvalidRequestError
from zumik_serve.pipeline.service import GatewayService
from zumik_serve.reuse.figures import ReuseFigures
from zumik_serve.reuse.service import ReuseService
from zumik_serve.routing.dispatch import RouteContext
from zumik_serve.routing.service import RoutingService
from zumik_serve.state.service import StateService
from zumik_serve.telemetry.tracing import RequestClock, Tracing, request_phases, telemetry_object
from zumik_serve.tenancy.tenant import Tenant

router = APIRouter(prefix="/v2")
GENERATE_SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "stop", "seed")


def _services(request: Request) -> tuple[GatewayService, StateService]:
    return request.app.state.service, request.app.state.state_service


@router.post("/snapshots/{handle}/warm")
async def warm_snapshot(handle: str, request: Request) -> JSONResponse:
    """Compute the snapshot's KV once (a 1-token generation over its compiled tokens); the
    engine's KV connector stores its blocks in the profile's tiers, where any replica with the
    same compat key restores them, also after a restart."""
    service, state = _services(request)
    tenant = await service.authenticate(request.headers.get("authorization"))
    compiled = await state.store_call(state.compile_snapshot(tenant.id, handle, service.tokenizer()))
    token_ids = list(compiled.token_ids)
    body = {"model": service.models[0].id, "prompt": token_ids, "max_tokens": 1, "temperature": 0}
    run = await service.start(EngineCall.COMPLETION, body, stream=False, tenant=tenant)
    probe = request.app.state.kv_probe
    result: dict[str, Any] = {
        "snapshot": handle,
        "num_tokens": len(token_ids),
        "decision_id": run.decision_id,
        "route": run.route,
        "compilation": compiled.compilation.record(),
    }
    if probe is not None:
        addresses = probe.addresses(token_ids, await service.cache_salt_for(tenant))
        result.update(
            {
                "compat_key": probe.compat_digest,
                "block_size": probe.block_size,
                "num_blocks": len(addresses),
                "persisted_blocks": {"redis": await probe.count_in_redis(addresses)},
            }
        )
    return JSONResponse(result, headers=zumik_headers.route_headers(run.decision_id, run.route))




@router.post("/generate")
async def generate(request: Request) -> JSONResponse:
    clock = RequestClock()
    service, state = _services(request)
    tenant_record = await service.authenticate(request.headers.get("authorization"))
    body = parse_json_body(await read_body(request, request.app.state.max_body_bytes))
    check_generation_limits(body, request.app.state.limits)
    admission = await admit(
        request, tenant_record, requested_qos=body.get("qos"), timeout_s=body.get("timeout_s"),
        clock=clock, qos_param="qos", timeout_param="timeout_s",
    )  # fmt: skip
    try:
        return await admission.deadline.run(_generate(request, tenant_record, body, admission, clock))
    finally:
        admission.ticket.release()


async def _generate(
    request: Request, tenant_record: Tenant, body: dict[str, Any], admission: Admission, clock: RequestClock
) -> JSONResponse:
    service, state = _services(request)
    tenant = tenant_record.id
    snapshot = body.get("snapshot")
    messages: list[dict[str, Any]] = []
    if snapshot is not None:
        messages = await state.store_call(state.snapshot_messages(tenant, snapshot))
    messages.extend(_input_messages(body.get("input")))
    model = body.get("model", service.models[0].id)
    routing: RoutingService = request.app.state.routing
    release = (
        await state.store_call(routing.release_for_request(tenant, model)) if isinstance(model, str) else None
    )
    if release is not None:
        model = release.model
    if model not in service.served_model_ids:
        raise InvalidRequestError(f"unknown model {model!r}; GET /v1/models lists them", param="model")
    token_ids = service.tokenizer().encode_chat(messages, add_generation_prompt=True)
    engine_body: dict[str, Any] = {"model": model, "prompt": token_ids}
    for field in GENERATE_SAMPLING_FIELDS:
        if field in body:
            engine_body[field] = body[field]
    byoc = {r.name for r in routing.profile.effective_routes() if r.kind is RouteKind.BYOC}
    allowed = byoc if release is None else byoc & {entry.name for entry in release.route_table}
    context = RouteContext(  # token ids are this deployment's own: only its engines can take them
        release_id=release.id if release is not None else None,
        allowed_routes=frozenset(allowed),
        snapshot_id=snapshot,
        qos=admission.qos.value,
        prefer_cheapest=admission.prefer_cheapest,
        engine_priority=admission.engine_priority,
    )
    run = await service.start(
        EngineCall.COMPLETION, engine_body, stream=False, tenant=tenant_record, context=context
    )
    if not isinstance(run.first, EngineResponse):
        raise EngineError("The engine streamed a response to a non-streaming request.")
    choice = run.first.body["choices"][0]
    usage = render_usage(run.first.body.get("usage")) or {}
    reuse: ReuseService = request.app.state.reuse
    accounting = tenant_record.reuse_accounting
    opportunity = (
        await state.store_call(reuse.opportunity_tokens(run.scope, run.prefix_keys)) if accounting else None
    )
    figures = ReuseFigures.of(
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        opportunity_tokens=opportunity,
        route_kind=run.route_kind,
        cached_tokens=(usage.get("prompt_tokens_details") or {}).get("cached_tokens"),
        kv_report=run.kv_report(),
    )
    if accounting:
        await state.store_call(reuse.record(tenant, figures, snapshot=snapshot, route=run.route_name))
    result = {
        "id": run.first.body["id"],
        "object": "generation",
        "model": model,
        "output": {"role": "assistant", "content": choice.get("text") or ""},
        "finish_reason": choice.get("finish_reason"),
        "usage": usage,
        "decision_id": run.decision_id,
        "route": run.route,
        "release": release.id if release is not None else None,
        "snapshot": snapshot,
        "reuse": figures.to_json(),
        "qos": admission.qos.value,
        "telemetry": telemetry_object(run, clock, usage),
    }
    phases, descriptions = request_phases(run, clock)
    headers = {
        **zumik_headers.route_headers(run.decision_id, run.route),
        **zumik_headers.reuse_headers(figures),
        zumik_headers.SERVER_TIMING: zumik_headers.server_timing(phases, descriptions),
    }
    tracing: Tracing = request.app.state.tracing
    if tracing.enabled:
        attributes: dict[str, str | int | float | bool] = {
            "zumik.tenant": tenant, "zumik.qos": admission.qos.value,
            "zumik.reuse_opportunity_tokens": figures.opportunity_tokens,
        }  # fmt: skip
        if figures.captured_tokens is not None:
            attributes["zumik.reuse_captured_tokens"] = figures.captured_tokens
        tracing.request(run, clock, attributes)
    if release is not None:
        headers[zumik_headers.RELEASE] = release.id
    if snapshot is not None:
        headers[zumik_headers.SNAPSHOT] = snapshot
    return JSONResponse(result, headers=headers)


def _input_messages(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value
    ):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise InvalidRequestError(
        '\'input\' must be a string or an array of {"role", "content"} messages.', param="input"
    )
