"""EngineReplica: one vLLM engine under Ray Serve (``ray.serve.llm.LLMServer``), speaking events.

It adds one method to ``LLMServer``: ``generate(call, body)``, which validates the body with
vLLM's own protocol models, runs it through vLLM's OpenAI serving layer, and yields the values
of ``engines/protocol.py``. Failures inside the engine become ``EngineFailure`` events (before
output) or an ``{"error": ...}`` payload (after output began), never an exception that would
reach the gateway as a bare 500.

With KV events on (a replica group's engines, ``with_kv_events``), each replica also forwards
its engine's KV cache events to the profile's scheduler owner:

    vLLM engine core ── ZMQ PUB (ipc, this replica's own) ──► forward_kv_events (SUB, in the
    replica's loop) ── KvEvent batches, at most every KV_EVENTS_BATCH_S ──► SchedulerOwner

Nothing published is missed for good while the engine's replay buffer holds it: the forwarder
asks the engine's replay socket (ZMQ ROUTER, its own endpoint beside the PUB one) for what it
published before the forwarder connected, and for any range a gap in the sequence numbers shows
it missed; what the buffer no longer holds is logged as missed.

The engine publishes a ``BlockStored`` only for blocks it newly caches: a prompt whose full
blocks are all cached already (a repeated prefix) publishes nothing, and that is no loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from pydantic import ValidationError
from ray import serve
from ray.serve.llm import LLMServer

from zumik_serve.engines.protocol import (
    EngineCall,
    EngineChunks,
    EngineEvent,
    EngineFailure,
    EngineResponse,
    ReplicaAssigned,
)
from zumik_serve.routing.block_hashes import HASH_ALGO, event_key
from zumik_serve.routing.owner import KvEvent

KV_EVENTS_TOPIC = "zumik-kv"
# Events go to the owner at most this often: each delivery is a Serve call costing both sides
# several ms of CPU, and an eviction reaches the owner at most this late (the gateways' record
# of their sends stands meanwhile). 0.1 s cost about twice the calls, for the same capture.
KV_EVENTS_BATCH_S = 0.5
KV_REPLAY_TIMEOUT_S = 2.0  # an engine's replay socket that does not answer within this is skipped
REPLAY_END = (-1).to_bytes(8, "big", signed=True)  # vLLM's ZmqEventPublisher.END_SEQ
OWNER_DEPLOYMENT = "SchedulerOwner"
IPC_PATH_MAX = 100  # a Unix socket path longer than about 107 bytes cannot be bound

log = logging.getLogger(__name__)


def with_kv_events(engine_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``engine_kwargs`` with vLLM's KV cache events on (ZMQ; each replica binds its own
    endpoint, ``EngineReplica.__init__``) and the block hash the gateway reproduces
    (``routing/block_hashes.py``)."""
    events = {"enable_kv_cache_events": True, "publisher": "zmq", "topic": KV_EVENTS_TOPIC}
    return {**engine_kwargs, "kv_events_config": events, "prefix_caching_hash_algo": HASH_ALGO}


