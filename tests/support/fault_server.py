"""A programmable OpenAI-compatible HTTP server on loopback, playing a provider in tests.

Rule kept here: faults are applied to the next requests in the order they were scripted, one
fault per request; with the script empty the server proxies to ``upstream`` when given, else
answers a canned valid ``chat.completion`` / ``text_completion`` (streamed when asked). Every
request is recorded, with the Authorization value replaced by whether it was there and the
sha256 of its bearer token.

    with FaultServer() as server:
        server.script([Fault.status(429, retry_after_s=1), Fault.status(500), Fault.hang(5)])
        ... call server.base_url (".../v1") ...
        assert server.requests[0].body["prompt_cache_key"] == ...

Faults: ``status(code, retry_after_s=, message=)`` an OpenAI error object with that status;
``hang(seconds)`` wait that long (or until stop) before answering; ``ok(cached_tokens=)`` one
canned reply with that ``cached_tokens`` (None leaves out ``prompt_tokens_details``);
``break_stream(after_chunks)`` send that many SSE events, then drop the connection;
``refuse(seconds)`` close the listening socket for that long, so connections are refused. A
refuse takes effect when it reaches the head of the script: at once inside ``script()``, else
right after the response that precedes it (a request racing that moment is answered as if the
script were empty). ``stop()`` / ``start()`` do the same by hand and keep the port.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

FaultKind = Literal["status", "hang", "refuse", "ok", "break_stream"]
CANNED_MODEL = "fault-model"
CANNED_TEXT = "ok"


@dataclass(frozen=True)
class Fault:
    kind: FaultKind
    status_code: int = 200
    retry_after_s: int | None = None
    message: str | None = None
    seconds: float = 0.0
    cached_tokens: int | None = 0
    after_chunks: int = 0

    @classmethod
    def status(cls, code: int, *, retry_after_s: int | None = None, message: str | None = None) -> Fault:
        return cls("status", status_code=code, retry_after_s=retry_after_s, message=message)

    @classmethod
    def hang(cls, seconds: float) -> Fault:
        return cls("hang", seconds=seconds)

    @classmethod
    def refuse(cls, seconds: float = 1.0) -> Fault:
        return cls("refuse", seconds=seconds)

    @classmethod
    def ok(cls, *, cached_tokens: int | None = 0) -> Fault:
        return cls("ok", cached_tokens=cached_tokens)

    @classmethod
    def break_stream(cls, after_chunks: int = 1) -> Fault:
        return cls("break_stream", after_chunks=after_chunks)


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names, without authorization
    has_authorization: bool
    authorization_sha256: str | None  # sha256 hex of the bearer token (the API key)
    body: Any  # parsed JSON, or None
    handled_as: str  # the fault kind, "canned" or "proxy"


class FaultServer:
    """See the module docstring. ``cached_tokens`` is what canned replies report (None: no
    ``prompt_tokens_details``)."""

    def __init__(
        self, *, upstream: str | None = None, cached_tokens: int | None = 0, host: str = "127.0.0.1"
    ) -> None:
        self.upstream = upstream.rstrip("/") if upstream else None
        self.cached_tokens = cached_tokens
        self.host = host
        self.port: int | None = None
        self._lock = threading.Lock()
        self._queue: deque[Fault] = deque()
        self._records: list[RecordedRequest] = []
        self._closing = threading.Event()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._restart_timer: threading.Timer | None = None
        self._app = Starlette(routes=[Route("/v1/{path:path}", self._handle, methods=["GET", "POST"])])

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise RuntimeError("the fault server has not been started")
        return f"http://{self.host}:{self.port}/v1"

    @property
    def is_listening(self) -> bool:
        return self._server is not None

    def start(self, timeout_s: float = 10.0) -> FaultServer:
        if self._server is not None:
            return self
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port or 0))
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            self._app,
            log_config=None,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=2,
        )
        server = uvicorn.Server(config)
        self._closing.clear()
        thread = threading.Thread(
            target=lambda: asyncio.run(server.serve(sockets=[sock])), name="fault-server", daemon=True
        )
        thread.start()
        deadline = time.monotonic() + timeout_s
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the fault server did not start on port {self.port}")
            time.sleep(0.01)
        self._server, self._thread = server, thread
        return self

    def stop(self) -> None:
        """Stop listening (connections are refused from now on); the port is kept for start()."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._closing.set()  # hanging requests end now
        server.should_exit = True
        thread.join(timeout=10)
        self._server = self._thread = None

    def close(self) -> None:
        timer = self._restart_timer
        if timer is not None:
            timer.cancel()
        self.stop()

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- script and records ----------------------------------------------------------------

    def script(self, faults: Iterable[Fault]) -> None:
        """Append ``faults``; each applies to one coming request, in order."""
        with self._lock:
            self._queue.extend(faults)
        self._refuse_if_due()

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._queue)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._records)

    def reset(self) -> None:
        with self._lock:
            self._queue.clear()
            self._records.clear()

    def _refuse_if_due(self) -> None:
        with self._lock:
            if not self._queue or self._queue[0].kind != "refuse":
                return
            fault = self._queue.popleft()
        self.stop()
        timer = threading.Timer(fault.seconds, self._reopen)
        timer.daemon = True
        self._restart_timer = timer
        timer.start()

    def _reopen(self) -> None:
        self._restart_timer = None
        self.start()
        self._refuse_if_due()

    # -- request handling ------------------------------------------------------------------

    async def _handle(self, request: Request) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        with self._lock:
            fault = self._queue.popleft() if self._queue and self._queue[0].kind != "refuse" else None
            handled_as = fault.kind if fault else ("proxy" if self.upstream else "canned")
            self._records.append(_record(request, body, handled_as))
            refuse_next = bool(self._queue) and self._queue[0].kind == "refuse"
        background = BackgroundTask(self._refuse_soon) if refuse_next else None
        response = await self._respond(request, raw, body, fault)
        response.background = background
        return response

    async def _refuse_soon(self) -> None:
        # stop() joins the server's own thread: run it from another one.
        threading.Thread(target=self._refuse_if_due, daemon=True).start()

    async def _respond(self, request: Request, raw: bytes, body: Any, fault: Fault | None) -> Response:
        if fault is None:
            if self.upstream:
                return await _proxy(request, raw, self.upstream)
            return _canned(request.url.path, body, self.cached_tokens)
        if fault.kind == "status":
            return _error(fault)
        if fault.kind == "hang":
            deadline = time.monotonic() + fault.seconds
            while time.monotonic() < deadline and not self._closing.is_set():
                await asyncio.sleep(0.02)
            return _canned(request.url.path, body, self.cached_tokens)
        if fault.kind == "ok":
            return _canned(request.url.path, body, fault.cached_tokens)
        return _broken(request.url.path, body, fault.after_chunks)


