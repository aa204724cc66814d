"""A replica's forwarding of its engine's KV events (engines/replica.py) over real ZMQ sockets.

Invariants held here:
- what vLLM's own publisher (``ZmqEventPublisher``, as the engine core runs it) sends on an IPC
  endpoint reaches the owner's ``deliver`` as ``KvEvent`` values: stored and removed blocks
  named as residency names them (``block_hashes.event_key`` of the event's 64-bit hashes, in
  the event's order), a cleared cache as ``cleared``, events published together in one batch,
  and messages published within ``KV_EVENTS_BATCH_S`` of each other in one delivery, in order;
- a message that does not decode is skipped and the next one still arrives; a batch the owner
  fails to take is dropped and the next batch is still delivered;
- with the engine's replay endpoint, what it published before the forwarder subscribed and any
  range a gap in the sequence numbers shows are fetched from its buffer: every message reaches
  the owner once, in order; a replay socket that does not answer costs a logged gap, never the
  forwarding;
- the owner's engine residency of a replica holds what its engine's events say and nothing a
  gateway only sent;
- an engine that publishes events runs without ``PYTHONHASHSEED`` (vLLM would derive its first
  block's parent from it, and the gateway's hashes would never match), and its IPC path fits
  a Unix socket.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from pathlib import Path

import msgspec
import pytest
import zmq
import zmq.asyncio
from vllm.distributed.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    ZmqEventPublisher,
)

from zumik_serve.engines import replica as replica_module
from zumik_serve.engines.replica import (
    IPC_PATH_MAX,
    KV_EVENTS_TOPIC,
    forward_kv_events,
    ipc_endpoint,
    unpin_hash_seed,
)
from zumik_serve.routing.block_hashes import event_key
from zumik_serve.routing.breaker import BreakerPolicy
from zumik_serve.routing.owner import KvEvent, ProfileOwner, Report, Sent

WAIT_S = 20.0


class Owner:
    """The owner's side of delivery: the batches it took, failing the first ``fail`` of them."""

    def __init__(self, fail: int = 0) -> None:
        self.batches: list[list[KvEvent]] = []
        self.refused = 0
        self._fail = fail

    async def deliver(self, batch: list[KvEvent]) -> None:
        if self.refused < self._fail:
            self.refused += 1
            raise ConnectionError("the owner restarts")
        self.batches.append(batch)

    def events(self) -> list[KvEvent]:
        return [event for batch in self.batches for event in batch]


@pytest.fixture
def endpoint(tmp_path: Path) -> str:
    return ipc_endpoint(str(tmp_path), uuid.uuid4().hex[:12])


