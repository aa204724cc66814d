"""The profile's scheduler owner as one Ray Serve replica, and each gateway's link to it.

    SchedulerOwner   one replica per profile (the application's): ``routing.owner.ProfileOwner``
                     behind three methods: ``report`` (a gateway's batch), ``engine_events``
                     (KV events of engine replicas), ``view`` (long-polled: answers as soon as
                     the owner moves past the caller's version, or after ``wait_s``); and two
                     to read it: ``stats``, ``engine_residency`` (a replica's blocks by its
                     engine's events alone)
    OwnerLink        in each gateway process, two background tasks, never on a request's path:
                     report loop  every ``REPORT_INTERVAL_S``, the scheduler's batch → ``report``
                                  (a batch that failed is sent again first)
                     view loop    ``view(gateway, version)`` → ``scheduler.apply_view``, at
                                  most every ``VIEW_INTERVAL_S``

Each call to the owner costs both sides a few milliseconds of CPU (a Serve handle call), so the
loops are paced, not driven by every change: whatever moves meanwhile goes in the next batch or
view. At most (1 / REPORT_INTERVAL_S + 1 / VIEW_INTERVAL_S) calls a second per gateway and
1 / KV_EVENTS_BATCH_S per engine replica (``engines/replica.py``), whatever the request rate:
when the rate is low the owner's CPU per request is what the pacing bounds (``zumik bench
routing`` prints it by component).

A request decides with the gateway's local scheduler only: at most ``REPORT_INTERVAL_S`` plus a
call later, every other gateway routes with what it did. If the owner restarts it starts empty;
the gateways' views then reset to it (``View.residency_full``), and their next reports refill it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from ray import serve

from profiles import Profile
from zumik_serve.app.replica_group import GroupEngines
from zumik_serve.routing.owner import KvEvent, Report, View
from zumik_serve.routing.scheduler import ProfileScheduler, owner_for

REPORT_INTERVAL_S = 0.05
HEARTBEAT_S = 1.0  # an empty report carries the gateway's load at least this often
VIEW_WAIT_S = 2.0
VIEW_INTERVAL_S = 0.05  # a view is asked for at most this often
RETRY_S = 0.5

log = logging.getLogger(__name__)


@serve.deployment(
    name="SchedulerOwner", num_replicas=1, max_ongoing_requests=4096, ray_actor_options={"num_cpus": 0}
)
class SchedulerOwner:
    def __init__(self, profile_json: str) -> None:
        from ray.util.metrics import Counter

        profile = Profile.model_validate_json(profile_json)
        self._owner = owner_for(profile)
        self._moved = asyncio.Event()
        tags = {"profile": profile.name}
        self._checks = Counter(
            "zumik:residency_belief_checks",
            "Sends to a replica whose engine reports KV events.",
            ("profile",),
        )
        self._wrong = Counter(
            "zumik:residency_belief_wrong",
            "Of those, sends where the gateways' own record of the replica's prefix differed from "
            "what its engine's KV events said.",
            ("profile",),
        )
        self._checks.set_default_tags(tags)
        self._wrong.set_default_tags(tags)
        self._counted = (0, 0)
        self._calls = {"report": 0, "view": 0, "engine_events": 0}  # what the owner answered

    async def report(self, report: Report) -> int:
        self._calls["report"] += 1
        before = self._owner.version
        version = self._owner.report(report, _now_ms())
        self._wake(before)
        self._count_beliefs()
        return version

    async def stats(self) -> dict[str, int]:
        """The owner's version and how often the send-only belief was wrong (the bench's)."""
        owner = self._owner
        return {
            "version": owner.version,
            "engine_events": owner.engine_event_count,
            "belief_checked": owner.belief_checked,
            "belief_wrong": owner.belief_wrong,
            **{f"calls_{name}": count for name, count in self._calls.items()},
        }

    async def engine_residency(self, replica: str) -> list[str]:
        """The block keys ``replica``'s engine says it holds (its KV events only)."""
        return list(self._owner.engine_residency(replica))

    async def engine_events(self, events: list[KvEvent]) -> int:
        self._calls["engine_events"] += 1
        before = self._owner.version
        version = self._owner.engine_events(events)
        self._wake(before)
        return version

    async def view(self, gateway: str, since_version: int, wait_s: float) -> View:
        self._calls["view"] += 1
        if self._owner.version == since_version:
            moved = self._moved
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(moved.wait(), timeout=wait_s)
        return self._owner.view(gateway, since_version, _now_ms())

    def _count_beliefs(self) -> None:
        checked, wrong = self._owner.belief_checked, self._owner.belief_wrong
        if checked > self._counted[0]:
            self._checks.inc(checked - self._counted[0])
        if wrong > self._counted[1]:
            self._wrong.inc(wrong - self._counted[1])
        self._counted = (checked, wrong)

    def _wake(self, before: int) -> None:
        if self._owner.version != before:
            moved, self._moved = self._moved, asyncio.Event()
            moved.set()


class OwnerLink:
    """A gateway's link to its profile's owner (started once the gateway's loop runs)."""

    def __init__(self, scheduler: ProfileScheduler, owner: Any, gateway: str) -> None:
        self._scheduler = scheduler
        self._owner = owner
        scheduler.link(gateway)
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._reporting()), asyncio.create_task(self._viewing())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _reporting(self) -> None:
        unsent: Report | None = None
        last_load: tuple[Any, ...] = ()
        last_sent = 0.0
        while True:
            await asyncio.sleep(REPORT_INTERVAL_S)
            report = unsent or self._scheduler.take_report()
            load = (report.inflight, report.route_inflight)
            if not report.ops and load == last_load and time.monotonic() - last_sent < HEARTBEAT_S:
                continue
            try:
                await self._owner.report.remote(report)
            except Exception as exc:  # the owner restarts or is unreachable: send it again
                unsent = report
                log.warning("scheduler owner unreachable (%s); retrying", type(exc).__name__)
                await asyncio.sleep(RETRY_S)
                continue
            unsent, last_load, last_sent = None, load, time.monotonic()

    async def _viewing(self) -> None:
        gateway = self._scheduler.gateway
        while True:
            try:
                view = await self._owner.view.remote(gateway, self._scheduler.version, VIEW_WAIT_S)
            except Exception as exc:
                log.warning("scheduler owner unreachable (%s); retrying", type(exc).__name__)
                await asyncio.sleep(RETRY_S)
                continue
            self._scheduler.apply_view(view)
            await asyncio.sleep(VIEW_INTERVAL_S)


def link_gateway(scheduler: ProfileScheduler, engines: dict[str, Any], owner: Any | None) -> OwnerLink | None:
    """Wire one gateway's scheduler: its group's running replicas (when ``engines`` is a group
    deployment's) and, given an owner handle, the link to it. Call on the gateway's loop."""
    if isinstance(engines, GroupEngines):
        byoc = [name for name, route in scheduler.routes.items() if route.kind.value == "byoc"]
        if byoc:
            engines.members.listen(lambda replicas: scheduler.set_replicas(byoc[0], replicas))
    if owner is None:
        return None
    link = OwnerLink(scheduler, owner, _gateway_id())
    link.start()
    return link


def _gateway_id() -> str:
    try:
        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:
        return f"gateway-{id(object())}"


def _now_ms() -> int:
    return int(time.time() * 1000)
