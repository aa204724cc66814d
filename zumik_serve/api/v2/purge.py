"""/v2 purge and receipts: ``POST /v2/purge``, ``GET /v2/receipts/{id}``, ``GET /v2/keys``.

A finished purge answers 200 with its signed receipt. One that could not finish (a store was
unreachable) answers 202 with the steps it finished and no receipt; sending the same request
again resumes it, and Zumik also resumes it on start.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from zumik_serve.api.body import read_body
from zumik_serve.api.v1.wire import parse_json_body
from zumik_serve.errors import InvalidRequestError
from zumik_serve.pipeline.service import GatewayService
from zumik_serve.purge.service import PurgeService

router = APIRouter(prefix="/v2")
RETRY_INCOMPLETE_S = 5


def _purges(request: Request) -> tuple[GatewayService, PurgeService]:
    return request.app.state.service, request.app.state.purge_service


@router.post("/purge")
async def purge(request: Request) -> JSONResponse:
    service, purges = _purges(request)
    tenant = await service.authenticate(request.headers.get("authorization"))
    body = parse_json_body(await read_body(request, request.app.state.max_body_bytes))
    unknown = sorted(set(body) - {"target"})
    if unknown:
        raise InvalidRequestError(f"unknown field '{unknown[0]}'; allowed fields: target", param=unknown[0])
    if "target" not in body:
        raise InvalidRequestError("'target' is required: the id of the object to purge.", param="target")
    outcome = await purges.purge(tenant.id, body["target"])
    if outcome.receipt is not None:
        return JSONResponse({"receipt": outcome.receipt})
    return JSONResponse(
        {"receipt": None, "purge": _progress(outcome.job)},
        status_code=202,
        headers={"retry-after": str(RETRY_INCOMPLETE_S)},
    )


@router.get("/receipts/{receipt_id}")
async def read_receipt(receipt_id: str, request: Request) -> JSONResponse:
    service, purges = _purges(request)
    tenant = await service.authenticate(request.headers.get("authorization"))
    return JSONResponse(await purges.receipt(tenant.id, receipt_id))


@router.get("/keys")
async def public_keys(request: Request) -> JSONResponse:
    service, purges = _purges(request)
    await service.authenticate(request.headers.get("authorization"))
    return JSONResponse({"keys": await purges.public_keys()})


def _progress(job: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": job["id"],
        "target": job["target"],
        "status": job["status"],
        "steps_done": list(job["done"]),
        "error": job.get("error"),
        "message": "The purge is not finished and no receipt was issued. Send the same request "
        f"again in {RETRY_INCOMPLETE_S} s to resume it; Zumik also resumes it when it starts.",
    }