@pytest.fixture
async def forwarding(endpoint: str) -> AsyncIterator[Callable[[Owner], None]]:
    tasks: list[asyncio.Task[None]] = []

    def start(owner: Owner) -> None:
        tasks.append(asyncio.create_task(forward_kv_events(endpoint, "r0", owner.deliver)))

    yield start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def until(condition: Callable[[], bool], publish: Callable[[], None] | None = None) -> None:
    """Wait for ``condition``, publishing again meanwhile when ``publish`` is given (a SUB
    socket misses what is published before it is connected)."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, "nothing arrived"
        if publish is not None:
            publish()
        await asyncio.sleep(0.05)


async def settled(owner: Owner, publish_marker: Callable[[int], None]) -> None:
    """Publish a marker block after the probes and wait for it: one publisher, forwarded in
    order, so every probe still on its way has arrived once the marker has. A fixed sleep
    instead loses to a loaded machine (a late probe lands in the batch under test)."""
    marker = 999_999
    publish_marker(marker)
    await until(lambda: any(event_key(marker) in event.stored for event in owner.events()))
    owner.batches.clear()


def stored(hashes: list[int]) -> BlockStored:
    return BlockStored(
        block_hashes=list[bytes | int](hashes), parent_block_hash=None,
        token_ids=list(range(4 * len(hashes))), block_size=4, lora_id=None, medium="GPU", lora_name=None,
    )  # fmt: skip


async def test_what_vllms_publisher_sends_reaches_the_owner_as_residency_keys(
    endpoint: str, forwarding: Callable[[Owner], None]
) -> None:
    publisher = ZmqEventPublisher(0, endpoint=endpoint, topic=KV_EVENTS_TOPIC)
    owner = Owner()
    forwarding(owner)
    try:
        await until(
            lambda: bool(owner.batches),
            lambda: publisher.publish(KVEventBatch(ts=time.time(), events=[AllBlocksCleared()])),
        )
        await settled(owner, lambda h: publisher.publish(KVEventBatch(ts=time.time(), events=[stored([h])])))
        hashes = [2**64 - 1, 7, 2**63 + 5]
        publisher.publish(
            KVEventBatch(
                ts=time.time(),
                events=[stored(hashes), BlockRemoved(block_hashes=[7], medium="GPU"), AllBlocksCleared()],
            )
        )
        await until(lambda: bool(owner.batches))
        keys = tuple(event_key(h) for h in hashes)
        assert keys == ("ffffffffffffffff", "0000000000000007", "8000000000000005")
        assert owner.batches == [
            [
                KvEvent("r0", stored=keys),
                KvEvent("r0", removed=(keys[1],)),
                KvEvent("r0", cleared=True),
            ]
        ]
    finally:
        publisher.shutdown()


async def test_a_bad_message_or_a_failed_delivery_never_stops_forwarding(
    endpoint: str, forwarding: Callable[[Owner], None]
) -> None:
    socket: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PUB)
    socket.bind(endpoint)
    encoder = msgspec.msgpack.Encoder()
    seq = iter(range(1_000_000))

    def send(frames_after_topic: list[bytes]) -> None:
        socket.send_multipart([KV_EVENTS_TOPIC.encode(), *frames_after_topic])

    def batch(*hashes: int) -> list[bytes]:
        events = KVEventBatch(ts=time.time(), events=[stored(list(hashes))])
        return [next(seq).to_bytes(8, "big"), encoder.encode(events)]

    owner = Owner(fail=1)
    forwarding(owner)
    try:
        await until(lambda: owner.refused == 1, lambda: send(batch(1)))  # connected; lost
        await settled(owner, lambda h: send(batch(h)))
        send([next(seq).to_bytes(8, "big"), b"not msgpack"])
        send([b"one frame short"])
        send(batch(2, 3))
        await until(lambda: bool(owner.batches))
        assert owner.events() == [KvEvent("r0", stored=(event_key(2), event_key(3)))]
    finally:
        socket.close(linger=0)


async def test_messages_published_within_the_batch_time_reach_the_owner_in_one_delivery(
    endpoint: str, forwarding: Callable[[Owner], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(replica_module, "KV_EVENTS_BATCH_S", 1.0)
    socket: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PUB)
    socket.bind(endpoint)
    encoder = msgspec.msgpack.Encoder()
    seq = iter(range(1_000_000))

    def send(*hashes: int) -> None:
        events = KVEventBatch(ts=time.time(), events=[stored(list(hashes))])
        socket.send_multipart(
            [KV_EVENTS_TOPIC.encode(), next(seq).to_bytes(8, "big"), encoder.encode(events)]
        )

    owner = Owner()
    forwarding(owner)
    try:
        await until(lambda: bool(owner.batches), lambda: send(1))  # connected
        await settled(owner, send)
        for h in range(10, 15):
            send(h)
        await until(lambda: bool(owner.batches))
        await asyncio.sleep(1.5)  # no second delivery follows
        assert owner.batches == [[KvEvent("r0", stored=(event_key(h),)) for h in range(10, 15)]]
    finally:
        socket.close(linger=0)


async def test_what_the_engine_published_before_the_forwarder_subscribed_is_replayed(
    endpoint: str, tmp_path: Path
) -> None:
    replay = ipc_endpoint(str(tmp_path), uuid.uuid4().hex[:12] + "-r")
    publisher = ZmqEventPublisher(0, endpoint=endpoint, replay_endpoint=replay, topic=KV_EVENTS_TOPIC)
    owner = Owner()
    task: asyncio.Task[None] | None = None
    try:
        for hashes in ([1, 2], [3], [4, 5]):  # seq 0, 1, 2: nobody subscribed yet
            publisher.publish(KVEventBatch(ts=time.time(), events=[stored(hashes)]))
        await asyncio.sleep(0.5)  # the publisher's thread has sent them (to no one) and kept them
        task = asyncio.create_task(forward_kv_events(endpoint, "r0", owner.deliver, replay=replay))
        await until(lambda: len(owner.events()) >= 3)
        publisher.publish(KVEventBatch(ts=time.time(), events=[stored([6])]))  # seq 3, live
        await until(lambda: len(owner.events()) >= 4)
        await asyncio.sleep(0.3)  # nothing more comes (no message twice)
        assert owner.events() == [
            KvEvent("r0", stored=tuple(event_key(h) for h in hashes)) for hashes in ([1, 2], [3], [4, 5], [6])
        ]
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        publisher.shutdown()


class Engine:
    """vLLM's side of the sockets, sent by hand: a PUB that can skip sequence numbers, and a
    ROUTER that answers replay requests as ``ZmqEventPublisher`` does (each message from the
    asked start, then the end marker), or not at all."""

    def __init__(self, endpoint: str, replay: str, *, answers: bool = True) -> None:
        context = zmq.asyncio.Context.instance()
        self.pub = context.socket(zmq.PUB)
        self.pub.bind(endpoint)
        self.router = context.socket(zmq.ROUTER)
        self.router.bind(replay)
        self.sent: dict[int, bytes] = {}
        self.asked: list[int] = []
        self.answers = answers
        self._encoder = msgspec.msgpack.Encoder()
        self._serving = asyncio.create_task(self._serve())

    def message(self, seq: int, *hashes: int) -> list[bytes]:
        payload = self._encoder.encode(KVEventBatch(ts=time.time(), events=[stored(list(hashes))]))
        self.sent[seq] = payload
        return [KV_EVENTS_TOPIC.encode(), seq.to_bytes(8, "big"), payload]

    async def publish(self, seq: int, *hashes: int) -> None:
        await self.pub.send_multipart(self.message(seq, *hashes))

    async def _serve(self) -> None:
        while True:
            client, _, start = await self.router.recv_multipart()
            self.asked.append(int.from_bytes(start, "big"))
            if not self.answers:
                continue
            for seq in sorted(s for s in self.sent if s >= int.from_bytes(start, "big")):
                await self.router.send_multipart([client, b"", KV_EVENTS_TOPIC.encode(),
                                                  seq.to_bytes(8, "big"), self.sent[seq]])  # fmt: skip
            await self.router.send_multipart([client, b"", b"", replica_module.REPLAY_END, b""])

    async def close(self) -> None:
        self._serving.cancel()
        await asyncio.gather(self._serving, return_exceptions=True)
        self.pub.close(linger=0)
        self.router.close(linger=0)


@pytest.mark.parametrize("answers", [True, False])
async def test_a_gap_in_the_sequence_is_filled_from_the_replay_buffer(
    endpoint: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    answers: bool,
) -> None:
    monkeypatch.setattr(replica_module, "KV_REPLAY_TIMEOUT_S", 0.5)
    replay = ipc_endpoint(str(tmp_path), uuid.uuid4().hex[:12] + "-r")
    engine = Engine(endpoint, replay, answers=answers)
    owner = Owner()
    task = asyncio.create_task(forward_kv_events(endpoint, "r0", owner.deliver, replay=replay))
    try:
        await until(lambda: bool(engine.asked))  # the catch-up at start: nothing published yet
        await asyncio.sleep(1.0)  # its answer (or its timeout) is in
        seq = 0

        async def first() -> None:  # a SUB misses what is sent before it is connected: resend
            nonlocal seq
            if not owner.events():
                await engine.publish(seq, 100 + seq)
                seq += 1

        deadline = time.monotonic() + WAIT_S
        while not owner.events():
            assert time.monotonic() < deadline
            await first()
            await asyncio.sleep(0.1)
        marker = 999_999  # a resend already on its way arrives before the marker
        await engine.publish(seq, marker)
        seq += 1
        await until(lambda: any(event_key(marker) in event.stored for event in owner.events()))
        taken = len(owner.events())
        base = seq
        engine.message(base, 1)  # never published live: the forwarder misses them
        engine.message(base + 1, 2)
        await engine.publish(base + 2, 3)
        await until(lambda: len(owner.events()) >= taken + (3 if answers else 1))
        await asyncio.sleep(0.3)
        events = owner.events()[taken - 1 :]
        keys = [event.stored for event in events]
        if answers:
            assert keys[1:] == [(event_key(1),), (event_key(2),), (event_key(3),)]
            assert base in engine.asked
        else:
            assert keys[1:] == [(event_key(3),)]
            assert f"KV events {base}..{base + 1} from the engine were missed" in caplog.text
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await engine.close()


def test_the_owners_engine_residency_is_the_engines_word_alone() -> None:
    owner = ProfileOwner(BreakerPolicy(), capacity_blocks=100, budget_ratio=Decimal("0.2"))
    keys = tuple(event_key(h) for h in range(1, 6))
    owner.report(Report("g1", 1, (Sent("r0", keys),)), now_ms=0)  # a send: not the engine's word
    assert owner.engine_residency("r0") == ()
    owner.engine_events([KvEvent("r0", stored=keys[:3]), KvEvent("r1", stored=keys)])
    assert set(owner.engine_residency("r0")) == set(keys[:3])
    owner.engine_events([KvEvent("r0", removed=(keys[2],))])
    assert set(owner.engine_residency("r0")) == set(keys[:2])
    owner.engine_events([KvEvent("r1", cleared=True)])
    assert owner.engine_residency("r1") == ()


def test_an_engine_publishing_events_runs_without_a_hash_seed() -> None:
    environ = {"PYTHONHASHSEED": "0", "PATH": "/bin"}
    assert unpin_hash_seed(environ) == "0" and environ == {"PATH": "/bin"}
    assert unpin_hash_seed(environ) is None and environ == {"PATH": "/bin"}


def test_an_ipc_endpoint_fits_a_unix_socket_path() -> None:
    assert ipc_endpoint("/tmp/", "abc") == "ipc:///tmp/zumik-kv-abc"
    deep = "/tmp/" + "d" * 120
    assert ipc_endpoint(deep, "abc") == "ipc:///tmp/zumik-kv-abc"
    assert len(ipc_endpoint("/tmp/" + "d" * 60, "abc")) - len("ipc://") <= IPC_PATH_MAX
