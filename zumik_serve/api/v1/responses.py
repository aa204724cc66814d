"""/v1/responses: OpenAI's Responses API over the same pipeline as chat, stored as sessions.

    POST   /v1/responses          parse ─► previous conversation ─► chat body ─► Pipeline.run
                                  ─► Response (or its stream of events) ─► stored (store=true)
    GET    /v1/responses/{id}     the stored Response
    DELETE /v1/responses/{id}     deleted

The translation is ``zumik_serve/responses`` (wire), the storage ``responses/service.py``. Like
every /v1 route, no Zumik field enters a body: the session that holds a stored chain is the
``x-zumik-session`` header (purge it on /v2 to remove the whole chain with a receipt).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from zumik_serve.api import headers as zumik_headers
from zumik_serve.api.body import read_body
from zumik_serve.api.deps import pipeline_of, tenant_of
from zumik_serve.api.v1.handlers import (
    StreamFault,
    admit,
    engine_stream,
    generation_headers,
    release_when_sent,
)
from zumik_serve.api.v1.wire import parse_json_body, prepare_request
from zumik_serve.engines.protocol import EngineCall
from zumik_serve.errors import InvalidRequestError, ZumikError
from zumik_serve.pipeline.pipeline import Pipeline
from zumik_serve.pipeline.request import (
    Admission,
    Completion,
    Generation,
    GenerationRequest,
    StateRefs,
    Surface,
)
from zumik_serve.responses.service import Previous, ResponsesService
from zumik_serve.responses.wire import (
    ResponseHead,
    ResponsesRequest,
    StreamTranslator,
    chat_body,
    input_history,
    output_history,
    parse_request,
    render_response,
    sse,
)
from zumik_serve.telemetry.tracing import RequestClock
from zumik_serve.tenancy.tenant import Tenant

router = APIRouter(prefix="/v1")


@router.post("/responses")
async def create_response(request: Request) -> Response:
    clock = RequestClock()
    pipeline = pipeline_of(request)
    tenant = await tenant_of(request)
    parsed = parse_request(parse_json_body(await read_body(request, pipeline.context.max_body_bytes)))
    admission = await admit(pipeline, tenant, request, clock)  # the body is in: no slot waits on it
    profile = zumik_headers.requested_profile(request.headers)
    try:
        pipeline.check_profile(tenant, profile)  # before a stored conversation is read
        responses = pipeline.context.responses
        previous = None
        if parsed.previous_response_id is not None:
            previous = await responses.previous(tenant.id, parsed.previous_response_id)
        prepared = prepare_request(EngineCall.CHAT, chat_body(parsed, previous.messages if previous else ()))
        generation = await pipeline.run(
            GenerationRequest(
                tenant=tenant,
                surface=Surface.V1,
                call=EngineCall.CHAT,
                model=prepared.model,
                body=prepared.engine_body,
                stream=prepared.stream,
                refs=StateRefs(
                    release=previous.record.release if previous is not None else None,
                    carried=(previous.record.session,) if previous is not None else (),
                ),
                admission=admission,
                clock=clock,
                hints=prepared.hints,
                profile=profile,
            )  # fmt: skip
        )
        head = ResponseHead(
            id=ResponsesService.new_id(),
            model=generation.model,
            created_at=clock.started_ns // 10**9,
            request=parsed,
        )
        headers = generation_headers(generation)
        if not prepared.stream:
            rendered = render_response(head, generation.answer, completed_at=int(time.time()))
            if parsed.store:
                headers[zumik_headers.SESSION] = await _store(
                    pipeline, tenant, parsed, generation, rendered, previous
                )
            if generation.figures is not None:
                headers.update(zumik_headers.reuse_headers(generation.figures))
            admission.release()
            return JSONResponse(
                rendered, headers=headers, background=BackgroundTask(pipeline.sent, generation)
            )
    except BaseException:
        admission.release()
        raise
    return StreamingResponse(
        _events(pipeline, tenant, generation, head, previous, admission),
        media_type="text/event-stream",
        headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        background=release_when_sent(admission),
    )


@router.get("/responses/{response_id}")
async def retrieve_response(response_id: str, request: Request) -> JSONResponse:
    tenant = await tenant_of(request)
    for name in ("stream", "starting_after", "include_obfuscation"):
        if request.query_params.get(name) not in (None, "", "false"):
            raise InvalidRequestError(f"'{name}' is not supported on GET /v1/responses/{{id}}.", param=name)
    if request.query_params.getlist("include"):
        raise InvalidRequestError(
            "'include' is not supported: no extra output data is kept.", param="include"
        )
    record = await pipeline_of(request).context.responses.get(tenant.id, response_id)
    return JSONResponse(record.body, headers={zumik_headers.SESSION: record.session})


@router.delete("/responses/{response_id}")
async def delete_response(response_id: str, request: Request) -> Response:
    """200 with no body, as the spec declares it (the SDK's ``responses.delete`` returns None)."""
    tenant = await tenant_of(request)
    await pipeline_of(request).context.responses.delete(tenant.id, response_id)
    return Response(status_code=200)


async def _store(
    pipeline: Pipeline,
    tenant: Tenant,
    parsed: ResponsesRequest,
    generation: Generation,
    rendered: dict[str, Any],
    previous: Previous | None,
) -> str:
    """Store a finished response (with the release it ran under); the session or branch that
    holds its conversation."""
    added = [*input_history(parsed), *output_history(rendered["output"])]
    record = await pipeline.context.responses.save(
        tenant.id, response_id=rendered["id"], body=rendered, added=added, previous=previous,
        release=generation.release.id if generation.release is not None else None,
    )  # fmt: skip
    # The conversation went to the route before its session held it: a provider's copy is
    # recorded against the session now, so a purge of it names that provider.
    await pipeline.carried(tenant, generation, (record.session,))
    return record.session


async def _events(
    pipeline: Pipeline,
    tenant: Tenant,
    generation: Generation,
    head: ResponseHead,
    previous: Previous | None,
    admission: Admission,
) -> AsyncIterator[bytes]:
    """The Responses events of one streamed generation. A failure after the first event is
    ``response.failed`` (the engine's or Zumik's) or ``error`` (the request's), never a made-up
    completion; a response is stored only once completed or incomplete."""
    translator = StreamTranslator(head)
    reply: list[str] = []
    usage: dict[str, Any] | None = None
    ended = False
    try:
        for event in translator.start():
            yield sse(event)
        async for item in engine_stream(pipeline, generation):
            if isinstance(item, StreamFault):
                status = str(item.error.get("code"))
                code = int(status) if status.isdigit() else 500
                for event in _failure(
                    translator, code, str(item.error.get("message")), item.error.get("param")
                ):
                    yield sse(event)
                return
            usage = item.get("usage") or usage
            for choice in item.get("choices") or []:
                if choice.get("index", 0) == 0:
                    reply.append((choice.get("delta") or {}).get("content") or "")
            for event in translator.feed(item):
                yield sse(event)
        finished = translator.finish(int(time.time()))
        ended = True
        final = finished[-1]["response"]
        await pipeline.finish(generation, Completion("".join(reply), usage))
        if head.request.store:
            await _store(pipeline, tenant, head.request, generation, final, previous)
        for event in finished:
            yield sse(event)
    except ZumikError as exc:
        if not ended:
            for event in _failure(translator, exc.status, exc.message, exc.param):
                yield sse(event)
    except Exception as exc:  # the replica died or the handle broke mid-stream
        if not ended:
            message = (
                f"The engine failed while streaming ({type(exc).__name__}); the output is incomplete. "
                "Retry the request."
            )
            for event in translator.fail(message):
                yield sse(event)
    finally:
        admission.release()
        await pipeline.sent(generation)


def _failure(translator: StreamTranslator, status: int, message: str, param: Any) -> list[dict[str, Any]]:
    """A fault of the request (4xx) is an ``error`` event; any other ends as ``response.failed``."""
    if 400 <= status < 500:
        return translator.error(message, code=None, param=param if isinstance(param, str) else None)
    return translator.fail(message)