class EngineReplica(LLMServer):
    async def __init__(self, llm_config: Any, *args: Any, **kwargs: Any) -> None:  # type: ignore[misc]
        """With KV events on (``with_kv_events``), the engine publishes on an endpoint of this
        replica's own, and a task forwards its events to the profile's scheduler owner."""
        endpoints = _own_kv_events_endpoints(llm_config)
        endpoint, replay = endpoints or (None, None)
        if endpoint is not None:
            seed = unpin_hash_seed(os.environ)  # before the engine core process starts
            if seed is not None:
                log.warning("PYTHONHASHSEED=%s unset for this engine: its block hashes must be "
                            "the ones the gateway computes (routing/block_hashes.py)", seed)  # fmt: skip
        await super().__init__(llm_config, *args, **kwargs)
        self._kv_events_task: asyncio.Task[None] | None = None
        if endpoint is not None:
            deliver = _owner_delivery(serve.get_replica_context().app_name)
            task = asyncio.create_task(forward_kv_events(endpoint, _replica_id(), deliver, replay=replay))
            task.add_done_callback(_report_end)
            self._kv_events_task = task
        self._kv_events_endpoints = tuple(e for e in (endpoint, replay) if e is not None)

    async def __del__(self) -> None:
        """Stop forwarding, shut the engine down, and remove the IPC socket file its publisher
        bound (a file per replica start would pile up in the temporary folder otherwise)."""
        task = getattr(self, "_kv_events_task", None)
        if task is not None:
            task.cancel()
        await super().__del__()
        for endpoint in getattr(self, "_kv_events_endpoints", ()):
            with contextlib.suppress(OSError):
                os.unlink(endpoint.removeprefix("ipc://"))

    async def complete(
        self, call: str, body: dict[str, Any], zumik_replica: str | None = None
    ) -> list[EngineEvent]:
        """A non-streaming call as one unary reply: cheaper over a handle than a stream.
        ``zumik_replica``: the replica the gateway picked (read by ``app/request_router.py``
        before the call reaches a replica; unused here)."""
        return [event async for event in self.generate(call, body)]

    async def generate(
        self, call: str, body: dict[str, Any], zumik_replica: str | None = None
    ) -> AsyncGenerator[EngineEvent, None]:
        yield ReplicaAssigned(replica_id=_replica_id())
        from vllm.exceptions import VLLMClientError

        try:
            request = _parse_request(EngineCall(call), body)
        except ValidationError as exc:
            yield _validation_failure(exc)
            return
        except VLLMClientError as exc:  # vLLM's own checks (not a ValueError: pydantic lets it out)
            yield _client_failure(exc)
            return
        try:
            method = self.chat if call == EngineCall.CHAT else self.completions
            stream = await method(request)
            async for item in stream:
                items = item if isinstance(item, list | tuple) else [item]
                payloads = tuple(_sse_payload(part) for part in items if isinstance(part, str))
                if payloads:
                    yield EngineChunks(payloads=payloads)
                for part in items:
                    if isinstance(part, str):
                        continue
                    if hasattr(part, "error"):
                        yield _error_failure(part.error)
                        return
                    yield EngineResponse(body=part.model_dump(mode="json"))
        except VLLMClientError as exc:  # the request is wrong: a 400, not an engine failure
            yield _client_failure(exc)
        except Exception as exc:  # the engine failed; the gateway decides what the client sees
            yield EngineFailure(status=500, message=f"engine failure: {type(exc).__name__}: {exc}")


class InProcessEngineClient:
    """EngineClient over the replica this code runs in (no handle, no serialization)."""

    def __init__(self, replica: EngineReplica) -> None:
        self._replica = replica

    def generate(self, call: EngineCall, body: dict[str, Any]) -> AsyncGenerator[EngineEvent, None]:
        return self._replica.generate(call.value, body)

    async def complete(self, call: EngineCall, body: dict[str, Any]) -> list[EngineEvent]:
        return await self._replica.complete(call.value, body)


def _parse_request(call: EngineCall, body: dict[str, Any]) -> Any:
    if call is EngineCall.CHAT:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        return ChatCompletionRequest.model_validate(body)
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    return CompletionRequest.model_validate(body)


def _error_failure(error: Any) -> EngineFailure:
    code = error.code
    return EngineFailure(
        status=int(code) if str(code).isdigit() else 500,
        message=error.message,
        type=error.type,
        param=error.param,
    )


