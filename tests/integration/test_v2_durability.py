"""Durability: redis-server is killed with SIGKILL during concurrent writes, several times.

Writers create artifacts and append turns through the real HTTP server, each write with its own
Idempotency-Key, retried with the same key until acknowledged (as a client should after a 503
or a dropped connection). After every cycle, every acknowledged object and turn must be there
(none lost), every turn must come from a request that was sent (none unexpected), no turn may
appear twice (none duplicated), and sequence numbers stay gap-free and in order.
"""

from __future__ import annotations

import threading
import time
import uuid

import httpx
import pytest

from tests.support.waiting import wait_until
from zumik_serve.store.local_redis import embedded_redis

pytestmark = [pytest.mark.redis, pytest.mark.ray, pytest.mark.vllm]

CYCLES = 3
WRITERS = 4


class Writer(threading.Thread):
    def __init__(self, url: str, key: str, session: str, index: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.url, self.session, self.index, self.stop = url, session, index, stop
        self.headers = {"Authorization": f"Bearer {key}"}
        self.acked_artifacts: dict[str, str] = {}  # id -> content
        self.acked_turns: dict[int, str] = {}  # seq -> content
        self.sent_turns: set[str] = set()
        self.retries = 0
        self.error: BaseException | None = None

    def _until_acked(
        self, client: httpx.Client, path: str, body: dict, deadline: float
    ) -> httpx.Response | None:
        headers = {**self.headers, "Idempotency-Key": str(uuid.uuid4())}
        while time.monotonic() < deadline:
            try:
                response = client.post(path, json=body, headers=headers)
            except httpx.HTTPError:
                response = None
            if response is not None and response.status_code == 201:
                return response
            if response is not None:
                assert response.status_code == 503, response.text  # an outage, never another error
                assert int(response.headers["retry-after"]) >= 1
            self.retries += 1
            time.sleep(0.05)
        return None

    def run(self) -> None:
        try:
            self._write_until_stopped()
        except BaseException as exc:  # surfaced by the test, not lost in the thread
            self.error = exc

    def _write_until_stopped(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            n = 0
            while not self.stop.is_set():
                n += 1
                deadline = time.monotonic() + 60
                content = f"w{self.index}-{n}-{uuid.uuid4()}"
                art = self._until_acked(
                    client, "/v2/artifacts", {"role": "document", "content": content}, deadline
                )
                if art is not None:
                    self.acked_artifacts[art.json()["id"]] = content
                self.sent_turns.add(content)
                turn = self._until_acked(
                    client,
                    f"/v2/sessions/{self.session}/turns",
                    {"role": "user", "content": content},
                    deadline,
                )
                if turn is not None:
                    self.acked_turns[turn.json()["seq"]] = content


def test_no_acknowledged_write_lost_across_kill_9(running_stack, http: httpx.Client) -> None:
    stack = running_stack.stack
    session = http.post("/v2/sessions", json={}).json()["id"]
    stop = threading.Event()
    writers = [Writer(running_stack.url, running_stack.tenant_key, session, i, stop) for i in range(WRITERS)]
    for writer in writers:
        writer.start()
    try:
        for _ in range(CYCLES):
            _wait_for_progress(writers, "writes acknowledged before the next kill")
            assert stack.redis is not None
            port = stack.redis.port
            retries = sum(w.retries for w in writers)
            stack.redis.kill()
            wait_until(
                lambda before=retries: sum(w.retries for w in writers) > before,
                timeout_s=30, what="a writer to feel the outage",
            )  # fmt: skip
            # As `zumik serve` starts it: same folder, port and password files.
            stack.redis = embedded_redis(running_stack.home, port=port).start()
        _wait_for_progress(writers, "writes acknowledged after the last restart")
    finally:
        stop.set()
        for writer in writers:
            writer.join(timeout=90)

    _drain_stale_connections(running_stack, session)
    assert [w.error for w in writers if w.error is not None] == []
    assert sum(w.retries for w in writers) > 0, "the outages were not felt; the test proves nothing"
    acked_turns = {seq: content for w in writers for seq, content in w.acked_turns.items()}
    acked_artifacts = {aid: content for w in writers for aid, content in w.acked_artifacts.items()}
    assert len(acked_turns) > 10 and len(acked_artifacts) > 10

    turns = http.get(f"/v2/sessions/{session}").json()["turns"]
    contents = [t["content"] for t in turns]
    assert [t["seq"] for t in turns] == list(range(1, len(turns) + 1))  # gap-free, ordered
    assert len(contents) == len(set(contents)), "a turn was duplicated"
    sent = set().union(*(w.sent_turns for w in writers))
    assert set(contents) <= sent, "a turn appeared that no client sent"
    for seq, content in acked_turns.items():
        assert turns[seq - 1]["content"] == content, f"acknowledged turn {seq} lost or moved"
    for artifact_id, content in acked_artifacts.items():
        read = http.get(f"/v2/artifacts/{artifact_id}")
        assert read.status_code == 200 and read.json()["content"] == content


def _wait_for_progress(writers: list[Writer], what: str, writes: int = 10) -> None:
    """Until the writers have had ``writes`` more writes acknowledged than now."""

    def acked() -> int:
        return sum(len(w.acked_turns) + len(w.acked_artifacts) for w in writers)

    start = acked()
    wait_until(lambda: acked() >= start + writes, timeout_s=60, what=what)


def _drain_stale_connections(running_stack, session: str) -> None:
    """Leave the shared stack as the next tests expect it: the gateway's pooled connections to the
    killed servers fail once each (a 503 with Retry-After, the defined answer) and reconnect, so
    concurrent reads are sent until a whole round of them succeeds."""
    import asyncio

    async def round_ok() -> bool:
        headers = {"Authorization": f"Bearer {running_stack.tenant_key}"}
        async with httpx.AsyncClient(base_url=running_stack.url, headers=headers, timeout=60) as client:
            responses = await asyncio.gather(*(client.get(f"/v2/sessions/{session}") for _ in range(64)))
        statuses = {r.status_code for r in responses}
        assert statuses <= {200, 503}, statuses
        return statuses == {200}

    deadline = time.monotonic() + 60
    while not asyncio.run(round_ok()):
        assert time.monotonic() < deadline, "the gateway still fails reads a minute after Redis came back"
        time.sleep(0.5)
