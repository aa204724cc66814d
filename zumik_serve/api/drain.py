"""Draining one gateway process before it stops: requests in flight finish, new ones get 503.

    serving ──begin()──► draining: every new HTTP request → 503 shutting_down (Retry-After),
                         /healthz included (a load balancer or readiness probe stops sending);
                         wait_idle() returns once no request is in flight, or at its timeout

A request is in flight from the moment the app is called until its response has been sent in
full (a stream: until its last chunk), so a drain waits for streams as well, and then for the
reuse-ledger writes those requests left (``pipeline/accounting.settle``). ``zumik serve``
drains every gateway replica on SIGTERM (``app/shutdown.py``) before it stops Serve and Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, replace

from fastapi import FastAPI
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from zumik_serve.api.http_errors import error_response
from zumik_serve.errors import ShuttingDownError
from zumik_serve.pipeline.accounting import settle

RETRY_AFTER_S = 1


@dataclass(frozen=True)
class DrainReport:
    """One gateway process's drain: requests in flight when it began, and those still in flight
    when it returned (0: all finished within the timeout)."""

    in_flight_at_start: int
    left_in_flight: int
    ledger_writes_left: int = 0  # reuse-ledger writes of finished requests still unwritten


class Drain:
    """The in-flight count and the draining flag of one gateway app (``app.state.drain``)."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def drain(self, timeout_s: float) -> DrainReport:
        """Refuse new requests from now on; wait up to ``timeout_s`` for those in flight."""
        self.draining = True
        at_start = self.in_flight
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout=max(0.0, timeout_s))
        return DrainReport(in_flight_at_start=at_start, left_in_flight=self.in_flight)


class DrainMiddleware:
    """Pure ASGI (a streamed response is counted until its last chunk is sent)."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            error = ShuttingDownError(
                "This Zumik server is shutting down and takes no new requests; retry in a moment "
                "(another replica or the restarted server answers).",
                retry_after_s=RETRY_AFTER_S,
            )
            await error_response(Request(scope), error)(scope, receive, send)
            return
        self.drain.enter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.leave()


def install_drain(app: FastAPI) -> Drain:
    drain = Drain()
    app.state.drain = drain
    app.add_middleware(DrainMiddleware, drain=drain)
    return drain


async def drain_app(app: FastAPI, timeout_s: float) -> DrainReport:
    """What a gateway deployment's ``drain`` method runs (``zumik serve`` broadcasts it): the
    requests in flight, then the reuse-ledger writes they left behind (written after their
    answers), all within ``timeout_s``."""
    drain: Drain = app.state.drain
    deadline = time.monotonic() + timeout_s
    report = await drain.drain(timeout_s)
    left = await settle(deadline - time.monotonic())
    return replace(report, ledger_writes_left=left)
