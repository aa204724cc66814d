"""/v2 purge and receipts: ``POST /v2/purge``, ``GET /v2/receipts`` (the tenant's receipt log, newest
first, a page at a time), ``GET /v2/receipts/{id}``, ``GET /v2/keys``.

A finished purge answers 200 with its signed receipt. One that could not finish (a store was
unreachable) answers 202 with the steps it finished and no receipt; sending the same request
again resumes it, and Zumik also resumes it on start. The body is ``purge/requests.py``'s
``PurgeRequest`` (a 400 naming the field otherwise); the work is ``purge/service.py``'s.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from zumik_serve.api.body import read_body
from zumik_serve.api.deps import pipeline_of, tenant_of
from zumik_serve.api.lists import page_response
from zumik_serve.api.v1.wire import parse_json_body
from zumik_serve.ids import HandleKind
from zumik_serve.purge.job import PurgeJob
from zumik_serve.purge.requests import parse_purge_request
from zumik_serve.purge.service import PurgeService
from zumik_serve.validation import page_query

router = APIRouter(prefix="/v2")
RETRY_INCOMPLETE_S = 5


def _purges(request: Request) -> PurgeService:
    return pipeline_of(request).context.purges


@router.post("/purge")
async def purge(request: Request) -> JSONResponse:
    tenant = await tenant_of(request)
    max_bytes = pipeline_of(request).context.max_body_bytes
    body = parse_purge_request(parse_json_body(await read_body(request, max_bytes)))
    outcome = await _purges(request).purge(tenant.id, body.target)
    if outcome.receipt is not None:
        return JSONResponse({"receipt": outcome.receipt})
    return JSONResponse(
        {"receipt": None, "purge": _progress(outcome.job)},
        status_code=202,
        headers={"retry-after": str(RETRY_INCOMPLETE_S)},
    )


@router.get("/receipts")
async def list_receipts(request: Request, limit: str | None = None, after: str | None = None) -> JSONResponse:
    """The tenant's receipts, newest first, ``limit`` a page (1..100, default 20), ``after`` the
    ``last_id`` of the page before. Each is the signed receipt as issued; together the pages are
    the tenant's chain (``seq``, ``prev_receipt_hash``), which ``zumik receipt verify`` checks."""
    tenant = await tenant_of(request)
    count, cursor = page_query(limit, after, HandleKind.RECEIPT, "receipt")
    state = pipeline_of(request).context.state
    page = await state.store_call(_purges(request).receipts(tenant.id, count, cursor))
    return page_response(page.receipts, has_more=page.has_more)


@router.get("/receipts/{receipt_id}")
async def read_receipt(receipt_id: str, request: Request) -> JSONResponse:
    tenant = await tenant_of(request)
    state = pipeline_of(request).context.state
    return JSONResponse(await state.store_call(_purges(request).receipt(tenant.id, receipt_id)))


@router.get("/keys")
async def public_keys(request: Request) -> JSONResponse:
    await tenant_of(request)
    return JSONResponse({"keys": await _purges(request).public_keys()})


def _progress(job: PurgeJob) -> dict[str, Any]:
    return {
        "id": job.id,
        "target": job.target,
        "status": job.status.value,
        "steps_done": [step.value for step in job.done],
        "error": job.error,
        "message": "The purge is not finished and no receipt was issued. Send the same request "
        f"again in {RETRY_INCOMPLETE_S} s to resume it; Zumik also resumes it when it starts.",
    }
