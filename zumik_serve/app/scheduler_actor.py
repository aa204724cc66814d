"""The profile's scheduler owner as one Ray Serve replica, and each gateway's link to it.

    SchedulerOwner   one replica per profile (the application's): ``routing.owner.ProfileOwner``
                     behind three methods: ``exchange`` (a gateway's batch applied, and its
                     view back in the same call), ``engine_events`` (KV events of engine
                     replicas), ``view`` (long-polled: answers as soon as the owner moves past
                     the caller's version, or after ``wait_s``); and two to read it: ``stats``,
                     ``engine_residency`` (a replica's blocks by its engine's events alone)
    OwnerLink        in each gateway process, one background task, never on a request's path:
                     while the gateway has something to report (ops, a change of its load, a
                     heartbeat due), one ``exchange`` at most every ``LINK_INTERVAL_S`` (a
                     batch that failed is sent again first); while it has nothing, one
                     long-poll of ``view``, given up as soon as it has something again

Each call to the owner costs both sides a few milliseconds of CPU (a Serve handle call), so the
link is paced, not driven by every change: whatever moves meanwhile goes in the next batch or
view. A busy gateway makes one call per ``LINK_INTERVAL_S`` (a report and its view together),
an idle one a long-poll per ``VIEW_WAIT_S`` or per change elsewhere; each engine replica one
call per ``KV_EVENTS_BATCH_S`` (``engines/replica.py``), whatever the request rate. When the
rate is low the owner's CPU per request is what the pacing bounds (``zumik bench routing``
prints it by component). A report and a view used to be two calls every 50 ms each: one call a
round, at most every 100 ms, took a third of the calls and half the owner's CPU per request on
this 2-core machine, for a capture of 0.994 against 0.995-0.997 (docs/benchmarks.md, "One call
to the owner a round").

A request decides with the gateway's local scheduler only: at most ``LINK_INTERVAL_S`` plus a
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
from zumik_serve.app.replica_group import GroupEngines, give_up
from zumik_serve.routing.owner import KvEvent, Report, View
from zumik_serve.routing.scheduler import ProfileScheduler, owner_for

LINK_INTERVAL_S = 0.1  # a gateway calls its owner at most this often (and looks for work to report)
HEARTBEAT_S = 1.0  # while something is in flight, the gateway's load reaches the owner this often
VIEW_WAIT_S = 2.0  # an idle gateway's long-poll
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
        self._calls = {"exchange": 0, "view": 0, "engine_events": 0}  # what the owner answered

    async def exchange(self, report: Report, since_version: int) -> View:
        """Apply a gateway's batch, then answer its view since ``since_version`` at once: one
        call where a report and a view took two."""
        self._calls["exchange"] += 1
        before = self._owner.version
        view = self._owner.exchange(report, since_version, _now_ms())
        self._wake(before)
        self._count_beliefs()
        return view

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
        self._task: asyncio.Task[None] | None = None
        self._last_load: tuple[Any, ...] | None = None  # the load the owner has: none yet
        self._last_sent = 0.0

    def start(self) -> None:
        self._task = asyncio.create_task(self._linking())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def _report_due(self) -> bool:
        """Ops to report, a load the owner has not seen, or, while something is in flight, a
        heartbeat of that load due (the owner forgets a silent gateway's load after
        ``owner.LOAD_TTL_MS``; none in flight is what forgetting it says)."""
        load = self._scheduler.load_now()
        if self._scheduler.ops_to_report or load != self._last_load:
            return True
        return load != ((), ()) and time.monotonic() - self._last_sent >= HEARTBEAT_S

    async def _linking(self) -> None:
        unsent: Report | None = None
        while True:
            try:
                if unsent is not None or self._report_due():
                    report = unsent or self._scheduler.take_report()
                    unsent = report
                    view = await self._owner.exchange.remote(report, self._scheduler.version)
                    unsent = None
                    self._last_load = (report.inflight, report.route_inflight)
                    self._last_sent = time.monotonic()
                else:
                    view = await self._idle_view()
            except Exception as exc:  # the owner restarts or is unreachable: a batch is sent again
                log.warning("scheduler owner unreachable (%s); retrying", type(exc).__name__)
                await asyncio.sleep(RETRY_S)
                continue
            if view is None:  # the poll given up: report at once
                continue
            self._scheduler.apply_view(view)
            await asyncio.sleep(LINK_INTERVAL_S)

    async def _idle_view(self) -> View | None:
        """The owner's view once it moves (a long-poll of ``VIEW_WAIT_S``), or None as soon as
        this gateway has something to report: the poll is then given up (cancelled), so that an
        idle gateway's first send reaches the others within ``LINK_INTERVAL_S``, not a poll."""
        response = self._owner.view.remote(self._scheduler.gateway, self._scheduler.version, VIEW_WAIT_S)
        poll: asyncio.Future[View] = asyncio.ensure_future(response)
        try:
            while True:
                done, _ = await asyncio.wait({poll}, timeout=LINK_INTERVAL_S)
                if done:
                    return poll.result()
                if self._report_due():
                    return None
        finally:
            if not poll.done():
                give_up(poll, response)  # the owner stops waiting to answer nobody


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
