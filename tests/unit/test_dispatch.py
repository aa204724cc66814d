"""The dispatcher against real HTTP servers on loopback playing a managed and a BYOK provider.

Invariants held here:
- a 429 with a short Retry-After is retried on the same route after that delay;
- 500s use the route's retries, then fall back in the profile's order; timeouts and refused
  connections fall back at once; a 4xx is the client's error, no fallback;
- consecutive failures open the route's breaker, the next decision filters it out (recorded),
  after the cooldown one probe goes through and a success closes it again;
- every attempt is recorded with the decision, and every recorded decision replays equal;
- the provider gets the route's model, Zumik's or the tenant's key, a prompt_cache_key, and
  never the engine's cache salt;
- a BYOC call reaches the engine before the prompt's keys the decision did not read are
  computed; they reach residency then, so the same prompt's next decision finds the replica
  holding every block;
- a send of a state object's content to a provider is recorded before the provider sees it
  (route, kind, retention), once per attempt; a refused record sends nothing; the decision is
  saved with its sources.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from profiles import parse_profile
from tests.support.fault_server import Fault, FaultServer
from zumik_serve.engines.protocol import EngineCall, EngineEvent, EngineResponse, ReplicaAssigned
from zumik_serve.errors import InvalidRequestError, NotFoundError, ZumikError
from zumik_serve.qos.quota import RateSettlement
from zumik_serve.routing.decision import DecisionRecord
from zumik_serve.routing.dispatch import Dispatcher, RouteContext
from zumik_serve.routing.prompt_keys import PromptKeys
from zumik_serve.routing.reach import ProviderReach
from zumik_serve.routing.replay import replay
from zumik_serve.routing.retry import ATTEMPTS, Attempt
from zumik_serve.routing.scheduler import ProfileScheduler

PROFILE = """
name: dispatch-test
model: {{source: "builtin:tiny", served_name: tiny}}
engine: {{device: cpu, kv_cache_memory_bytes: 1048576}}
routes:
  - {{name: managed, kind: managed, base_url: "{managed}", model: gpt-test, api_key_env: TEST_MANAGED_KEY,
     prices: {{input: "0.15", cached_input: "0.075", output: "0.60"}}, timeout_s: 1, max_retries: 1}}
  - {{name: byok, kind: byok, base_url: "{byok}", model: gpt-byok,
     prices: {{input: "0.15", cached_input: "0.075", output: "0.60"}}, timeout_s: 1, max_retries: 1}}
  - {{name: local, kind: byoc, replica_hour_usd: "0.50", tokens_per_replica_hour: 2000000}}
routing:
  default_route: managed
  fallback_order: [managed, byok, local]
  breaker: {{failure_threshold: 2, cooldown_s: 10}}
