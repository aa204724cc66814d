"""/v1: the OpenAI-compatible surface. Handlers read, call the service, render; nothing more."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from zumik_serve.api import zumik_headers
from zumik_serve.api.body import read_body
from zumik_serve.api.openai_wire import (
    PreparedRequest,
    StreamRenderer,
    parse_json_body,
    prepare_request,
    render_chat_completion,
    render_completion,
    render_error,
    render_stream_error,
)
from zumik_serve.engines.protocol import EngineCall, EngineChunks, EngineFailure, EngineResponse
from zumik_serve.errors import EngineError, NotFoundError, ZumikError
from zumik_serve.service import EngineRun, GatewayService, parse_stream_error

router = APIRouter(prefix="/v1")


def _service(request: Request) -> GatewayService:
    return request.app.state.service  # type: ignore[no-any-return]


@router.get("/models")
async def list_models(request: Request) -> JSONResponse:
    service = _service(request)
    await service.authenticate(request.headers.get("authorization"))
    data = [_model_object(model.id, model.created_s, model.owned_by) for model in service.models]
    return JSONResponse({"object": "list", "data": data})


@router.get("/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> JSONResponse:
    service = _service(request)
    await service.authenticate(request.headers.get("authorization"))
    for model in service.models:
        if model.id == model_id:
            return JSONResponse(_model_object(model.id, model.created_s, model.owned_by))
    raise NotFoundError(
        f"The model '{model_id}' does not exist. GET /v1/models lists the models you can use.",
        param="model",
        code="model_not_found",
    )


@router.post("/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await _generate(request, EngineCall.CHAT)


@router.post("/completions")
async def completions(request: Request) -> Response:
    return await _generate(request, EngineCall.COMPLETION)


async def _generate(request: Request, call: EngineCall) -> Response:
    service = _service(request)
    await service.authenticate(request.headers.get("authorization"))
    body = parse_json_body(await read_body(request, request.app.state.max_body_bytes))
    prepared = prepare_request(call, body, service.served_model_ids)
    run = await service.start(call, prepared.engine_body, stream=prepared.stream)
    headers = zumik_headers.route_headers(run.decision_id, run.route)
    if not prepared.stream:
        return _whole_response(run, prepared, headers)
    return StreamingResponse(
        _sse(run, prepared),
        media_type="text/event-stream",
        headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _whole_response(run: EngineRun, prepared: PreparedRequest, headers: dict[str, str]) -> Response:
    if not isinstance(run.first, EngineResponse):
        raise EngineError("The engine streamed a response to a non-streaming request.")
    render = render_chat_completion if prepared.call is EngineCall.CHAT else render_completion
    rendered = render(run.first.body, prepared.model)
    captured = (rendered.get("usage") or {}).get("prompt_tokens_details", {}).get("cached_tokens")
    if captured is not None:
        headers = {**headers, zumik_headers.REUSE_CAPTURED_TOKENS: str(captured)}
    return JSONResponse(rendered, headers=headers)


async def _sse(run: EngineRun, prepared: PreparedRequest) -> AsyncIterator[bytes]:
    """Re-render the engine's stream; a failure after the first byte is an error event, then
    ``[DONE]`` (never a made-up ``finish_reason``)."""
    renderer = StreamRenderer(prepared.call, prepared.model, prepared.include_usage)

    async def events() -> AsyncIterator[Any]:
        yield run.first
        async for event in run.rest:
            yield event

    try:
        async for event in events():
            if isinstance(event, EngineFailure):
                failure = {"message": event.message, "type": event.type, "param": event.param}
                yield _data(render_stream_error({**failure, "code": event.status}))
                break
            if not isinstance(event, EngineChunks):
                continue
            failed = False
            for payload in event.payloads:
                if not payload or payload == "[DONE]":
                    continue
                error = parse_stream_error(payload)
                if error is not None:
                    yield _data(render_stream_error(error))
                    failed = True
                    break
                rendered = renderer.render(json.loads(payload))
                if rendered is not None:
                    yield _data(rendered)
            if failed:
                break
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


def _data(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def _model_object(model_id: str, created_s: int, owned_by: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created_s, "owned_by": owned_by}