async def _proxy(request: Request, raw: bytes, upstream_base: str) -> Response:
    suffix = request.url.path.removeprefix("/v1")
    headers = {
        name: value
        for name, value in request.headers.items()
        if name in ("authorization", "content-type", "accept")
    }
    client = httpx.AsyncClient(timeout=httpx.Timeout(300.0))
    outgoing = client.build_request(request.method, upstream_base + suffix, content=raw, headers=headers)
    upstream = await client.send(outgoing, stream=True)

    async def relay() -> AsyncIterator[bytes]:
        try:
            async for chunk in upstream.aiter_bytes():
                yield chunk
        finally:
            await upstream.aclose()
            await client.aclose()

    passed = {
        name: value
        for name, value in upstream.headers.items()
        if name in ("content-type", "retry-after", "x-request-id")
    }
    return StreamingResponse(relay(), status_code=upstream.status_code, headers=passed)


def _record(request: Request, body: Any, handled_as: str) -> RecordedRequest:
    authorization = request.headers.get("authorization")
    token_digest = None
    if authorization is not None:
        token = authorization.removeprefix("Bearer ").strip()
        token_digest = hashlib.sha256(token.encode()).hexdigest()
    headers = {name: value for name, value in request.headers.items() if name != "authorization"}
    return RecordedRequest(
        method=request.method,
        path=request.url.path,
        headers=headers,
        has_authorization=authorization is not None,
        authorization_sha256=token_digest,
        body=body,
        handled_as=handled_as,
    )


