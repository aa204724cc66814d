"""/v2 routing: aliases and releases, decision records and replay, profiles, tenants' own keys.

POST /v2/aliases/{name}/releases   publish a release and point the alias at it → 201
GET  /v2/aliases/{name}            the current release and the alias' history
GET  /v2/decisions/{id}            a decision record and the attempts that carried it out
POST /v2/decisions/{id}/replay     recompute it from its recorded inputs → {"equal", "record"}
GET  /v2/profiles                  the profile served here: routes, policy, purge ceiling
PUT  /v2/byok/{route}              store the tenant's own key for a BYOK route (sealed at rest)
GET  /v2/byok, DELETE /v2/byok/{route}
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from profiles.model import RouteKind
from zumik_serve.api.body import read_body
from zumik_serve.api.v1.wire import parse_json_body
from zumik_serve.errors import InvalidRequestError, NotFoundError
from zumik_serve.pipeline.service import GatewayService
from zumik_serve.routing.service import RoutingService

router = APIRouter(prefix="/v2")
MAX_API_KEY_CHARS = 512


async def _tenant(request: Request) -> tuple[str, RoutingService]:
    service: GatewayService = request.app.state.service
    tenant = await service.authenticate(request.headers.get("authorization"))
    return tenant.id, request.app.state.routing


@router.post("/aliases/{alias}/releases", status_code=201)
async def publish_release(alias: str, request: Request) -> JSONResponse:
    tenant, routing = await _tenant(request)
    raw = await read_body(request, request.app.state.max_body_bytes)
    body = parse_json_body(raw) if raw.strip() else {}
    return JSONResponse(await routing.publish(tenant, alias, body), status_code=201)


@router.get("/aliases/{alias}")
async def read_alias(alias: str, request: Request) -> JSONResponse:
    tenant, routing = await _tenant(request)
    return JSONResponse(await routing.alias(tenant, alias))


@router.get("/decisions/{decision_id}")
async def read_decision(decision_id: str, request: Request) -> JSONResponse:
    tenant, routing = await _tenant(request)
    stored = await routing.decision(tenant, decision_id)
    return JSONResponse({"id": decision_id, "object": "decision", **stored})


@router.post("/decisions/{decision_id}/replay")
async def replay_decision(decision_id: str, request: Request) -> JSONResponse:
    tenant, routing = await _tenant(request)
    return JSONResponse(await routing.replay(tenant, decision_id))


@router.get("/profiles")
async def list_profiles(request: Request) -> JSONResponse:
    _, routing = await _tenant(request)
    return JSONResponse({"object": "list", "data": [routing.describe_profile()]})


@router.put("/byok/{route}")
async def put_byok_key(route: str, request: Request) -> JSONResponse:
    tenant, routing = await _tenant(request)
    _byok_route(routing, route)
    body = parse_json_body(await read_body(request, 4096))
    api_key = body.get("api_key")
    if set(body) != {"api_key"} or not isinstance(api_key, str) or not 0 < len(api_key) <= MAX_API_KEY_CHARS:
        raise InvalidRequestError(
            f'send {{"api_key": "<your provider key>"}} (1-{MAX_API_KEY_CHARS} characters).', param="api_key"
        )
    store = await request.app.state.byok.store()
    await store.put(tenant, route, api_key)
    entry = next(e for e in await store.describe(tenant) if e["route"] == route)
    return JSONResponse({"object": "byok_key", **entry, "stored_at": int(time.time())})


@router.get("/byok")
async def list_byok_keys(request: Request) -> JSONResponse:
    tenant, _ = await _tenant(request)
    store = await request.app.state.byok.store()
    return JSONResponse({"object": "list", "data": await store.describe(tenant)})


@router.delete("/byok/{route}")
async def delete_byok_key(route: str, request: Request) -> JSONResponse:
    tenant, routing = await _tenant(request)
    _byok_route(routing, route)
    store = await request.app.state.byok.store()
    if not await store.delete(tenant, route):
        raise NotFoundError(f"No key is stored for route '{route}'.", code="byok_key_not_found")
    return JSONResponse({"route": route, "deleted": True})


def _byok_route(routing: RoutingService, route: str) -> Any:
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
    tenant, _ = await _tenant(request)
    if not (window_s.isascii() and window_s.isdigit()):
        raise InvalidRequestError("window_s must be a whole number of seconds.", param="window_s")
    reuse = request.app.state.reuse
    state = request.app.state.state_service
    report = await state.store_call(reuse.report(tenant, group_by=group_by, window_s=int(window_s)))
    if series == "true":
        report["series"] = await state.store_call(
            reuse.series(tenant, group_by=group_by, window_s=int(window_s))
        )
    return JSONResponse(report)
