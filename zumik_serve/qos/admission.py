"""Admission: each QoS class has its own running and queued slots in a gateway process, shared
fairly among tenants.

    request ─► class gate ─┬─ the tenant holds its share       → OverloadedError (429, Retry-After)
               (tenant)    ├─ a running slot free, nobody waits → admitted at once
                           ├─ queue not full                    → waits for a slot, at most
                           │                                      min(queue_timeout_s, the deadline)
                           └─ running and queue full            → OverloadedError (429, Retry-After)
    admitted ... finished ─► release: the slot goes to the next waiting tenant, round-robin

Fairness rule: a tenant holds at most ``QosClassSpec.tenant_share()`` of a class's running plus
queued requests (by default every running slot and half the queue), so one tenant's flood
leaves room in the queue for others; and a freed slot goes to the tenants with waiters in turn
(each tenant's own requests in arrival order), so another tenant's request waits for one slot
to free, not for the flood ahead of it. A tenant alone can still use every running slot.

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
    tenant: str
    queued_ms: float
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.gate.release(self.tenant)


class ClassGate:
    """One class's slots. ``max_per_tenant``: most running plus queued requests of one tenant
    (None: no per-tenant bound). Waiters are kept per tenant; ``_turns`` is the round-robin
    order of the tenants that have waiters (each at most once)."""

    def __init__(
        self, qos: QosClass, *, max_running: int, max_queued: int, retry_after_s: int,
        max_per_tenant: int | None = None,
    ) -> None:  # fmt: skip
        self.qos = qos
        self.max_running = max_running
        self.max_queued = max_queued
        self.max_per_tenant = max_per_tenant
        self.retry_after_s = retry_after_s
        self.running = 0
        self.rejected = 0
        self._held: dict[str, int] = {}  # tenant → its running plus queued requests
        self._waiters: dict[str, deque[asyncio.Future[None]]] = {}
        self._turns: deque[str] = deque()

    @property
    def queued(self) -> int:
        return sum(len(waiters) for waiters in self._waiters.values())

    def held(self, tenant: str) -> int:
        """The tenant's running plus queued requests in this class."""
        return self._held.get(tenant, 0)

    async def acquire(self, tenant: str, *, wait_s: float, deadline_bound: bool) -> Ticket:
        started = time.perf_counter()
        if self.max_per_tenant is not None and self.held(tenant) >= self.max_per_tenant:
            self.rejected += 1
            raise OverloadedError(
                f"This API key's tenant already has {self.max_per_tenant} '{self.qos.value}' "
                "requests running or queued on this server, its share of the class. Retry after "
                f"{self.retry_after_s} s, or once some of them have finished.",
                retry_after_s=self.retry_after_s,
            )
        if self.running < self.max_running and not self._turns:
            self.running += 1
            self._hold(tenant)
            return Ticket(self, tenant, 0.0)
        if self.queued >= self.max_queued:
            self.rejected += 1
            raise OverloadedError(
                f"Too many '{self.qos.value}' requests right now ({self.max_running} running, "
                f"{self.max_queued} queued). Retry after {self.retry_after_s} s.",
                retry_after_s=self.retry_after_s,
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._enqueue(tenant, waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout=max(0.0, wait_s))
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():  # the slot arrived as time ran out
                return Ticket(self, tenant, (time.perf_counter() - started) * 1000)
            waiter.cancel()
            self._abandon(tenant, waiter)
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
                self.release(tenant)  # it had been handed a slot: pass it on
            else:
                waiter.cancel()
                self._abandon(tenant, waiter)
            raise
        return Ticket(self, tenant, (time.perf_counter() - started) * 1000)

    def release(self, tenant: str) -> None:
        """``tenant``'s request is done: its slot goes to the next tenant in turn that waits
        (``running`` stays the same), else it is free."""
        self._unhold(tenant)
        while self._turns:
            turn = self._turns.popleft()
            waiters = self._waiters[turn]
            waiter = waiters.popleft()
            if waiters:
                self._turns.append(turn)  # its next request waits for its next turn
            else:
                del self._waiters[turn]
            if not waiter.done():
                waiter.set_result(None)
                return
        self.running = max(0, self.running - 1)

    def _enqueue(self, tenant: str, waiter: asyncio.Future[None]) -> None:
        self._hold(tenant)
        if tenant not in self._waiters:
            self._waiters[tenant] = deque()
            self._turns.append(tenant)
        self._waiters[tenant].append(waiter)

    def _abandon(self, tenant: str, waiter: asyncio.Future[None]) -> None:
        """A waiter left before it got a slot (timeout, cancellation)."""
        waiters = self._waiters.get(tenant)
        if waiters is not None:
            with contextlib.suppress(ValueError):
                waiters.remove(waiter)
                self._unhold(tenant)
            if not waiters:
                del self._waiters[tenant]
                with contextlib.suppress(ValueError):
                    self._turns.remove(tenant)

    def _hold(self, tenant: str) -> None:
        self._held[tenant] = self._held.get(tenant, 0) + 1

    def _unhold(self, tenant: str) -> None:
        left = self._held.get(tenant, 0) - 1
        if left > 0:
            self._held[tenant] = left
        else:
            self._held.pop(tenant, None)


class AdmissionController:
    """The gates of one gateway process, one per QoS class of the profile."""

    def __init__(self, spec: QosSpec) -> None:
        self.spec = spec
        self.gates = {
            qos: ClassGate(
                qos, max_running=cls.max_running, max_queued=cls.max_queued,
                retry_after_s=spec.retry_after_s, max_per_tenant=cls.tenant_share(),
            )
            for qos, cls in spec.classes.items()
        }  # fmt: skip

    async def admit(self, qos: QosClass, tenant: str, *, deadline_s: float | None = None) -> Ticket:
        """A slot of ``qos`` for ``tenant``; ``deadline_s`` is the time left of the request's
        own deadline."""
        wait_s = self.spec.queue_timeout_s
        deadline_bound = deadline_s is not None and deadline_s < wait_s
        if deadline_s is not None:
            wait_s = min(wait_s, deadline_s)
        return await self.gates[qos].acquire(tenant, wait_s=wait_s, deadline_bound=deadline_bound)

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