def _error(fault: Fault) -> Response:
    code = fault.status_code
    kind = "rate_limit_error" if code == 429 else "server_error" if code >= 500 else "invalid_request_error"
    message = fault.message or f"scripted fault: HTTP {code}"
    headers = {"retry-after": str(fault.retry_after_s)} if fault.retry_after_s is not None else None
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return JSONResponse(body, status_code=code, headers=headers)


def _usage(cached_tokens: int | None, request: dict[str, Any]) -> dict[str, Any]:
    """As OpenAI counts: a request with ``reasoning_effort`` spent 3 of its completion tokens
    reasoning (``completion_tokens_details``)."""
    usage: dict[str, Any] = {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
    if cached_tokens is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    if request.get("reasoning_effort") not in (None, "none"):
        usage.update(completion_tokens=4, total_tokens=9)
        usage["completion_tokens_details"] = {"reasoning_tokens": 3, "accepted_prediction_tokens": 0}
    return usage


def _served_on(request: dict[str, Any]) -> dict[str, Any]:
    """OpenAI names the tier it served a request on when the request named one."""
    tier = request.get("service_tier")
    return {"service_tier": "default" if tier == "auto" else tier} if isinstance(tier, str) else {}


def _canned(path: str, body: Any, cached_tokens: int | None) -> Response:
    request = body if isinstance(body, dict) else {}
    model = str(request.get("model") or CANNED_MODEL)
    created = int(time.time())
    if path.endswith("/models"):
        data = [{"id": CANNED_MODEL, "object": "model", "created": created, "owned_by": "fault-server"}]
        return JSONResponse({"object": "list", "data": data})
    if request.get("stream"):
        events = _stream_events(path, request, model, created, cached_tokens)
        return StreamingResponse(_sse(events), media_type="text/event-stream")
    if path.endswith("/chat/completions"):
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": CANNED_TEXT, "refusal": None},
            "finish_reason": "stop",
            "logprobs": None,
        }
        obj, prefix = "chat.completion", "chatcmpl"
    else:
        choice = {"index": 0, "text": CANNED_TEXT, "finish_reason": "stop", "logprobs": None}
        obj, prefix = "text_completion", "cmpl"
    reply = {
        "id": f"{prefix}-fault-{created}",
        "object": obj,
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": _usage(cached_tokens, request),
        **_served_on(request),
    }
    return JSONResponse(reply)


def _stream_events(
    path: str, request: dict[str, Any], model: str, created: int, cached_tokens: int | None
) -> list[str]:
    chat = path.endswith("/chat/completions")
    obj = "chat.completion.chunk" if chat else "text_completion"
    base = {"id": f"{'chatcmpl' if chat else 'cmpl'}-fault-{created}", "object": obj, "created": created}
    base["model"] = model
    base.update(_served_on(request))
    choices: list[dict[str, Any]]
    if chat:
        choices = [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None},
            *({"index": 0, "delta": {"content": char}, "finish_reason": None} for char in CANNED_TEXT),
            {"index": 0, "delta": {}, "finish_reason": "stop"},
        ]
    else:
        choices = [
            *({"index": 0, "text": char, "finish_reason": None} for char in CANNED_TEXT),
            {"index": 0, "text": "", "finish_reason": "stop"},
        ]
    events = [json.dumps({**base, "choices": [choice]}) for choice in choices]
    options = request.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):
        events.append(json.dumps({**base, "choices": [], "usage": _usage(cached_tokens, request)}))
    events.append("[DONE]")
    return events


async def _sse(events: list[str]) -> AsyncIterator[bytes]:
    for event in events:
        yield f"data: {event}\n\n".encode()


def _broken(path: str, body: Any, after_chunks: int) -> Response:
    request = body if isinstance(body, dict) else {}
    events = _stream_events(path, {**request, "stream": True}, CANNED_MODEL, int(time.time()), 0)

    async def send_then_break() -> AsyncIterator[bytes]:
        for event in events[:after_chunks]:
            yield f"data: {event}\n\n".encode()
        raise ConnectionAbortedError("scripted fault: stream broken")  # uvicorn drops the connection

    return StreamingResponse(send_then_break(), media_type="text/event-stream")
