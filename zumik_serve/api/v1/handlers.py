"""/v1: the OpenAI-compatible surface. Handlers read, call the service, render; nothing more."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from redis.exceptions import RedisError
from starlette.background import BackgroundTask

from zumik_serve.api import headers as zumik_headers
from zumik_serve.api.body import read_body
from zumik_serve.api.limits import check_generation_limits
from zumik_serve.api.qos_http import QOS_HEADER, TIMEOUT_HEADER, Admission, Deadline, admit, exceeded
from zumik_serve.api.v1.wire import (
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
from zumik_serve.errors import EngineError, InvalidRequestError, NotFoundError, ZumikError
from zumik_serve.pipeline.service import EngineRun, GatewayService, parse_stream_error
from zumik_serve.reuse.figures import ReuseFigures
from zumik_serve.reuse.service import ReuseService
from zumik_serve.routing.dispatch import RouteContext
from zumik_serve.routing.release import Release
from zumik_serve.routing.service import RoutingService
from zumik_serve.state.service import StateService
from zumik_serve.telemetry.tracing import RequestClock, Tracing, request_phases
from zumik_serve.tenancy.tenant import Tenant

logger = logging.getLogger("ray.serve")

router = APIRouter(prefix="/v1")


def _service(request: Request) -> GatewayService:
    service: GatewayService = request.app.state.service
    return service


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
    clock = RequestClock()
    service = _service(request)
    tenant = await service.authenticate(request.headers.get("authorization"))
    # Admission comes first: an overloaded class answers 429 before the body is even read.
    admission = await admit(
        request, tenant, requested_qos=request.headers.get(QOS_HEADER),
        timeout_s=request.headers.get(TIMEOUT_HEADER), clock=clock,
        qos_param=QOS_HEADER, timeout_param=TIMEOUT_HEADER,
    )  # fmt: skip
    try:
        body = parse_json_body(await read_body(request, request.app.state.max_body_bytes))
        release = await _release(request, tenant.id, body)
        if release is not None:
            body = {**body, "model": release.model}
        prepared = prepare_request(call, body, service.served_model_ids)
        check_generation_limits(prepared.engine_body, request.app.state.limits)
        state_refs = await admission.deadline.run(_resolve_state_headers(request, tenant, prepared))
        context = RouteContext(
            release_id=release.id if release is not None else None,
            allowed_routes=frozenset(entry.name for entry in release.route_table)
            if release is not None
            else None,
            snapshot_id=state_refs.snapshot,
            qos=admission.qos.value,
            prefer_cheapest=admission.prefer_cheapest,
            engine_priority=admission.engine_priority,
            on_decided=state_refs.decided,
        )
        run = await admission.deadline.run(
            service.start(call, prepared.engine_body, stream=prepared.stream, tenant=tenant, context=context)
        )
        headers = zumik_headers.route_headers(run.decision_id, run.route)
        headers[QOS_HEADER] = admission.qos.value
        if release is not None:
            headers[zumik_headers.RELEASE] = release.id
        if state_refs.snapshot is not None:
            headers[zumik_headers.SNAPSHOT] = state_refs.snapshot
        span = _SpanInfo(request.app.state.tracing, clock, tenant.id, admission, release)
        if not prepared.stream:
            headers.update(_timing_headers(run, clock))
            response = await _whole_response(run, prepared, headers, state_refs, span)
            admission.ticket.release()
            return response
        headers.update(_timing_headers(run, clock))
        headers.update(await state_refs.account_opportunity(run))
    except BaseException:
        admission.ticket.release()
        raise
    return StreamingResponse(
        _sse(run, prepared, state_refs, admission, span),
        media_type="text/event-stream",
        headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        background=BackgroundTask(admission.ticket.release),  # also when the client left early
    )


class _SpanInfo:
    """What the request's OpenTelemetry span carries besides the run (``telemetry.Tracing``)."""

    def __init__(
        self,
        tracing: Tracing,
        clock: RequestClock,
        tenant: str,
        admission: Admission,
        release: Release | None,
    ) -> None:
        self.tracing, self.clock = tracing, clock
        self.attributes: dict[str, str | int | float | bool] = {
            "zumik.tenant": tenant,
            "zumik.qos": admission.qos.value,
            **({"zumik.release": release.id} if release is not None else {}),
        }

    def emit(self, run: EngineRun, figures_headers: dict[str, str]) -> None:
        if not self.tracing.enabled:
            return
        attributes = dict(self.attributes)
        for header, value in figures_headers.items():
            if header.startswith("x-zumik-reuse-") and header != zumik_headers.REUSE_EVIDENCE:
                attributes["zumik." + header.removeprefix("x-zumik-").replace("-", "_")] = int(value)
        self.tracing.request(run, self.clock, attributes)


