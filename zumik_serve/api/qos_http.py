"""QoS and deadlines on the HTTP surfaces: ``x-zumik-qos`` / ``x-zumik-timeout-s`` on /v1, the
``qos`` / ``timeout_s`` fields on /v2, admission through ``qos/admission.py``.

A deadline counts from the moment the request arrived: time spent queued for admission, deciding,
waiting for the first output and streaming all come out of it. When it passes, the engine's work
is cancelled (the handle call or the provider request is abandoned, which aborts it in vLLM) and
the client gets 504 ``deadline_exceeded``, or, mid-stream, an error event then ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request

from profiles.model import QosClass
from zumik_serve.errors import DeadlineExceededError, InvalidRequestError, ZumikError
from zumik_serve.qos.admission import AdmissionController, Ticket, choose_class
from zumik_serve.telemetry.tracing import RequestClock
from zumik_serve.tenancy.tenant import Tenant

QOS_HEADER = "x-zumik-qos"
TIMEOUT_HEADER = "x-zumik-timeout-s"
MAX_TIMEOUT_S = 3600.0

T = TypeVar("T")


@dataclass(frozen=True)
class Deadline:
    at: float | None  # time.monotonic() when it passes; None: no deadline

    @classmethod
    def parse(cls, value: Any, *, param: str, started: float) -> Deadline:
        if value is None or value == "":
            return cls(None)
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            seconds = float("nan")
        if isinstance(value, bool) or not 0 < seconds <= MAX_TIMEOUT_S:
            raise InvalidRequestError(
                f"{param} must be a number of seconds above 0 and at most {MAX_TIMEOUT_S:.0f}.", param=param
            )
        return cls(started + seconds)

    def left(self) -> float | None:
        return None if self.at is None else max(0.0, self.at - time.monotonic())

    async def run(self, awaitable: Awaitable[T]) -> T:
        """Await ``awaitable`` within the deadline; past it the work is cancelled (504)."""
        if self.at is None:
            return await awaitable
        timer = asyncio.timeout_at(self._loop_time())
        try:
            async with timer:
                return await awaitable
        except TimeoutError:
            raise exceeded() from None
        except ZumikError:  # the work answered its cancellation with an error (vLLM does: 400)
            if timer.expired():
                raise exceeded() from None
            raise

    def _loop_time(self) -> float:
        assert self.at is not None
        return asyncio.get_running_loop().time() + (self.at - time.monotonic())


def exceeded() -> DeadlineExceededError:
    return DeadlineExceededError(
        "The request's deadline (timeout_s) passed before it finished; the work was cancelled. "
        "Retry with a longer timeout, a shorter max_tokens, or a higher QoS class."
    )


@dataclass
class Admission:
    qos: QosClass
    deadline: Deadline
    ticket: Ticket
    engine_priority: int | None
    prefer_cheapest: bool


async def admit(
    request: Request, tenant: Tenant, *, requested_qos: Any, timeout_s: Any, clock: RequestClock,
    qos_param: str, timeout_param: str,
) -> Admission:  # fmt: skip
    """The request's class and deadline, checked, then a running slot of its class (or 429)."""
    controller: AdmissionController = request.app.state.admission
    if requested_qos is not None and not isinstance(requested_qos, str):
        raise InvalidRequestError(f"{qos_param} must be a string.", param=qos_param)
    qos = choose_class(requested_qos, tenant.qos_classes, controller.spec, param=qos_param)
    deadline = Deadline.parse(timeout_s, param=timeout_param, started=clock.started_monotonic)
    ticket = await controller.admit(qos, deadline_s=deadline.left())
    clock.phases_ms["queue"] = ticket.queued_ms
    priority = controller.engine_priority(qos) if request.app.state.priority_scheduling else None
    return Admission(qos, deadline, ticket, priority, controller.prefers_cheapest(qos))
