"""Admission: each QoS class has its own running and queued slots in a gateway process.

    request ─► class gate ─┬─ a running slot free        → admitted at once
                           ├─ queue not full             → waits (FIFO) for a slot, at most
                           │                               min(queue_timeout_s, the deadline)
                           └─ running and queue full     → OverloadedError (429, Retry-After)
    admitted ... finished ─► release: the slot goes to the first waiter

Rejection is decided without waiting on anything, so a refused request is answered in the time
it takes to parse it, and the number of waiters is bounded, so memory stays flat under any
overload. A class's slots are its own: a flood of ``batch`` cannot take ``interactive``'s.
Which class a request may use is the tenant's policy (``qos_classes`` of its record).

Pure asyncio, no framework: the HTTP layer maps the errors (``api/http_errors.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass

from profiles.model import QosClass, QosSpec
from zumik_serve.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    OverloadedError,
    PermissionDeniedError,
)

CLASS_NAMES = tuple(qos.value for qos in QosClass)


def choose_class(
    requested: str | None, allowed: frozenset[str] | None, spec: QosSpec, *, param: str
) -> QosClass:
    """The request's class: the one it asked for (when the tenant may use it) or the default."""
    if requested is None or requested == "":
        name = spec.default_class.value
        if allowed is not None and name not in allowed:  # the tenant's best allowed class
            name = next(qos for qos in CLASS_NAMES if qos in allowed)
        return QosClass(name)
    if requested not in CLASS_NAMES:
        raise InvalidRequestError(f"{param} must be one of: {', '.join(CLASS_NAMES)}.", param=param)
    if allowed is not None and requested not in allowed:
        raise PermissionDeniedError(
            f"This API key's tenant may not use the QoS class '{requested}'; it may use: "
            f"{', '.join(sorted(allowed))}. Ask your administrator to change the tenant's policy.",
            param=param,
        )
    return QosClass(requested)


@dataclass
class Ticket:
    """An admitted request's slot; ``release`` once the request is done (idempotent)."""

    gate: ClassGate
    queued_ms: float
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.gate.release()


class ClassGate:
    def __init__(self, qos: QosClass, *, max_running: int, max_queued: int, retry_after_s: int) -> None:
        self.qos = qos
        self.max_running = max_running
        self.max_queued = max_queued
        self.retry_after_s = retry_after_s
        self.running = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.rejected = 0

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def acquire(self, *, wait_s: float, deadline_bound: bool) -> Ticket:
        started = time.perf_counter()
        if self.running < self.max_running and not self._waiters:
            self.running += 1
            return Ticket(self, 0.0)
        if len(self._waiters) >= self.max_queued:
            self.rejected += 1
            raise OverloadedError(
                f"Too many '{self.qos.value}' requests right now ({self.max_running} running, "
                f"{self.max_queued} queued). Retry after {self.retry_after_s} s.",
                retry_after_s=self.retry_after_s,
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout=max(0.0, wait_s))
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():  # the slot arrived as time ran out
                return Ticket(self, (time.perf_counter() - started) * 1000)
            waiter.cancel()
            self._discard(waiter)
            self.rejected += 1
            if deadline_bound:
                raise DeadlineExceededError(
                    f"The request's deadline passed while it waited for a '{self.qos.value}' slot. "
                    "Retry with a longer timeout_s or a higher QoS class.",
                ) from None
            raise OverloadedError(
                f"A '{self.qos.value}' slot did not free up in time. Retry after {self.retry_after_s} s.",
                retry_after_s=self.retry_after_s,
            ) from None
        except asyncio.CancelledError:  # the client went away while queued
            if waiter.done() and not waiter.cancelled():
                self.release()  # it had been handed a slot: pass it on
            else:
                waiter.cancel()
                self._discard(waiter)
            raise
        return Ticket(self, (time.perf_counter() - started) * 1000)

    def release(self) -> None:
        while self._waiters:  # hand the slot over: ``running`` stays the same
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.running = max(0, self.running - 1)

    def _discard(self, waiter: asyncio.Future[None]) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)


class AdmissionController:
    """The gates of one gateway process, one per QoS class of the profile."""

    def __init__(self, spec: QosSpec) -> None:
        self.spec = spec
        self.gates = {
            qos: ClassGate(
                qos, max_running=cls.max_running, max_queued=cls.max_queued, retry_after_s=spec.retry_after_s
            )
            for qos, cls in spec.classes.items()
        }

    async def admit(self, qos: QosClass, *, deadline_s: float | None = None) -> Ticket:
        """A slot of ``qos``; ``deadline_s`` is the time left of the request's own deadline."""
        wait_s = self.spec.queue_timeout_s
        deadline_bound = deadline_s is not None and deadline_s < wait_s
        if deadline_s is not None:
            wait_s = min(wait_s, deadline_s)
        return await self.gates[qos].acquire(wait_s=wait_s, deadline_bound=deadline_bound)

    def engine_priority(self, qos: QosClass) -> int:
        return self.spec.classes[qos].engine_priority

    def prefers_cheapest(self, qos: QosClass) -> bool:
        return self.spec.classes[qos].prefer_cheapest_route

    def state(self) -> dict[str, dict[str, int]]:
        return {
            qos.value: {
                "running": gate.running, "queued": gate.queued, "max_running": gate.max_running,
                "max_queued": gate.max_queued, "rejected": gate.rejected,
            }
            for qos, gate in self.gates.items()
        }  # fmt: skip
