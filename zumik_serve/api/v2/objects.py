"""/v2 state objects: artifacts, bundles, sessions, branches and snapshots, by opaque handle, and
each kind's list (``GET /v2/{kind}``: the tenant's live ones, newest first, a page at a time).

Handlers authenticate, read the body (with the size limit of the route), validate it into its
request model (``state/requests.py``: a 400 naming the field), call the state service and return
its native JSON. Errors are ``{"error": {"type", "message", ...}}``.
"""

from __future__ import annotations

from typing import TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from zumik_serve.api.body import read_body
from zumik_serve.api.deps import pipeline_of, tenant_of
from zumik_serve.api.lists import page_response
from zumik_serve.api.v1.wire import parse_json_body
from zumik_serve.api.v2.models import WarmBody, parse_model
from zumik_serve.errors import InvalidRequestError, MethodNotAllowedError
from zumik_serve.state.objects import ObjectKind
from zumik_serve.state.requests import (
    AppendTurn,
    CreateArtifact,
    CreateBranch,
    CreateBundle,
    CreateSession,
    CreateSnapshot,
    StateRequest,
    parse_request,
)
from zumik_serve.state.service import KIND_HANDLES, StateService
from zumik_serve.telemetry.tracing import RequestClock
from zumik_serve.validation import page_query

router = APIRouter(prefix="/v2")

M = TypeVar("M", bound=StateRequest)
IDEMPOTENCY_HEADER = "idempotency-key"
MAX_IDEMPOTENCY_KEY_CHARS = 255


def _state(request: Request) -> StateService:
    return pipeline_of(request).context.state


async def _write(request: Request, model: type[M], max_bytes: int | None = None) -> tuple[str, M, str | None]:
    """The tenant, the body as ``model`` and the Idempotency-Key of a write. Checked in the order
    a client sees the errors: the API key, the body's size and JSON, the key, the body's fields."""
    tenant = await tenant_of(request)
    limit = max_bytes if max_bytes is not None else pipeline_of(request).context.max_body_bytes
    body = parse_json_body(await read_body(request, limit))
    idem_key = _idem_key(request)
    return tenant.id, parse_request(model, body), idem_key


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
    state = _state(request)
    # base64 and JSON framing on top of the content limit; the content itself is checked after.
    max_bytes = state.max_artifact_bytes * 4 // 3 + 64 * 1024
    tenant, body, idem_key = await _write(request, CreateArtifact, max_bytes)
    return JSONResponse(await state.store_call(state.create_artifact(tenant, body, idem_key)), 201)


@router.post("/bundles", status_code=201)
async def create_bundle(request: Request) -> JSONResponse:
    state = _state(request)
    tenant, body, idem_key = await _write(request, CreateBundle)
    return JSONResponse(await state.store_call(state.create_bundle(tenant, body, idem_key)), 201)


@router.post("/sessions", status_code=201)
async def create_session(request: Request) -> JSONResponse:
    state = _state(request)
    tenant, body, idem_key = await _write(request, CreateSession)
    return JSONResponse(await state.store_call(state.create_session(tenant, body, idem_key)), 201)


@router.post("/sessions/{handle}/turns", status_code=201)
@router.post("/branches/{handle}/turns", status_code=201)
async def append_turn(handle: str, request: Request) -> JSONResponse:
    state = _state(request)
    tenant, body, idem_key = await _write(request, AppendTurn)
    return JSONResponse(await state.store_call(state.append_turn(tenant, handle, body, idem_key)), 201)


@router.post("/sessions/{handle}/branches", status_code=201)
@router.post("/branches/{handle}/branches", status_code=201)
async def create_branch(handle: str, request: Request) -> JSONResponse:
    state = _state(request)
    tenant, body, idem_key = await _write(request, CreateBranch)
    return JSONResponse(await state.store_call(state.create_branch(tenant, handle, body, idem_key)), 201)


@router.post("/snapshots", status_code=201)
async def create_snapshot(request: Request) -> JSONResponse:
    state = _state(request)
    tenant, body, idem_key = await _write(request, CreateSnapshot)
    return JSONResponse(await state.store_call(state.create_snapshot(tenant, body, idem_key)), 201)


@router.post("/snapshots/{handle}/compile")
async def compile_snapshot(handle: str, request: Request) -> JSONResponse:
    """Compiling tokenizes the whole snapshot: it takes an admission slot like generation does
    (an optional body ``{"qos", "timeout_s"}``, as for ``/warm``), once the body is read."""
    clock = RequestClock()
    pipeline, state = pipeline_of(request), _state(request)
    tenant = await tenant_of(request)
    raw = await read_body(request, pipeline.context.max_body_bytes)
    body = parse_model(WarmBody, parse_json_body(raw) if raw.strip() else {})
    admission = await pipeline.admit(tenant, qos=body.qos, timeout_s=body.timeout_s, clock=clock)
    try:
        tokenizer = pipeline.context.models.tokenizer()
        compiled = await admission.deadline.run(
            state.store_call(state.compile_snapshot(tenant.id, handle, tokenizer))
        )
    finally:
        admission.release()
    return JSONResponse({"snapshot": handle, **compiled.compilation.record()})


def _list_route(kind: ObjectKind) -> None:
    async def list_objects(
        request: Request, limit: str | None = None, after: str | None = None
    ) -> JSONResponse:
        state = _state(request)
        tenant = await tenant_of(request)
        count, cursor = page_query(limit, after, KIND_HANDLES[kind], KIND_HANDLES[kind].name.lower())
        page = await state.store_call(state.list_page(tenant.id, kind, count, cursor))
        return page_response(page.data, has_more=page.has_more)

    list_objects.__doc__ = (
        f"The tenant's live {kind.value}, newest first, ``limit`` a page (1..100, default 20), "
        "``after`` the ``last_id`` of the page before; each as a read shows it, without content."
    )
    router.add_api_route(f"/{kind.value}", list_objects, methods=["GET"], name=f"list_{kind.value}")


for _kind in ObjectKind:
    _list_route(_kind)


@router.get("/{kind}/{handle}")
async def read_object(kind: ObjectKind, handle: str, request: Request) -> JSONResponse:
    state = _state(request)
    tenant = await tenant_of(request)
    return JSONResponse(await state.store_call(state.read(tenant.id, kind, handle)))


@router.delete("/{kind}/{handle}")
async def revoke_object(kind: ObjectKind, handle: str, request: Request) -> JSONResponse:
    state = _state(request)
    tenant = await tenant_of(request)
    return JSONResponse(await state.store_call(state.revoke(tenant.id, kind, handle)))


@router.api_route("/{kind}/{handle}", methods=["PUT", "PATCH", "POST"])
async def mutate_object(kind: ObjectKind, handle: str, request: Request) -> JSONResponse:
    await tenant_of(request)
    how = (
        "append turns with POST /v2/{kind}/{id}/turns or fork with .../branches"
        if kind in (ObjectKind.SESSIONS, ObjectKind.BRANCHES)
        else "create a new object instead"
    ).replace("{kind}", kind.value)
    raise MethodNotAllowedError(f"{kind.value} cannot be modified in place; {how}.")