def _timing_headers(run: EngineRun, clock: RequestClock) -> dict[str, str]:
    """``Server-Timing``: the gateway's phases, and the tier restore when the engine reported one."""
    phases, descriptions = request_phases(run, clock)
    if not phases:
        return {}
    return {zumik_headers.SERVER_TIMING: zumik_headers.server_timing(phases, descriptions)}


async def _release(request: Request, tenant: str, body: dict[str, Any]) -> Release | None:
    """The release the request's ``model`` (an alias, or the served model) pins."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return None
    routing: RoutingService = request.app.state.routing
    state: StateService = request.app.state.state_service
    return await state.store_call(routing.release_for_request(tenant, model))


class _StateRefs:
    """The request's ``x-zumik-snapshot`` / ``x-zumik-session``, resolved before the engine runs."""

    def __init__(
        self, state: StateService, tenant: str, snapshot: str | None, session: str | None,
        exchange: list[tuple[str, str]], reuse: ReuseService | None,
    ) -> None:  # fmt: skip
        self.state, self.tenant, self.snapshot, self.session = state, tenant, snapshot, session
        self.exchange = exchange  # the request's closing user/tool message, as (role, content)
        self.reuse = reuse  # None: the tenant keeps no reuse accounting
        self.opportunity_tokens: int | None = None
        self._lookup: asyncio.Task[int] | None = None

    def decided(self, scope: str, prefix_keys: tuple[str, ...]) -> None:
        """Start the opportunity lookup as soon as the route is decided: it runs while the engine
        works, so the answer does not wait for it."""
        if self.reuse is not None:
            self._lookup = asyncio.create_task(self.reuse.opportunity_tokens(scope, prefix_keys))

    async def account_opportunity(self, run: EngineRun) -> dict[str, str]:
        """The opportunity of this request (headers for a stream, sent before its body)."""
        if self.reuse is None:
            return {}
        try:
            if self._lookup is not None:
                self.opportunity_tokens = await self._lookup
            else:
                self.opportunity_tokens = await self.reuse.opportunity_tokens(run.scope, run.prefix_keys)
        except RedisError:
            logger.warning("zumik: reuse accounting skipped (Redis unavailable)")
            return {}
        return {zumik_headers.REUSE_OPPORTUNITY_TOKENS: str(self.opportunity_tokens)}

    async def account(self, run: EngineRun, usage: dict[str, Any] | None) -> dict[str, str]:
        """Opportunity and capture of this request, recorded in the ledger; its reuse headers."""
        if (
            self.reuse is not None
            and self.opportunity_tokens is None
            and not await self.account_opportunity(run)
        ):
            return {}
        usage = usage or {}
        figures = ReuseFigures.of(
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            opportunity_tokens=self.opportunity_tokens,  # None: the tenant keeps no accounting
            route_kind=run.route_kind,
            cached_tokens=(usage.get("prompt_tokens_details") or {}).get("cached_tokens"),
            kv_report=run.kv_report(),
        )
        if self.reuse is not None:  # written after the answer is sent (telemetry, not state)
            _in_background(
                self.reuse.record(self.tenant, figures, snapshot=self.snapshot, route=run.route_name)
            )
        return zumik_headers.reuse_headers(figures)

    async def record_reply(self, content: str) -> None:
        """Append the exchange (the request's message, then the reply) to the session, in order."""
        if self.session is None:
            return
        for role, text in [*self.exchange, ("assistant", content)]:
            turn = {"role": role, "content": text}
            await self.state.store_call(self.state.append_turn(self.tenant, self.session, turn, None))


_BACKGROUND: set[asyncio.Task[None]] = set()


