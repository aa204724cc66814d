"""/v2 routing: aliases and releases, decision records and replay, profiles, tenants' own keys.

POST /v2/aliases/{name}/releases   publish a release and point the alias at it → 201
GET  /v2/aliases/{name}            the current release and the alias' history
GET  /v2/decisions                 the tenant's decisions, newest first, a page at a time
GET  /v2/decisions/{id}            a decision record and the attempts that carried it out
POST /v2/decisions/{id}/replay     recompute it from its recorded inputs → {"equal", "record"}
GET  /v2/profiles                  the profiles served here: routes, policy, purge ceiling
PUT  /v2/byok/{route}              store the tenant's own key for a BYOK route (sealed at rest)
GET  /v2/byok, DELETE /v2/byok/{route}
"""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from profiles.model import RouteKind, RouteSpec
from zumik_serve.api.body import read_body
from zumik_serve.api.deps import pipeline_of, tenant_of
from zumik_serve.api.lists import page_response
from zumik_serve.api.v1.wire import parse_json_body
from zumik_serve.errors import InvalidRequestError, NotFoundError
from zumik_serve.pipeline.context import GatewayContext
from zumik_serve.providers.requests import ByokKeyBody
from zumik_serve.routing.release import Release
from zumik_serve.routing.requests import PublishRelease, alias_name, decision_page_query
from zumik_serve.routing.service import RoutingService

router = APIRouter(prefix="/v2")
BYOK_BODY_MAX_BYTES = 4096


async def _tenant(request: Request) -> tuple[str, GatewayContext]:
    """The authenticated tenant's id (401 without a known key) and the gateway's context."""
    tenant = await tenant_of(request)
    return tenant.id, pipeline_of(request).context


@router.post("/aliases/{alias}/releases", status_code=201)
async def publish_release(alias: str, request: Request) -> JSONResponse:
    tenant, context = await _tenant(request)
    raw = await read_body(request, context.max_body_bytes)
    body = parse_json_body(raw) if raw.strip() else {}
    name = alias_name(alias)  # a bad path is named before the body's fields
    release = await context.routing.publish(tenant, name, PublishRelease.parse(body))
    return JSONResponse(release.to_json(), status_code=201)


@router.get("/aliases/{alias}")
async def read_alias(alias: str, request: Request) -> JSONResponse:
    tenant, context = await _tenant(request)
    state = await context.routing.alias(tenant, alias)
    return JSONResponse({
        "alias": state.name,
        "object": "alias",
        "current": None if state.current is None else _as_stored(state.current),
        "history": [_as_stored(release) for release in state.history],
    })  # fmt: skip


@router.get("/decisions")
async def list_decisions(
    request: Request, limit: str | None = None, after: str | None = None
) -> JSONResponse:
    """The tenant's decisions, newest first, ``limit`` a page (1..100, default 20), ``after``
    the ``last_id`` of the page before."""
    tenant, context = await _tenant(request)
    count, cursor = decision_page_query(limit, after)
    page = await context.state.store_call(context.routing.decisions(tenant, limit=count, after=cursor))
    data = [
        {"id": item, "object": "decision", "record": stored.record, "attempts": list(stored.attempts)}
        for item, stored in zip(page.ids, page.decisions, strict=True)
    ]
    return page_response(data, has_more=page.has_more)


@router.get("/decisions/{decision_id}")
async def read_decision(decision_id: str, request: Request) -> JSONResponse:
    tenant, context = await _tenant(request)
    stored = await context.routing.decision(tenant, decision_id)
    return JSONResponse(
        {"id": decision_id, "object": "decision", "record": stored.record, "attempts": list(stored.attempts)}
    )


@router.post("/decisions/{decision_id}/replay")
async def replay_decision(decision_id: str, request: Request) -> JSONResponse:
    tenant, context = await _tenant(request)
    replayed = await context.routing.replay(tenant, decision_id)
    return JSONResponse(
        {"decision_id": replayed.decision_id, "equal": replayed.equal, "record": replayed.record}
    )


@router.get("/profiles")
async def list_profiles(request: Request) -> JSONResponse:
    tenant = await tenant_of(request)
    served = request.app.state.pipelines  # every profile this gateway serves, by name
    names = [name for name in served if tenant.profiles is None or name in tenant.profiles]
    described = [served[name].context.routing.describe_profile() for name in names]
    return JSONResponse({"object": "list", "data": described})


@router.put("/byok/{route}")
async def put_byok_key(route: str, request: Request) -> JSONResponse:
    tenant, context = await _tenant(request)
    _byok_route(context.routing, route)
    body = ByokKeyBody.parse(parse_json_body(await read_body(request, BYOK_BODY_MAX_BYTES)))
    store = await context.byok.store()
    stored = await store.put(tenant, route, body.api_key.get_secret_value())
    return JSONResponse({"object": "byok_key", **stored.to_json(), "stored_at": int(time.time())})


@router.get("/byok")
async def list_byok_keys(request: Request) -> JSONResponse:
    tenant, context = await _tenant(request)
    store = await context.byok.store()
    return JSONResponse(
        {"object": "list", "data": [entry.to_json() for entry in await store.describe(tenant)]}
    )


@router.delete("/byok/{route}")
async def delete_byok_key(route: str, request: Request) -> JSONResponse:
    tenant, context = await _tenant(request)
    _byok_route(context.routing, route)
    store = await context.byok.store()
    if not await store.delete(tenant, route):
        raise NotFoundError(f"No key is stored for route '{route}'.", code="byok_key_not_found")
    return JSONResponse({"route": route, "deleted": True})


def _as_stored(release: Release) -> dict[str, Any]:
    """A release as an alias view shows it: as it is stored (canonical JSON, keys sorted)."""
    parsed: dict[str, Any] = json.loads(release.canonical_json())
    return parsed


def _byok_route(routing: RoutingService, route: str) -> RouteSpec:
    for spec in routing.profile.effective_routes():
        if spec.name == route and spec.kind is RouteKind.BYOK:
            return spec
    names = [r.name for r in routing.profile.effective_routes() if r.kind is RouteKind.BYOK] or ["(none)"]
    raise NotFoundError(
        f"'{route}' is not a BYOK route of this profile; BYOK routes: {', '.join(names)}.",
        code="route_not_found",
    )


@router.get("/reuse")
async def reuse_report(
    request: Request, group_by: str = "tenant", window_s: str = "3600", series: str = "false"
) -> JSONResponse:
    """Sums per group; with ``series=true`` also the minute-by-minute points (for plots)."""
    tenant, context = await _tenant(request)
    if not (window_s.isascii() and window_s.isdigit()):
        raise InvalidRequestError("window_s must be a whole number of seconds.", param="window_s")
    reuse, state = context.reuse, context.state
    report = await state.store_call(reuse.report(tenant, group_by=group_by, window_s=int(window_s)))
    if series == "true":
        report["series"] = await state.store_call(
            reuse.series(tenant, group_by=group_by, window_s=int(window_s))
        )
    return JSONResponse(report)