def _validation_failure(exc: ValidationError) -> EngineFailure:
    first = exc.errors()[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    message = first["msg"]
    if param:
        message = f"Invalid value for '{param}': {message}"
    return EngineFailure(status=400, message=message, type="invalid_request_error", param=param)


def _client_failure(exc: Exception) -> EngineFailure:
    """vLLM's verdict on a bad request, without the rejected value (never echo the input)."""
    param = getattr(exc, "parameter", None)
    message = str(exc.args[0]) if exc.args else "The request is invalid."
    return EngineFailure(status=400, message=message[:500], type="invalid_request_error", param=param)


def _sse_payload(line: str) -> str:
    payload = line.strip()
    if payload.startswith("data:"):
        payload = payload[len("data:") :].strip()
    return payload


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return "unknown"


def _own_kv_events_endpoints(llm_config: Any) -> tuple[str, str] | None:
    """Give this replica's engine IPC endpoints of its own, for publishing and for replay
    (replicas of one deployment share their config, and a TCP port would collide on one node);
    None when events are off."""
    events = (llm_config.engine_kwargs or {}).get("kv_events_config")
    if not isinstance(events, dict) or not events.get("enable_kv_cache_events"):
        return None
    name = uuid.uuid4().hex[:12]
    folder = os.environ.get("TMPDIR") or "/tmp"
    endpoint, replay = ipc_endpoint(folder, name), ipc_endpoint(folder, f"{name}-r")
    llm_config.engine_kwargs["kv_events_config"] = {**events, "endpoint": endpoint, "replay_endpoint": replay}
    # ray.serve.llm caches the engine config built from engine_kwargs (get_engine_config), and
    # the deployment's options already built it: build it again from the changed kwargs.
    llm_config._engine_config = None
    return endpoint, replay


def ipc_endpoint(folder: str, name: str) -> str:
    """``ipc://`` in ``folder``, or in /tmp when a path there would be too long to bind."""
    path = f"{folder.rstrip('/')}/zumik-kv-{name}"
    if len(path.encode()) > IPC_PATH_MAX:
        path = f"/tmp/zumik-kv-{name}"
    return f"ipc://{path}"


def unpin_hash_seed(environ: MutableMapping[str, str]) -> str | None:
    """Drop ``PYTHONHASHSEED`` from ``environ`` (the one the engine core process inherits) and
    return it; None when it was not set. vLLM derives its first block's parent from it when it
    is set (``vllm/v1/core/kv_cache_utils.py`` ``resolve_none_hash_seed``), so an engine that
    publishes KV events must hash with the default seed the gateway reproduces."""
    return environ.pop("PYTHONHASHSEED", None)


def kv_events_of(batch: Any, replica: str) -> list[KvEvent]:
    """vLLM's ``KVEventBatch`` as the owner's ``KvEvent`` values (blocks named as in residency)."""
    from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

    events: list[KvEvent] = []
    for event in batch.events:
        if isinstance(event, BlockStored):
            events.append(KvEvent(replica, stored=tuple(event_key(h) for h in event.block_hashes)))
        elif isinstance(event, BlockRemoved):
            events.append(KvEvent(replica, removed=tuple(event_key(h) for h in event.block_hashes)))
        elif isinstance(event, AllBlocksCleared):
            events.append(KvEvent(replica, cleared=True))
    return events


Deliver = Callable[[list[KvEvent]], Awaitable[Any]]


async def forward_kv_events(
    endpoint: str, replica: str, deliver: Deliver, *, replay: str | None = None
) -> None:
    """Subscribe to the engine's events on ``endpoint`` and hand them to ``deliver`` in batches:
    a batch is what the engine published from one message on until ``KV_EVENTS_BATCH_S`` later.
    The forwarder wakes once per batch, not per message: it waits for the first message, sleeps
    while the socket queues the others, then takes every queued message at once (what overflows
    the socket's queue meanwhile is a gap, caught up as below). With ``replay`` (the engine's
    replay endpoint) what was published before the subscription and any range a gap in the
    sequence numbers shows is fetched from the engine's buffer first, in order, each message
    once. A message that does not decode is skipped (logged); a batch ``deliver`` fails on is
    lost (logged): the gateways' record of sends stays, and later events correct the owner's
    view."""
    import msgspec
    import zmq
    import zmq.asyncio
    from vllm.distributed.kv_events import KVEventBatch

    decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
    socket = zmq.asyncio.Context.instance().socket(zmq.SUB)
    socket.connect(endpoint)
    socket.setsockopt_string(zmq.SUBSCRIBE, KV_EVENTS_TOPIC)
    queued: zmq.Socket[bytes] = zmq.Socket.shadow(socket.underlying)  # the same socket, no event loop
    pending: list[KvEvent] = []
    last_seq: int | None = None

    def take(seq: int | None, events: list[KvEvent]) -> None:
        nonlocal last_seq
        last_seq = seq if seq is not None else last_seq
        pending.extend(events)

    async def catch_up(start: int, before: int | None) -> None:
        """Take the replayed messages from ``start`` up to ``before`` (all when None)."""
        replayed = None
        if replay is not None:
            replayed = await replay_kv_events(replay, start, decoder, replica, timeout_s=KV_REPLAY_TIMEOUT_S)
        for seq, events in replayed or []:
            if (before is None or seq < before) and (last_seq is None or seq > last_seq):
                take(seq, events)
        if before is not None and (last_seq is None or last_seq + 1 < before):
            first = start if last_seq is None else last_seq + 1
            log.warning("KV events %d..%d from the engine were missed", first, before - 1)

    try:
        if replay is not None:
            await catch_up(0, None)  # what the engine published before this subscription
        while True:
            if not pending:
                await socket.poll()  # the first message of the next batch (a poll: never a lost receive)
            await asyncio.sleep(KV_EVENTS_BATCH_S)  # the rest of the batch queues meanwhile
            while (frames := _queued_message(queued)) is not None:
                seq, events = _decoded(frames, decoder, replica)
                if seq is not None and last_seq is not None and seq <= last_seq:
                    continue  # taken from a replay already
                if seq is not None and last_seq is not None and seq > last_seq + 1:
                    await catch_up(last_seq + 1, seq)
                elif seq is not None and last_seq is None and seq > 0 and replay is not None:
                    await catch_up(0, seq)  # the first replay found the engine silent, or not bound
                take(seq, events)
            if not pending:
                continue
            batch, pending = pending, []
            try:
                await deliver(batch)
            except Exception as exc:  # the owner restarts: these events are lost, the sends stay
                log.warning("KV events not delivered (%s: %s)", type(exc).__name__, exc)
    finally:
        socket.close(linger=0)


def _queued_message(socket: Any) -> list[bytes] | None:
    """The next message the socket holds already, or None when it holds none."""
    import zmq

    try:
        return socket.recv_multipart(zmq.NOBLOCK)
    except zmq.Again:
        return None


async def replay_kv_events(
    endpoint: str, start: int, decoder: Any, replica: str, *, timeout_s: float = KV_REPLAY_TIMEOUT_S
) -> list[tuple[int, list[KvEvent]]] | None:
    """The messages from sequence number ``start`` on that the engine's replay buffer still
    holds (vLLM's protocol: a DEALER sends the start, the engine answers each message, then an
    end marker); None when the engine does not answer within ``timeout_s`` (logged)."""
    import zmq
    import zmq.asyncio

    socket = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    socket.connect(endpoint)
    replayed: list[tuple[int, list[KvEvent]]] = []
    try:
        await socket.send_multipart([b"", start.to_bytes(8, "big")])
        while await socket.poll(timeout_s * 1000):
            frames = await socket.recv_multipart()
            if len(frames) == 4 and frames[2] == REPLAY_END:
                return replayed
            seq, events = _decoded(frames[1:], decoder, replica)
            if seq is not None:
                replayed.append((seq, events))
        log.warning("the engine's KV event replay did not answer within %.0f s", timeout_s)
        return None
    finally:
        socket.close(linger=0)


def _decoded(frames: Sequence[bytes], decoder: Any, replica: str) -> tuple[int | None, list[KvEvent]]:
    """One published message (topic, 8-byte sequence number, msgpack batch) as its sequence
    number and events; (None, []) for one that does not decode."""
    try:
        _topic, seq, payload = frames
        return int.from_bytes(seq, "big"), kv_events_of(decoder.decode(payload), replica)
    except Exception as exc:
        log.warning("a KV event message skipped (%s: %s)", type(exc).__name__, exc)
        return None, []


def _owner_delivery(app_name: str) -> Deliver:
    """Send a batch to ``app_name``'s scheduler owner (its handle made on first use)."""
    handle: Any = None

    async def deliver(batch: list[KvEvent]) -> None:
        nonlocal handle
        if handle is None:
            handle = serve.get_deployment_handle(OWNER_DEPLOYMENT, app_name)
        await handle.engine_events.remote(batch)

    return deliver


def _report_end(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("KV event forwarding stopped: %r", task.exception())
