"""/v2: the native surface. Objects with opaque handles, revocation, and generation from snapshots.

Handlers authenticate, read the body (with the size limit of the route), call the state service
or the gateway service, and return native JSON. Errors are ``{"error": {"type", "message", ...}}``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from zumik_serve.api.body import read_body
from zumik_serve.api.v1.wire import parse_json_body
from zumik_serve.errors import InvalidRequestError, MethodNotAllowedError
from zumik_serve.pipeline.service import GatewayService
from zumik_serve.state.objects import ObjectKind
from zumik_serve.state.service import StateService

router = APIRouter(prefix="/v2")

IDEMPOTENCY_HEADER = "idempotency-key"
MAX_IDEMPOTENCY_KEY_CHARS = 255


def _services(request: Request) -> tuple[GatewayService, StateService]:
    return request.app.state.service, request.app.state.state_service


async def _tenant_and_body(request: Request, max_bytes: int | None = None) -> tuple[str, dict[str, Any]]:
    service, _ = _services(request)
    tenant = await service.authenticate(request.headers.get("authorization"))
    limit = max_bytes if max_bytes is not None else request.app.state.max_body_bytes
    body = parse_json_body(await read_body(request, limit))
    return tenant.id, body


def _idem_key(request: Request) -> str | None:
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        return None
    if not key or len(key) > MAX_IDEMPOTENCY_KEY_CHARS:
        raise InvalidRequestError(
            f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY_CHARS} characters.", param=IDEMPOTENCY_HEADER
        )
    return key


@router.post("/artifacts", status_code=201)
async def create_artifact(request: Request) -> JSONResponse:
    _, state = _services(request)
    # base64 and JSON framing on top of the content limit; the content itself is checked after.
    tenant, body = await _tenant_and_body(request, max_bytes=state.max_artifact_bytes * 4 // 3 + 64 * 1024)
    return JSONResponse(await state.store_call(state.create_artifact(tenant, body, _idem_key(request))), 201)


@router.post("/bundles", status_code=201)
async def create_bundle(request: Request) -> JSONResponse:
    _, state = _services(request)
    tenant, body = await _tenant_and_body(request)
    return JSONResponse(await state.store_call(state.create_bundle(tenant, body, _idem_key(request))), 201)


@router.post("/sessions", status_code=201)
async def create_session(request: Request) -> JSONResponse:
    _, state = _services(request)
    tenant, body = await _tenant_and_body(request)
    return JSONResponse(await state.store_call(state.create_session(tenant, body, _idem_key(request))), 201)


@router.post("/sessions/{handle}/turns", status_code=201)
@router.post("/branches/{handle}/turns", status_code=201)
async def append_turn(handle: str, request: Request) -> JSONResponse:
    _, state = _services(request)
    tenant, body = await _tenant_and_body(request)
    return JSONResponse(
        await state.store_call(state.append_turn(tenant, handle, body, _idem_key(request))), 201
    )


@router.post("/sessions/{handle}/branches", status_code=201)
@router.post("/branches/{handle}/branches", status_code=201)
async def create_branch(handle: str, request: Request) -> JSONResponse:
    _, state = _services(request)
    tenant, body = await _tenant_and_body(request)
    return JSONResponse(
        await state.store_call(state.create_branch(tenant, handle, body, _idem_key(request))), 201
    )


@router.post("/snapshots", status_code=201)
async def create_snapshot(request: Request) -> JSONResponse:
    _, state = _services(request)
    tenant, body = await _tenant_and_body(request)
    return JSONResponse(await state.store_call(state.create_snapshot(tenant, body, _idem_key(request))), 201)


@router.post("/snapshots/{handle}/compile")
async def compile_snapshot(handle: str, request: Request) -> JSONResponse:
    service, state = _services(request)
    tenant = await service.authenticate(request.headers.get("authorization"))
    compiled = await state.store_call(state.compile_snapshot(tenant.id, handle, service.tokenizer()))
    return JSONResponse({"snapshot": handle, **compiled.compilation.record()})


@router.get("/{kind}/{handle}")
async def read_object(kind: ObjectKind, handle: str, request: Request) -> JSONResponse:
    service, state = _services(request)
    tenant = await service.authenticate(request.headers.get("authorization"))
    return JSONResponse(await state.store_call(state.read(tenant.id, kind, handle)))


@router.delete("/{kind}/{handle}")
async def revoke_object(kind: ObjectKind, handle: str, request: Request) -> JSONResponse:
    service, state = _services(request)
    tenant = await service.authenticate(request.headers.get("authorization"))
    return JSONResponse(await state.store_call(state.revoke(tenant.id, kind, handle)))


@router.api_route("/{kind}/{handle}", methods=["PUT", "PATCH", "POST"])
async def mutate_object(kind: ObjectKind, handle: str, request: Request) -> JSONResponse:
    service, _ = _services(request)
    await service.authenticate(request.headers.get("authorization"))
    how = (
        "append turns with POST /v2/{kind}/{id}/turns or fork with .../branches"
        if kind in (ObjectKind.SESSIONS, ObjectKind.BRANCHES)
        else "create a new object instead"
    ).replace("{kind}", kind.value)
    raise MethodNotAllowedError(f"{kind.value} cannot be modified in place; {how}.")