def _in_background(work: Coroutine[Any, Any, None]) -> None:
    """Run ``work`` after the answer (the ledger write); failures are logged, never raised."""

    async def guarded() -> None:
        try:
            await work
        except RedisError:
            logger.warning("zumik: reuse ledger not updated (Redis unavailable)")
        except Exception:
            logger.exception("zumik: reuse ledger not updated")

    task = asyncio.create_task(guarded())
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


async def _resolve_state_headers(
    request: Request, tenant_record: Tenant, prepared: PreparedRequest
) -> _StateRefs:
    tenant = tenant_record.id
    state: StateService = request.app.state.state_service
    snapshot = request.headers.get(zumik_headers.SNAPSHOT) or None
    session = request.headers.get(zumik_headers.SESSION) or None
    if (snapshot or session) and prepared.call is not EngineCall.CHAT:
        header = zumik_headers.SNAPSHOT if snapshot else zumik_headers.SESSION
        raise InvalidRequestError(f"{header} applies to /v1/chat/completions only.", param=header)
    if snapshot is not None:
        prefix = await state.store_call(state.snapshot_messages(tenant, snapshot))
        prepared.engine_body["messages"] = [*prefix, *prepared.engine_body["messages"]]
    exchange: list[tuple[str, str]] = []
    if session is not None:
        await state.store_call(state.use_session(tenant, session))
        last = prepared.engine_body["messages"][-1]
        if (
            isinstance(last, dict)
            and last.get("role") in ("user", "tool")
            and isinstance(last.get("content"), str)
        ):
            exchange.append((last["role"], last["content"]))
    reuse = request.app.state.reuse if tenant_record.reuse_accounting else None
    return _StateRefs(state, tenant, snapshot, session, exchange, reuse)


async def _whole_response(
    run: EngineRun,
    prepared: PreparedRequest,
    headers: dict[str, str],
    state_refs: _StateRefs,
    span: _SpanInfo,
) -> Response:
    if not isinstance(run.first, EngineResponse):
        raise EngineError("The engine streamed a response to a non-streaming request.")
    render = render_chat_completion if prepared.call is EngineCall.CHAT else render_completion
    rendered = render(run.first.body, prepared.model)
    reuse = await state_refs.account(run, rendered.get("usage"))
    headers = {**headers, **reuse}
    if state_refs.session is not None:
        await state_refs.record_reply(rendered["choices"][0]["message"]["content"] or "")
    span.emit(run, reuse)
    return JSONResponse(rendered, headers=headers)


async def _sse(
    run: EngineRun, prepared: PreparedRequest, state_refs: _StateRefs, admission: Admission, span: _SpanInfo
) -> AsyncIterator[bytes]:
    """Re-render the engine's stream; a failure after the first byte is an error event, then
    ``[DONE]`` (never a made-up ``finish_reason``); so is the request's deadline passing."""
    try:
        async for chunk in _sse_events(run, prepared, state_refs, span, admission.deadline):
            yield chunk
    finally:
        admission.ticket.release()


async def _sse_events(
    run: EngineRun, prepared: PreparedRequest, state_refs: _StateRefs, span: _SpanInfo, deadline: Deadline
) -> AsyncIterator[bytes]:
    renderer = StreamRenderer(prepared.call, prepared.model, prepared.include_usage)

    async def events() -> AsyncIterator[Any]:
        yield run.first
        async for event in run.rest:
            yield event

    reply: list[str] = []
    completed = False
    usage: dict[str, Any] | None = None
    iterator = events()
    try:
        while True:
            left = deadline.left()
            try:
                event = await (anext(iterator) if left is None else asyncio.wait_for(anext(iterator), left))
            except StopAsyncIteration:
                break
            except TimeoutError:  # the engine's work is cancelled with the wait
                late = exceeded()
                yield _data(render_error(late.message, late.type, None, late.code))
                break
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
                if rendered is not None and rendered.get("usage"):
                    usage = rendered["usage"]
                if rendered is not None:
                    for choice in rendered["choices"]:
                        if choice["index"] == 0:
                            reply.append(choice.get("delta", {}).get("content") or choice.get("text") or "")
                            completed = completed or choice["finish_reason"] is not None
                    yield _data(rendered)
            if failed:
                break
        if completed and state_refs.session is not None:
            await state_refs.record_reply("".join(reply))
        if completed:
            span.emit(run, await state_refs.account(run, usage))
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
