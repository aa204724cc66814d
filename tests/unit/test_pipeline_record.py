"""The decision record's save beside the work after the first output, through the real HTTP app in
process (real Redis, the shared FakeEngine); the saves are held at the gateway's own decision sink
(which then writes to Redis as it always does), so what runs while a save is under way shows.

Invariants held here:
- an answer, whole or streamed, goes out only once its decision is saved: its decision id is
  readable at /v2/decisions/{id} as soon as the answer is there; the session exchange (and the
  rate settlement, the reuse figures) run while the save is under way, not after it;
- the client's error (the engine's 4xx) is raised only once the decision and its attempts are
  saved;
- a failed save fails the request as it did when the save came first (its error, not another);
- a deadline that passes during the save answers 504, and the decision is saved all the same;
- the tenant's salt epoch is read with the release, in the same round trip: a purge's new epoch
  is what the very next request runs with;
- a snapshot's read and a session's check go side by side; the snapshot's error comes first;
- the reuse ledger's write (it only counts the answer) starts once the answer's last bytes have
  been sent, on every generation surface, whole or streamed, and it does happen.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.inprocess import InProcessGateway, make_gateway, wait_until
from zumik_serve.engines.protocol import EngineFailure
from zumik_serve.errors import StoreUnavailableError
from zumik_serve.qos.quota import RateSettlement
from zumik_serve.routing.decision import DecisionRecord
from zumik_serve.routing.dispatch import DecisionSink
from zumik_serve.routing.retry import Attempt
from zumik_serve.store.client import gateway_client
from zumik_serve.tenancy.store import RedisTenantStore
from zumik_serve.tenancy.tenant import cache_salt

pytestmark = pytest.mark.redis

CHAT = {"model": "zumik-tiny", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 8}


class HeldSaves:
    """The gateway's decision sink with every save held until ``open`` is set; then the save
    goes on to the real sink, or raises ``failure`` instead when one is set."""

    def __init__(self, sink: DecisionSink) -> None:
        self.sink = sink
        self.open = asyncio.Event()
        self.held: list[str] = []  # decision ids whose save has started
        self.saved: list[str] = []
        self.failure: Exception | None = None

    async def save(
        self, tenant: str, record: DecisionRecord, attempts: Sequence[Attempt], sources: Sequence[str] = (),
        settlement: RateSettlement | None = None,
    ) -> None:  # fmt: skip
        self.held.append(record.decision_id)
        await self.open.wait()
        if self.failure is not None:
            raise self.failure
        await self.sink.save(tenant, record, attempts, sources, settlement)
        self.saved.append(record.decision_id)


@pytest.fixture
async def gateway(module_redis_url: str, tiny_model_dir: Path) -> AsyncIterator[InProcessGateway]:
    yield make_gateway(module_redis_url, tiny_model_dir)


@pytest.fixture
def saves(gateway: InProcessGateway) -> HeldSaves:
    dispatcher = gateway.context.dispatcher
    held = HeldSaves(dispatcher._decisions)
    dispatcher._decisions = held  # the one sink every decision of this gateway goes to
    return held


async def _tenant_client(gateway: InProcessGateway, name: str) -> httpx.AsyncClient:
    return gateway.client(await gateway.create_tenant(name))


async def _newest_decision(http: httpx.AsyncClient) -> dict[str, Any]:
    listed = (await http.get("/v2/decisions", params={"limit": "1"})).json()["data"]
    assert listed, "no decision was recorded"
    return dict(listed[0])


@pytest.mark.parametrize("stream", [False, True])
async def test_the_answer_waits_for_its_record_while_the_exchange_is_recorded_beside_it(
    gateway: InProcessGateway, saves: HeldSaves, stream: bool
) -> None:
    async with await _tenant_client(gateway, f"beside-{str(stream).lower()}") as http:
        session = (await http.post("/v2/sessions", json={})).json()["id"]
        answer = asyncio.create_task(
            http.post(
                "/v1/chat/completions", json={**CHAT, "stream": stream}, headers={"x-zumik-session": session}
            )
        )

        async def exchange_recorded() -> bool:
            turns = (await http.get(f"/v2/sessions/{session}")).json()["turns"]
            return len(turns) == 2

        await wait_until(lambda: _true(bool(saves.held)), what="the decision's save to start")
        if not stream:  # a stream's exchange is recorded at its end, after the headers
            await wait_until(exchange_recorded, what="the exchange, recorded while the save is held")
        assert not answer.done() and saves.saved == []
        saves.open.set()
        response = await answer
        assert response.status_code == 200, response.text
        decision = response.headers["x-zumik-decision-id"]
        assert saves.saved == [decision]
        stored = await http.get(f"/v2/decisions/{decision}")  # readable at once
        assert stored.status_code == 200 and stored.json()["attempts"][0]["outcome"] == "ok"
        assert await exchange_recorded()
    phases = [part.split(";")[0] for part in response.headers["server-timing"].split(", ")]
    assert phases[:4] == ["queue", "decide", "first-output", "record"]


async def test_the_clients_error_is_answered_once_its_decision_is_saved(
    gateway: InProcessGateway, saves: HeldSaves
) -> None:
    gateway.engine.fail_next(
        EngineFailure(status=400, message="'temperature' must be below 2", param="temperature")
    )
    async with await _tenant_client(gateway, "client-error") as http:
        answer = asyncio.create_task(http.post("/v1/chat/completions", json=CHAT))
        await wait_until(lambda: _true(bool(saves.held)), what="the decision's save to start")
        assert not answer.done()
        saves.open.set()
        response = await answer
        assert response.status_code == 400 and response.json()["error"]["param"] == "temperature"
        assert saves.saved == saves.held
        decision = await _newest_decision(http)
    assert decision["id"] == saves.held[0]
    assert [(a["outcome"], a["action"]) for a in decision["attempts"]] == [("client_error", "fail")]


@pytest.mark.parametrize("stream", [False, True])
async def test_a_failed_save_fails_the_request_with_its_own_error(
    gateway: InProcessGateway, saves: HeldSaves, stream: bool
) -> None:
    saves.failure = StoreUnavailableError(
        "The decision store is unavailable. Retry shortly.", retry_after_s=1
    )
    saves.open.set()
    async with await _tenant_client(gateway, f"failed-save-{str(stream).lower()}") as http:
        response = await http.post("/v1/chat/completions", json={**CHAT, "stream": stream})
    assert response.status_code == 503, response.text
    assert "decision store" in response.json()["error"]["message"]
    assert response.headers["retry-after"] == "1"
    assert len(saves.held) == 1 and saves.saved == []


async def test_a_deadline_passing_during_the_save_is_504_and_the_decision_is_saved(
    gateway: InProcessGateway, saves: HeldSaves
) -> None:
    async with await _tenant_client(gateway, "deadline") as http:
        answer = asyncio.create_task(
            http.post("/v1/chat/completions", json=CHAT, headers={"x-zumik-timeout-s": "1"})
        )
        await wait_until(lambda: _true(bool(saves.held)), what="the decision's save to start")
        await asyncio.sleep(1.2)  # the deadline passes while the save is held
        saves.open.set()
        response = await answer
        assert response.status_code == 504, response.text
        assert saves.saved == saves.held
        decision = await _newest_decision(http)
    assert decision["id"] == saves.held[0] and decision["attempts"][0]["outcome"] == "ok"


async def test_a_request_runs_with_the_salt_epoch_read_with_its_release(gateway: InProcessGateway) -> None:
    key = await gateway.create_tenant(f"epoch-{uuid.uuid4().hex[:12]}")
    async with gateway.client(key) as http:
        assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200
        before = gateway.engine.bodies[-1]["cache_salt"]
        tenant = (await gateway.pipeline.authenticate(f"Bearer {key}")).id
        client = gateway_client(gateway.redis_url)
        try:  # a purge elsewhere moves the epoch on: the very next request runs with the new one
            epoch = await RedisTenantStore(client).rotate_salt_epoch(tenant)
        finally:
            await client.aclose()
        assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200
    after = gateway.engine.bodies[-1]["cache_salt"]
    secret = await gateway.context.salts.secret()
    assert (before, after) == (cache_salt(secret, tenant, 0), cache_salt(secret, tenant, epoch))
    assert epoch == 1


async def test_a_snapshot_and_a_session_are_read_together_and_the_snapshots_error_comes_first(
    gateway: InProcessGateway,
) -> None:
    async with gateway.client() as http:
        artifact = (await http.post("/v2/artifacts", json={"role": "system", "content": "Be terse."})).json()
        bundle = (await http.post("/v2/bundles", json={"artifacts": [artifact["id"]]})).json()["id"]
        snapshot = (await http.post("/v2/snapshots", json={"bundle": bundle})).json()["id"]
        session = (await http.post("/v2/sessions", json={})).json()["id"]
        both = {"x-zumik-snapshot": snapshot, "x-zumik-session": session}
        neither = {"x-zumik-snapshot": "snp_nope", "x-zumik-session": "ses_nope"}
        answered = await http.post("/v1/chat/completions", json=CHAT, headers=both)
        unknown = await http.post("/v1/chat/completions", json=CHAT, headers=neither)
        no_session = await http.post(
            "/v1/chat/completions", json=CHAT, headers={**both, "x-zumik-session": "ses_nope"}
        )
        turns = (await http.get(f"/v2/sessions/{session}")).json()["turns"]
    assert answered.status_code == 200, answered.text
    assert gateway.engine.bodies[-1]["messages"][0] == {"role": "system", "content": "Be terse."}
    assert [t["role"] for t in turns] == ["user", "assistant"]
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "snapshot"
    assert no_session.status_code == 404 and no_session.json()["error"]["param"] == "session"
    assert len(gateway.engine.calls) == 1


SURFACES = [
    ("/v1/chat/completions", CHAT, b"}"),
    ("/v1/chat/completions", {**CHAT, "stream": True}, b"data: [DONE]"),
    ("/v1/completions", {"model": "zumik-tiny", "prompt": "Hello there", "max_tokens": 8}, b"}"),
    ("/v1/responses", {"model": "zumik-tiny", "input": "Hello there"}, b"}"),
    ("/v1/responses", {"model": "zumik-tiny", "input": "Hello there", "stream": True}, b"response.completed"),
    ("/v2/generate", {"input": "Hello there", "max_tokens": 8}, b"}"),
]


@pytest.mark.parametrize(("path", "body", "last"), SURFACES)
async def test_the_ledger_is_written_once_the_answer_is_sent(
    gateway: InProcessGateway, path: str, body: dict[str, Any], last: bytes
) -> None:
    events: list[str] = []
    app = gateway.app

    async def observed(scope: Any, receive: Any, send: Any) -> None:
        async def sending(message: MutableMapping[str, Any]) -> None:
            await send(message)
            if message["type"] == "http.response.body" and last in message.get("body", b""):
                events.append("answer sent")

        await app(scope, receive, sending)

    reuse = gateway.context.reuse
    record = reuse.record

    async def counted(*args: Any, **kwargs: Any) -> None:
        events.append("ledger")
        await record(*args, **kwargs)

    reuse.record = counted  # type: ignore[method-assign]
    key = await gateway.create_tenant(f"ledger-{uuid.uuid4().hex[:12]}")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=observed), base_url="http://zumik.test",
        headers={"Authorization": f"Bearer {key}"},
    ) as http:  # fmt: skip
        response = await http.post(path, json=body)
        assert response.status_code == 200, response.text
        await wait_until(lambda: _true("ledger" in events), what="the ledger's write")
    assert events == ["answer sent", "ledger"]


async def _true(value: bool) -> bool:
    return value