"""
BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hello there"}], "cache_salt": "s" * 64}


class Engine:
    down = False
    on_call: Callable[[], None] | None = None  # run when a call reaches the engine

    async def generate(self, call: EngineCall, body: dict[str, Any]):
        for event in await self.complete(call, body):
            yield event

    async def complete(self, call: EngineCall, body: dict[str, Any]) -> list[EngineEvent]:
        if self.on_call is not None:
            self.on_call()
        if self.down:
            raise ConnectionError("replica gone")
        return [ReplicaAssigned("replica-0"), EngineResponse({"id": "cmpl-local", "choices": []})]


class Harness:
    def __init__(self, managed: FaultServer, byok: FaultServer) -> None:
        self.managed, self.byok = managed, byok
        profile = parse_profile(PROFILE.format(managed=managed.base_url, byok=byok.base_url), source="test")
        self.now_ms = 1_000_000
        self.engine = Engine()
        self.sleeps: list[float] = []
        self.records: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
        self.sources: list[tuple[str, ...]] = []
        self.reached: list[tuple[tuple[str, ...], ProviderReach, int]] = []  # and requests seen then
        self.refuse: str | None = None
        self.dispatcher = Dispatcher(
            ProfileScheduler(profile, replicas={"local": ["r0"]}),
            engines={"r0": self.engine},
            decisions=self,
            byok_key=self._byok_key,
            reach=self,
            environ={"TEST_MANAGED_KEY": "sk-zumik-managed"},
            clock_ms=lambda: self.now_ms,
            sleep=self._sleep,
        )

    async def save(
        self, tenant: str, record: DecisionRecord, attempts: Sequence[Attempt], sources: Sequence[str] = (),
        settlement: RateSettlement | None = None,
    ) -> None:  # fmt: skip
        self.records.append((record.to_json(), list(ATTEMPTS.dump_python(tuple(attempts), mode="json"))))
        self.sources.append(tuple(sources))

    async def sent(self, tenant: str, sources: tuple[str, ...], reach: ProviderReach) -> None:
        if self.refuse is not None:
            raise NotFoundError(f"No object {self.refuse!r} exists for you any more.")
        self.reached.append((sources, reach, len(self.managed.requests) + len(self.byok.requests)))

    async def _byok_key(self, tenant: str, route: str) -> str | None:
        return "sk-tenant-own" if tenant == "ten_a" else None

    async def _sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)

    async def chat(self, tenant: str = "ten_a") -> Any:
        return await self.dispatcher.start(
            EngineCall.CHAT, dict(BODY), stream=False, tenant=tenant, salt="s" * 64, context=RouteContext()
        )

    def last_attempts(self) -> list[tuple[str, str, str]]:
        return [(a["route"], a["outcome"], a["action"]) for a in self.records[-1][1]]


@pytest.fixture
def harness() -> Iterator[Harness]:
    with FaultServer() as managed, FaultServer() as byok:
        yield Harness(managed, byok)


async def test_rate_limit_with_short_retry_after_is_retried_on_the_same_route(harness: Harness) -> None:
    harness.managed.script([Fault.status(429, retry_after_s=1)])
    run = await harness.chat()
    assert run.route == "managed:managed"
    assert harness.last_attempts() == [("managed", "rate_limited", "retry"), ("managed", "ok", "done")]
    assert harness.sleeps == [1.0]
    sent = harness.managed.requests[-1]
    assert sent.body["model"] == "gpt-test" and "cache_salt" not in sent.body
    assert sent.body["prompt_cache_key"].startswith("zk-")
    assert sent.authorization_sha256 == hashlib.sha256(b"sk-zumik-managed").hexdigest()


async def test_server_errors_use_retries_then_fall_back_to_byok_with_the_tenants_key(
    harness: Harness,
) -> None:
    harness.managed.script([Fault.status(500), Fault.status(500)])
    run = await harness.chat()
    assert run.route == "byok:byok"
    assert harness.last_attempts() == [
        ("managed", "server_error", "retry"), ("managed", "server_error", "fallback"), ("byok", "ok", "done"),
    ]  # fmt: skip
    assert harness.byok.requests[-1].authorization_sha256 == hashlib.sha256(b"sk-tenant-own").hexdigest()
    assert harness.byok.requests[-1].body["model"] == "gpt-byok"


async def test_timeout_and_refused_connection_fall_back_at_once(harness: Harness) -> None:
    harness.managed.script([Fault.hang(3)])
    assert (await harness.chat()).route == "byok:byok"
    assert harness.last_attempts()[0][:2] == ("managed", "timeout")
    harness.managed.stop()
    harness.byok.stop()
    run = await harness.chat()  # both providers refuse: the tenant's own engines take it
    assert run.route == "byoc:replica-0"
    outcomes = [(route, outcome) for route, outcome, _ in harness.last_attempts()]
    assert outcomes[:2] == [("managed", "connect_error"), ("byok", "connect_error")]


async def test_client_error_is_the_clients_and_is_not_retried_elsewhere(harness: Harness) -> None:
    harness.managed.script([Fault.status(400, message="bad temperature")])
    with pytest.raises(InvalidRequestError):
        await harness.chat()
    assert harness.last_attempts() == [("managed", "client_error", "fail")]
    assert harness.byok.requests == []


async def test_breaker_opens_filters_the_route_then_recovers_through_one_probe(harness: Harness) -> None:
    harness.managed.script([Fault.status(503)] * 2)
    await harness.chat()  # attempt 1 retry, attempt 2 fallback: two failures open the breaker
    assert harness.records[-1][1][1]["breaker_after"] == "open"
    run = await harness.chat()
    assert run.route == "byok:byok"
    record = harness.records[-1][0]
    managed = next(c for c in record["candidates"] if c["route"] == "managed")
    assert managed["breaker"]["state"] == "open" and managed["filters"]["breaker"] != "pass"
    assert len(harness.managed.requests) == 2  # nothing was sent to the open route

    harness.now_ms += 10_000  # the cooldown passed: half open, one probe goes through
    run = await harness.chat()
    assert run.route == "managed:managed"
    probe = next(c for c in harness.records[-1][0]["candidates"] if c["route"] == "managed")
    assert probe["breaker"]["state"] == "half_open"
    assert harness.records[-1][1][-1]["breaker_after"] == "closed"


async def test_half_open_breaker_admits_one_probe_and_others_fall_back(harness: Harness) -> None:
    harness.managed.script([Fault.status(503)] * 2)
    await harness.chat()  # two failures open the managed route's breaker
    harness.now_ms += 10_000  # cooldown passed: half open
    harness.managed.script([Fault.hang(0.3)])  # the probe is slow (but within the route's timeout)
    probe = asyncio.create_task(harness.chat())
    while not harness.managed.requests[2:]:  # the probe has reached the provider
        await asyncio.sleep(0.01)
    other = await harness.chat()
    assert other.route == "byok:byok"  # the probe is out: the decision filtered the route
    managed = next(c for c in harness.records[-1][0]["candidates"] if c["route"] == "managed")
    assert managed["filters"]["breaker"] == "probe in flight"
    assert (await probe).route == "managed:managed"
    assert harness.records[-1][1][-1]["breaker_after"] == "closed"
    assert (await harness.chat()).route == "managed:managed"  # closed again: no probe limit


async def test_probe_taken_between_decision_and_send_falls_back(harness: Harness) -> None:
    harness.managed.script([Fault.status(503)] * 2)
    await harness.chat()
    harness.now_ms += 10_000
    scheduler = harness.dispatcher.scheduler
    decision = harness.dispatcher.decide(
        EngineCall.CHAT, dict(BODY), tenant="ten_a", salt="s" * 64, context=RouteContext()
    )
    assert decision.record.pick is not None and decision.record.pick.route == "managed"
    assert scheduler.admit(decision.record.pick, harness.now_ms)  # another request took the probe
    run = await harness.dispatcher.execute(
        decision, EngineCall.CHAT, dict(BODY), stream=False, tenant="ten_a", salt="s" * 64,
        context=RouteContext(),
    )  # fmt: skip
    assert run.route == "byok:byok"
    assert harness.last_attempts()[0] == ("managed", "skipped", "fallback")


async def test_a_send_of_state_content_is_recorded_before_each_provider_sees_it(harness: Harness) -> None:
    harness.managed.script([Fault.status(500), Fault.status(500)])  # managed fails; byok answers
    context = RouteContext(sources=("snp_a", "ses_b"))
    run = await harness.dispatcher.start(
        EngineCall.CHAT, dict(BODY), stream=False, tenant="ten_a", salt="s" * 64, context=context
    )
    assert run.route == "byok:byok"
    routes = [(sources, r.route, r.kind, r.retention_days) for sources, r, _ in harness.reached]
    assert routes == [
        (("snp_a", "ses_b"), "managed", "managed", 30),
        (("snp_a", "ses_b"), "managed", "managed", 30),  # each attempt is a send
        (("snp_a", "ses_b"), "byok", "byok", 30),
    ]
    assert [seen for _, _, seen in harness.reached] == [0, 1, 2]  # recorded before the provider saw it
    assert harness.reached[0][1].last_sent_at_s == harness.now_ms // 1000
    assert harness.sources[-1] == ("snp_a", "ses_b")

    harness.reached.clear()
    harness.engine.down = False
    harness.dispatcher.scheduler.breakers.clear()
    harness.refuse = "snp_a"  # purged meanwhile: nothing goes out
    before = len(harness.managed.requests) + len(harness.byok.requests)
    with pytest.raises(NotFoundError):
        await harness.dispatcher.start(
            EngineCall.CHAT, dict(BODY), stream=False, tenant="ten_a", salt="s" * 64, context=context
        )
    assert len(harness.managed.requests) + len(harness.byok.requests) == before


async def test_missing_keys_are_skipped_and_every_record_replays_equal(harness: Harness) -> None:
    harness.managed.script([Fault.status(500), Fault.status(500)])
    run = await harness.chat(tenant="ten_without_key")  # no BYOK key: the local engine
    assert run.route == "byoc:replica-0"
    assert ("byok", "skipped", "fallback") in harness.last_attempts()
    await harness.chat()
    assert len(harness.records) == 2
    for record, _ in harness.records:
        equal, _ = replay(record)
        assert equal


async def test_a_byoc_call_leaves_before_the_keys_the_decision_left_and_they_reach_residency(
    harness: Harness,
) -> None:
    scheduler = harness.dispatcher.scheduler
    block_size = scheduler.profile.engine.block_size
    num_blocks = scheduler.profile.engine.max_model_len // block_size - 2
    body = {
        "model": "tiny",
        "prompt": [10 + i % 5_000 for i in range(num_blocks * block_size)],
        "max_tokens": 4,
    }
    context = RouteContext(allowed_routes=frozenset({"local"}))
    computed_at_call: list[int] = []
    decisions = []
    for _ in range(2):
        decision = harness.dispatcher.decide(EngineCall.COMPLETION, dict(body), tenant="ten_a", salt="s" * 64,
                                             context=context)  # fmt: skip
        keys = decision.prefix_keys
        assert isinstance(keys, PromptKeys) and len(keys) == num_blocks
        harness.engine.on_call = lambda: computed_at_call.append(keys.computed)  # noqa: B023
        run = await harness.dispatcher.execute(decision, EngineCall.COMPLETION, dict(body), stream=False,
                                               tenant="ten_a", salt="s" * 64, context=context)  # fmt: skip
        assert run.route == "byoc:replica-0" and keys.computed == num_blocks
        decisions.append(decision.record)
    assert computed_at_call[0] < num_blocks  # the first call left with only the run the walk read
    first, second = (record.inputs.candidates[0].matched_prefix_blocks for record in decisions)
    assert first == 0 and second == num_blocks and scheduler.residency.num_blocks("r0") == num_blocks
    for record, _ in harness.records:
        assert replay(record)[0]


async def test_a_byoc_call_owes_its_uncached_prompt_to_the_replica_until_its_first_output(
    harness: Harness,
) -> None:
    scheduler = harness.dispatcher.scheduler
    block_size = scheduler.profile.engine.block_size
    context = RouteContext(allowed_routes=frozenset({"local"}))
    owed_at_call: list[dict[str, int]] = []
    harness.engine.on_call = lambda: owed_at_call.append(dict(scheduler.pending_prefill))
    first = [10 + i for i in range(4 * block_size)]
    for prompt in (first, first + [7] * (block_size + 5)):  # the next turn adds 1 block and 5 tokens
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 4}
        decision = harness.dispatcher.decide(EngineCall.COMPLETION, dict(body), tenant="ten_a", salt="s" * 64,
                                             context=context)  # fmt: skip
        await harness.dispatcher.execute(decision, EngineCall.COMPLETION, dict(body), stream=False,
                                         tenant="ten_a", salt="s" * 64, context=context)  # fmt: skip
        assert scheduler.pending_prefill == {}  # its output came: nothing owed
    assert owed_at_call == [{"r0": 4 * block_size}, {"r0": block_size + 5}]
    harness.engine.down = True
    body = {"model": "tiny", "prompt": [3] * 40}
    decision = harness.dispatcher.decide(EngineCall.COMPLETION, dict(body), tenant="ten_a", salt="s" * 64,
                                         context=context)  # fmt: skip
    with pytest.raises(ZumikError):
        await harness.dispatcher.execute(decision, EngineCall.COMPLETION, dict(body), stream=False,
                                         tenant="ten_a", salt="s" * 64, context=context)  # fmt: skip
    assert owed_at_call[-1] == {"r0": 40} and scheduler.pending_prefill == {}  # a failed call owes nothing


async def test_no_route_left_is_a_503_naming_the_decision(harness: Harness) -> None:
    harness.managed.stop()
    harness.byok.stop()
    harness.engine.down = True  # the local replica is gone too
    with pytest.raises(ZumikError) as info:
        await harness.chat(tenant="ten_a")
    assert info.value.status >= 500 and "/v2/decisions/dec_" in info.value.message


async def test_in_flight_counts_return_to_zero_for_whole_and_streamed_answers(harness: Harness) -> None:
    harness.managed.stop()
    harness.byok.stop()
    scheduler = harness.dispatcher.scheduler
    await harness.chat(tenant="ten_without_key")  # whole answer from the local replica
    assert scheduler.inflight.get("r0") == 0
    run = await harness.dispatcher.start(
        EngineCall.CHAT,
        dict(BODY),
        stream=True,
        tenant="ten_without_key",
        salt="s" * 64,
        context=RouteContext(),
    )
    assert scheduler.inflight.get("r0") == 1  # streaming: busy until the stream is read to its end
    _ = [event async for event in run.rest]
    assert scheduler.inflight.get("r0") == 0
