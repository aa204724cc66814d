"""A BYOC replica group as the gateway sees it: one Serve deployment whose replicas come and go.

    GroupMembership  the running replicas of the group, as its handle's router
                     (``app/request_router.py``) last saw them; the gateway's scheduler listens
                     (``ProfileScheduler.set_replicas``), so no redeploy is needed
    GroupEngines     the dispatcher's engines: a client for whichever replica a decision names
    GroupEngineClient one call, naming the picked replica (``HINT``) for the router

A call while the group has no running replica is queued by Serve (which is also what scales a
group up from zero) and waits at most ``GROUP_WAIT_S`` for one; then it is withdrawn and fails
as a 503 with ``Retry-After``.

This module is imported by reference everywhere, the router's module included: Serve pickles
the router's own module by value, so state shared by the router and the gateway lives here.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from zumik_serve.engines.protocol import EngineCall, EngineClient, EngineEvent, EngineFailure

HINT = "zumik_replica"  # the keyword of EngineReplica.generate/complete that names the pick
NO_REPLICA_RETRY_AFTER_S = 5
GROUP_WAIT_S = 10.0  # how long a call waits for a group with no running replica


class GroupMembership:
    """The running replicas of one engine deployment as its router last saw them. Written by
    the router (on Serve's thread), read and listened to by the gateway (on its loop)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.replicas: tuple[str, ...] | None = None  # None: the router has not reported yet
        self._listeners: list[tuple[asyncio.AbstractEventLoop, Callable[[tuple[str, ...]], None]]] = []

    def update(self, replicas: tuple[str, ...]) -> None:
        with self._lock:
            if replicas == self.replicas:
                return
            self.replicas = replicas
            listeners = list(self._listeners)
        for loop, listener in listeners:
            loop.call_soon_threadsafe(listener, replicas)

    def listen(self, listener: Callable[[tuple[str, ...]], None]) -> None:
        """Call ``listener`` (on the caller's loop) with every new replica set, the current one
        first when known."""
        loop = asyncio.get_running_loop()
        with self._lock:
            self._listeners.append((loop, listener))
            current = self.replicas
        if current is not None:
            listener(current)


_MEMBERSHIPS: dict[tuple[str, str], GroupMembership] = {}
_MEMBERSHIPS_LOCK = threading.Lock()


def membership(app_name: str, deployment: str) -> GroupMembership:
    """The membership of ``deployment`` in this process (one per deployment, shared by its
    handles' routers)."""
    with _MEMBERSHIPS_LOCK:
        return _MEMBERSHIPS.setdefault((app_name, deployment), GroupMembership())


class GroupEngineClient:
    """EngineClient for one pick inside a group deployment: the call names the replica."""

    def __init__(
        self, handle: Any, stream_handle: Any, members: GroupMembership, replica: str, wait_s: float
    ):
        self._handle = handle
        self._stream_handle = stream_handle
        self._members = members
        self._replica = replica
        self._wait_s = wait_s

    async def generate(self, call: EngineCall, body: dict[str, Any]) -> AsyncIterator[EngineEvent]:
        stream = self._stream_handle.generate.remote(call.value, body, **{HINT: self._replica})
        events = aiter(stream)
        first = asyncio.ensure_future(anext(events))
        if not await self._until_running(first):
            give_up(first, stream)
            yield self._no_replica()
            return
        try:
            yield await first
        except StopAsyncIteration:
            return
        async for event in events:
            yield event

    async def complete(self, call: EngineCall, body: dict[str, Any]) -> list[EngineEvent]:
        response = self._handle.complete.remote(call.value, body, **{HINT: self._replica})
        result = asyncio.ensure_future(_awaited(response))
        if not await self._until_running(result):
            give_up(result, response)
            return [self._no_replica()]
        return list(await result)

    async def _until_running(self, call: asyncio.Future[Any], *, poll_s: float = 0.1) -> bool:
        """False when the group has had no running replica for ``wait_s`` and ``call`` still
        waits for one (Serve queues it meanwhile, which is also what scales a group up from
        zero); True as soon as a replica runs, the call is answered, or the router has not
        reported yet."""
        deadline = time.monotonic() + self._wait_s
        await asyncio.sleep(0)  # the call is on its way before anything is decided
        while not call.done() and self._members.replicas == ():
            if time.monotonic() >= deadline:
                return False
            await asyncio.wait({call}, timeout=poll_s)
        return True

    def _no_replica(self) -> EngineFailure:
        return EngineFailure(
            status=503,
            message=(
                f"No engine replica of this model is running (the group is scaling up or its "
                f"replicas were removed); waited {self._wait_s:g} s. Retry after "
                f"{NO_REPLICA_RETRY_AFTER_S} s."
            ),
            outcome="connect_error",
            retry_after_s=NO_REPLICA_RETRY_AFTER_S,
        )


async def _awaited(response: Any) -> Any:
    return await response


def give_up(waiting: asyncio.Future[Any], call: Any) -> None:
    """Stop ``waiting`` for a Serve ``call`` and cancel the call itself (a queued request is
    withdrawn, one a replica runs is cancelled there). Its outcome is taken when it comes (Serve
    ends a cancelled call with an error of its own), so that asyncio never logs it as never
    retrieved."""
    waiting.cancel()
    cancel = getattr(call, "cancel", None)  # Serve's responses; a plain awaitable has none
    if callable(cancel):
        cancel()
    waiting.add_done_callback(_outcome_taken)


def _outcome_taken(waiting: asyncio.Future[Any]) -> None:
    if not waiting.cancelled():
        waiting.exception()


class GroupEngines(dict[str, EngineClient]):
    """The dispatcher's engines of a group deployment: a client for whichever replica id a
    decision names (``ANY_REPLICA`` too), made on first use."""

    def __init__(self, handle: Any, *, wait_s: float = GROUP_WAIT_S) -> None:
        super().__init__()
        self.handle = handle
        self._stream_handle = handle.options(stream=True)  # also starts the handle's router
        self.members = membership(handle.app_name, handle.deployment_name)
        self.wait_s = wait_s

    def __missing__(self, replica: str) -> EngineClient:
        client = GroupEngineClient(self.handle, self._stream_handle, self.members, replica, self.wait_s)
        if len(self) > 1024:  # replicas come and go: never grow without bound
            self.clear()
        self[replica] = client
        return client
