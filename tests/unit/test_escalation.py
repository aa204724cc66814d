"""Evidence-backed escalation, provider cache keys, per-tenant fault domains and the profile
header, on real parts (redis-server, the production HTTP app, loopback providers).

Invariants held here:
- the reuse ledger keeps a tenant's evidence per prefix family: each capture level apart, with
  the family's requests, prompt tokens and the age of its newest capture; another family or
  another tenant reads nothing of it;
- ``decide`` escalates from the managed default only past the evidence threshold AND when the
  priced comparison (cached-input prices at the family's reuse ratio) says the escalation is
  cheaper, and the record says why (both prices); the record replays equal;
- the provider's ``prompt_cache_key`` is the same for a tenant's prompts of one family whatever
  their suffix, differs between tenants for the same prompt, and a client's own key is kept but
  namespaced inside its tenant (never sent as is);
- a BYOK route's breaker and retry budget are the tenant's: one tenant's rejected key or
  spent retries leave another tenant's BYOK route as it was; a managed route's breaker does not
  open on one tenant's 4xx;
- ``x-zumik-profile`` outside the tenant's policy is a 403 permission_error, a profile this
  deployment does not serve a 404, the served one (or none) runs;
- ``zumik decision replay ID`` prints the replay and exits 0 when equal, 1 when the stored
  record was altered, 2 for an unknown id.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from profiles import load_builtin, parse_profile
from profiles.model import RouteKind
from tests.support.fault_server import Fault, FaultServer
from tests.support.inprocess import make_gateway
from zumik_serve.cli import main
from zumik_serve.engines.protocol import EngineCall
from zumik_serve.providers.hints import PromptCacheOptions, ProviderHints
from zumik_serve.qos.quota import RateSettlement
from zumik_serve.reuse.evidence import EvidenceLevel
from zumik_serve.reuse.figures import ReuseFigures
from zumik_serve.reuse.service import ReuseService
from zumik_serve.reuse.store import BUCKET_S, LedgerCounts, LedgerGroup, RedisReuseStore
from zumik_serve.routing.breaker import BreakerPolicy
from zumik_serve.routing.decision import (
    DecisionInputs,
    DecisionRecord,
    Escalation,
    Evidence,
    RouteCandidate,
    decide,
)
from zumik_serve.routing.dispatch import Dispatcher, RouteContext
from zumik_serve.routing.family import FAMILY_CHARS, prefix_family, provider_cache_key
from zumik_serve.routing.reach import ProviderReach
from zumik_serve.routing.replay import replay
from zumik_serve.routing.retry import ATTEMPTS, Attempt
from zumik_serve.routing.scheduler import ProfileScheduler
from zumik_serve.store.client import plain_client
from zumik_serve.tenancy.store import RedisTenantStore

# --- evidence from the ledger ------------------------------------------------------------------


def reported(prompt: int, cached: int) -> ReuseFigures:
    return ReuseFigures.of(
        prompt_tokens=prompt, opportunity_tokens=0, route_kind="managed", cached_tokens=cached, kv_report=None
    )


async def test_family_evidence_counts_levels_requests_and_age_per_tenant_and_family(
    module_redis_url: str,
) -> None:
    client = plain_client(module_redis_url)
    try:
        store = RedisReuseStore(client)
        service = ReuseService(store, load_builtin("local-cpu"), scope_digest="d" * 16)
        now = 1_800_000_000 // BUCKET_S * BUCKET_S
        group = service.profile.name
        for minute, (prompt, cached) in enumerate([(1000, 0), (1000, 600), (1000, 900)]):
            await store.record(
                "ten_ev_a", _group(group), _counts(reported(prompt, cached)), now_s=now - 600 + 60 * minute,
                family="fam_one",
            )  # fmt: skip
        await store.record(
            "ten_ev_a", _group(group), _counts(reported(500, 500)), now_s=now, family="fam_two"
        )
        await store.record(
            "ten_ev_b", _group(group), _counts(reported(500, 500)), now_s=now, family="fam_one"
        )

        evidence = await service.family_evidence("ten_ev_a", "fam_one", window_s=3600, now_s=now + 5)
        assert evidence == Evidence(EvidenceLevel.REPORTED, 1500, "fam_one", 3, 3000, 600 - 120 + 5)
        assert evidence.reused_part(2000) == 1000  # its reuse ratio: 1500 of 3000 prompt tokens
        short = await service.family_evidence("ten_ev_a", "fam_one", window_s=300, now_s=now + 5)
        assert (short.requests_in_window, short.reused_tokens_in_window) == (0, 0)  # older than 5 min
        other = await service.family_evidence("ten_ev_b", "fam_two", window_s=3600, now_s=now)
        assert (other.level, other.requests_in_window, other.age_s) == (EvidenceLevel.UNKNOWN, 0, None)
    finally:
        await client.aclose()


def _group(profile: str) -> LedgerGroup:
    return LedgerGroup(profile=profile, snapshot=None, route="managed")


def _counts(figures: ReuseFigures) -> LedgerCounts:
    return LedgerCounts.of(figures)


# --- the priced escalation decision ------------------------------------------------------------

# Managed: 1.00 input, 0.50 cached input per Mtok; byoc: 1.50 per Mtok, cached input free. At a
# reuse ratio r, managed costs 1 - r/2 and byoc 1.5 (1 - r) per prompt token: byoc is cheaper
# past r = 1/2.
MANAGED = RouteCandidate("managed", RouteKind.MANAGED, 1_000_000, 500_000, 2_000_000)
BYOC = RouteCandidate("local", RouteKind.BYOC, 1_500_000, 0, 1_500_000, replica="r0", max_num_seqs=8)


def inputs_with(evidence: Evidence) -> DecisionInputs:
    return DecisionInputs(
        request_digest="ab" * 16, tenant="ten_a", prompt_num_tokens=4000, num_prompt_blocks=125,
        block_size=32, profile_name="p", profile_fingerprint="f" * 64, release_id=None,
        snapshot_id=None, policy_version="v1", now_ms=1_000, seed=3, candidates=(MANAGED, BYOC),
        evidence=evidence, escalation=Escalation("byoc", EvidenceLevel.REPORTED, 10_000, 3600),
        fallback_order=("managed", "local"), default_route="managed",
        breaker_policy=BreakerPolicy(3, 10_000), expected_output_tokens=0,
    )  # fmt: skip


def family(reused: int, prompt: int) -> Evidence:
    return Evidence(EvidenceLevel.REPORTED, reused, "fam_x", 20, prompt, 40)


def test_decide_escalates_only_past_the_threshold_and_only_when_cheaper() -> None:
    below = decide("dec_1", inputs_with(family(9_000, 10_000)))  # reuse 0.9, but under 10k tokens
    assert below.pick is not None and below.pick.route == "managed" and not below.escalation.met
    assert below.escalation.default_cost_pusd is None  # not priced: the evidence fell short

    dear = decide("dec_2", inputs_with(family(12_000, 40_000)))  # past the threshold, reuse 0.3
    assert dear.pick is not None and dear.pick.route == "managed" and dear.pick_reason == "default"
    assert not dear.escalation.met and dear.escalation.reason.endswith("(not cheaper)")
    # 4000 tokens, 1200 reused: managed 2800 * 1.0 + 1200 * 0.5; byoc 2800 * 1.5 (in pUSD / 1e6)
    assert dear.escalation.default_cost_pusd == 2800 * 1_000_000 + 1200 * 500_000
    assert dear.escalation.escalated_cost_pusd == 2800 * 1_500_000

    cheap = decide("dec_3", inputs_with(family(36_000, 40_000)))  # reuse 0.9
    assert cheap.pick is not None and cheap.pick.route == "local" and cheap.pick_reason == "escalated"
    assert cheap.escalation.met
    assert cheap.escalation.escalated_cost_pusd == 400 * 1_500_000
    assert cheap.escalation.default_cost_pusd == 400 * 1_000_000 + 3600 * 500_000
    assert "over 20 requests, newest 40s ago" in cheap.escalation.reason
    assert "byoc 600000000 < managed 2200000000 pUSD" in cheap.escalation.reason

    for record in (below, dear, cheap):
        stored = json.loads(json.dumps(record.to_json()))
        assert DecisionRecord.from_json(stored) == record
        assert replay(stored)[0]


def test_a_record_without_family_fields_renders_without_them() -> None:
    record = decide("dec_4", inputs_with(Evidence(EvidenceLevel.REPORTED, 20_000)))
    data = record.to_json()
    assert data["inputs"]["evidence"] == {"level": "reported", "reused_tokens_in_window": 20000}
    assert not record.escalation.met  # no reuse ratio recorded: priced as all uncached, byoc dearer
    assert set(data["escalation"]) == {"met", "reason", "default_cost_pusd", "escalated_cost_pusd"}


# --- prompt_cache_key --------------------------------------------------------------------------

AGENT_HEAD = "You are a careful agent. Tools: search, read, write. " * 40  # > FAMILY_CHARS


def test_cache_keys_are_per_tenant_and_family_and_namespace_the_clients_key() -> None:
    assert len(AGENT_HEAD) > FAMILY_CHARS
    salt_a, salt_b = "a" * 64, "b" * 64
    first = prefix_family(salt_a, AGENT_HEAD + "turn 1")
    assert prefix_family(salt_a, AGENT_HEAD + "a different, longer turn 2") == first
    assert prefix_family(salt_b, AGENT_HEAD + "turn 1") != first
    key_a = provider_cache_key(salt_a, family=first)
    assert key_a == provider_cache_key(salt_a, family=prefix_family(salt_a, AGENT_HEAD + "turn 9"))
    assert key_a != provider_cache_key(salt_b, family=prefix_family(salt_b, AGENT_HEAD + "turn 1"))
    client_a = provider_cache_key(salt_a, family=first, client_key="agent-7")
    assert client_a != key_a and "agent-7" not in client_a
    assert client_a == provider_cache_key(salt_a, family="fam_other", client_key="agent-7")
    assert client_a != provider_cache_key(salt_b, family=first, client_key="agent-7")


PROFILE = """
name: escalation-test
model: {{source: "builtin:tiny", served_name: tiny}}
engine: {{device: cpu, kv_cache_memory_bytes: 1048576}}
routes:
  - {{name: managed, kind: managed, base_url: "{managed}", model: gpt-test, api_key_env: TEST_MANAGED_KEY,
     prices: {{input: "1.00", cached_input: "0.50", output: "2.00"}}, timeout_s: 1, max_retries: 1}}
  - {{name: byok, kind: byok, base_url: "{byok}", model: gpt-byok,
     prices: {{input: "1.00", cached_input: "0.50", output: "2.00"}}, timeout_s: 1, max_retries: 1}}
routing:
  default_route: {default}
  fallback_order: [{default}, {other}]
  breaker: {{failure_threshold: {threshold}, cooldown_s: 60}}
"""


class Harness:
    """A dispatcher over two loopback providers; every tenant has a BYOK key."""

    def __init__(self, managed: FaultServer, byok: FaultServer, default: str, threshold: int = 2) -> None:
        self.managed, self.byok = managed, byok
        other = "byok" if default == "managed" else "managed"
        text = PROFILE.format(
            managed=managed.base_url, byok=byok.base_url, default=default, other=other, threshold=threshold
        )
        self.records: list[tuple[DecisionRecord, list[dict[str, Any]]]] = []
        self.dispatcher = Dispatcher(
            ProfileScheduler(parse_profile(text, source="test"), replicas={}),
            engines={}, decisions=self, byok_key=self._byok_key, reach=self,
            environ={"TEST_MANAGED_KEY": "sk-managed"}, clock_ms=lambda: 5_000_000, sleep=self._sleep,
        )  # fmt: skip

    async def save(
        self, tenant: str, record: DecisionRecord, attempts: Sequence[Attempt], sources: Sequence[str] = (),
        settlement: RateSettlement | None = None,
    ) -> None:  # fmt: skip
        self.records.append((record, list(ATTEMPTS.dump_python(tuple(attempts), mode="json"))))

    async def sent(self, tenant: str, sources: tuple[str, ...], reach: ProviderReach) -> None:
        return None

    async def _byok_key(self, tenant: str, route: str) -> str | None:
        return f"sk-{tenant}"

    async def _sleep(self, seconds: float) -> None:
        return None

    async def chat(self, tenant: str, content: str = "hello", client_key: str | None = None) -> Any:
        body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "cache_salt": "s" * 64}
        salt = tenant * (64 // len(tenant) + 1)
        return await self.dispatcher.start(
            EngineCall.CHAT, body, stream=False, tenant=tenant, salt=salt[:64],
            context=RouteContext(hints=ProviderHints(prompt_cache_key=client_key)),
        )  # fmt: skip

    def attempts(self) -> list[tuple[str, str, str]]:
        return [(a["route"], a["outcome"], a["action"]) for a in self.records[-1][1]]

    def breaker_seen(self, route: str) -> str:
        verdict = next(v for v in self.records[-1][0].candidates if v.route == route)
        return verdict.breaker.state.value


@pytest.fixture
def managed_first() -> Iterator[Harness]:
    with FaultServer() as managed, FaultServer() as byok:
        yield Harness(managed, byok, "managed")


@pytest.fixture
def byok_first() -> Iterator[Harness]:
    with FaultServer() as managed, FaultServer() as byok:
        yield Harness(managed, byok, "byok")


@pytest.fixture
def byok_first_patient() -> Iterator[Harness]:
    """BYOK first, with a breaker that stays closed through the test's failures."""
    with FaultServer() as managed, FaultServer() as byok:
        yield Harness(managed, byok, "byok", threshold=100)


async def test_the_provider_gets_one_key_per_tenant_and_family_and_the_clients_key_namespaced(
    managed_first: Harness,
) -> None:
    h = managed_first
    await h.chat("ten_a", AGENT_HEAD + "first turn")
    await h.chat("ten_a", AGENT_HEAD + "second, different turn")
    await h.chat("ten_b", AGENT_HEAD + "first turn")
    await h.chat("ten_a", AGENT_HEAD + "first turn", client_key="agent-7")
    await h.chat("ten_b", AGENT_HEAD + "first turn", client_key="agent-7")
    keys = [request.body["prompt_cache_key"] for request in h.managed.requests]
    assert keys[0] == keys[1]  # one tenant, one family, another suffix
    assert keys[2] != keys[0]  # another tenant, the same prompt
    assert keys[3] not in (keys[0], "agent-7") and keys[4] not in (keys[3], keys[2], "agent-7")
    assert all("cache_salt" not in request.body for request in h.managed.requests)


async def test_a_managed_provider_sees_each_tenants_users_as_pseudonyms_and_byok_as_sent(
    managed_first: Harness, byok_first: Harness
) -> None:
    """Every tenant's requests reach a managed provider under Zumik's one account: a client's
    ``user`` goes there as a keyed hash of the tenant's (stable for the tenant and user, another
    for another tenant's equal id, never the id). A BYOK route is the tenant's own account: as sent."""

    async def chat(h: Harness, tenant: str, user: str) -> None:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "user": user}
        salt = (tenant * 64)[:64]
        await h.dispatcher.start(
            EngineCall.CHAT, body, stream=False, tenant=tenant, salt=salt, context=RouteContext()
        )

    for tenant, user in (("ten_a", "alice"), ("ten_a", "alice"), ("ten_b", "alice"), ("ten_a", "bob")):
        await chat(managed_first, tenant, user)
    sent = [request.body["user"] for request in managed_first.managed.requests]
    assert sent[0] == sent[1] and len({sent[0], sent[2], sent[3]}) == 3
    assert all(user.startswith("zu-") and "alice" not in user and "bob" not in user for user in sent)
    await chat(byok_first, "ten_a", "alice")
    assert [request.body["user"] for request in byok_first.byok.requests] == ["alice"]


async def test_each_route_kind_gets_the_provider_hints_its_rules_allow(
    managed_first: Harness, byok_first: Harness
) -> None:
    """A managed route (the operator's account) gets the hints that shape the answer and its
    caching, ``safety_identifier`` as a pseudonym like ``user``, never the service tier (billed to
    the operator at the profile's prices) or the tenant's metadata; a BYOK route (the tenant's own
    account) gets those too, as sent. Neither ever gets ``store``: a stored completion would outlive
    the route's retention, which receipts state. ``reasoning_effort`` is an engine field: both get it."""
    hints = ProviderHints(
        verbosity="low", prompt_cache_retention="24h", safety_identifier="alice", service_tier="flex",
        metadata={"ticket": "T-1"}, store=True, prompt_cache_options=PromptCacheOptions(ttl="30m"),
    )  # fmt: skip
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "reasoning_effort": "low"}
    for h in (managed_first, byok_first):
        await h.dispatcher.start(
            EngineCall.CHAT, dict(body), stream=False, tenant="ten_a", salt="s" * 64,
            context=RouteContext(hints=hints),
        )  # fmt: skip
    managed = managed_first.managed.requests[-1].body
    byok = byok_first.byok.requests[-1].body
    for sent in (managed, byok):
        assert (sent["verbosity"], sent["prompt_cache_retention"], sent["reasoning_effort"]) == (
            "low",
            "24h",
            "low",
        )
        assert "store" not in sent and sent["prompt_cache_key"].startswith("zk-")
        assert sent["prompt_cache_options"] == {"ttl": "30m"}
    assert managed["safety_identifier"].startswith("zu-") and "alice" not in managed["safety_identifier"]
    assert "service_tier" not in managed and "metadata" not in managed
    assert (byok["safety_identifier"], byok["service_tier"], byok["metadata"]) == (
        "alice",
        "flex",
        {"ticket": "T-1"},
    )


def test_a_zero_retention_route_never_gets_a_day_of_prompt_cache() -> None:
    """``prompt_cache_retention: 24h`` keeps a prompt's cache at the provider for up to a day; a
    route whose retention_days is 0 (a zero-data-retention agreement, as its receipts say) is not
    sent it, so the account's default applies (with zero data retention, ``in_memory`` on the
    models that offer both)."""
    hints = ProviderHints(prompt_cache_retention="24h", verbosity="high")
    assert hints.for_route(managed=True, retention_days=0) == {"verbosity": "high"}
    assert hints.for_route(managed=False, retention_days=0) == {"verbosity": "high"}
    assert hints.for_route(managed=True, retention_days=30)["prompt_cache_retention"] == "24h"
    in_memory = ProviderHints(prompt_cache_retention="in_memory")
    assert in_memory.for_route(managed=True, retention_days=0) == {"prompt_cache_retention": "in_memory"}


# --- per-tenant fault domains ------------------------------------------------------------------


async def test_one_tenants_rejected_byok_key_opens_the_byok_route_for_that_tenant_only(
    byok_first: Harness,
) -> None:
    h = byok_first
    h.byok.script([Fault.status(401), Fault.status(401)])
    for _ in range(2):
        run = await h.chat("ten_a")
        assert run.route == "managed:managed"  # a refused key falls back
    run = await h.chat("ten_a")
    assert run.route == "managed:managed" and h.breaker_seen("byok") == "open"
    run = await h.chat("ten_b")
    assert run.route == "byok:byok" and h.breaker_seen("byok") == "closed"


async def test_a_managed_4xx_of_one_tenant_leaves_the_managed_breaker_closed(managed_first: Harness) -> None:
    h = managed_first
    h.managed.script([Fault.status(400), Fault.status(404), Fault.status(422)])
    for _ in range(3):
        with pytest.raises(Exception, match="HTTP 4"):
            await h.chat("ten_a")
    run = await h.chat("ten_b")
    assert run.route == "managed:managed" and h.breaker_seen("managed") == "closed"
    h.managed.script([Fault.status(500), Fault.status(500), Fault.status(500), Fault.status(500)])
    await h.chat("ten_b")
    await h.chat("ten_b")  # a provider's 5xx is every tenant's: the shared breaker opens
    await h.chat("ten_a")
    assert h.breaker_seen("managed") == "open"


async def test_a_body_json_cannot_carry_is_a_client_error_that_leaves_the_managed_breaker_closed(
    managed_first: Harness,
) -> None:
    """A NaN that got past the body's parser (the parser refuses them: test_pipeline) is the
    request's own fault at the provider client, not the route's: before, httpx's encoding error
    was recorded as a connect error and three of them opened the managed route for every tenant."""
    h = managed_first
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": float("nan")}
    for _ in range(3):
        with pytest.raises(Exception, match="cannot be sent as JSON"):
            await h.dispatcher.start(EngineCall.CHAT, body, stream=False, tenant="ten_a", salt="a" * 64,
                                     context=RouteContext())  # fmt: skip
        assert h.attempts() == [("managed", "client_error", "fail")]
    assert h.managed.requests == []  # nothing was sent
    run = await h.chat("ten_b")
    assert run.route == "managed:managed" and h.breaker_seen("managed") == "closed"


async def test_one_tenants_timeouts_open_the_managed_route_for_that_tenant_only(
    managed_first: Harness,
) -> None:
    """A timeout may be the request's own doing (a big non-streamed answer past the route's
    timeout_s): it counts on the tenant's own breaker of the shared route, never on the one
    every tenant passes (a provider's 5xx does: the test above)."""
    h = managed_first
    h.managed.script([Fault.hang(3), Fault.hang(3)])
    for _ in range(2):
        run = await h.chat("ten_a")
        assert run.route == "byok:byok" and h.attempts()[0] == ("managed", "timeout", "fallback")
    run = await h.chat("ten_a")
    assert run.route == "byok:byok" and h.breaker_seen("managed") == "open"
    assert h.attempts() == [("byok", "ok", "done")]  # the decision left the open route out
    run = await h.chat("ten_b")
    assert run.route == "managed:managed" and h.breaker_seen("managed") == "closed"
    assert h.dispatcher.scheduler.breakers.keys() == {"ten_a|managed"}  # a closed breaker is no entry


async def test_a_byok_retry_budget_spent_by_one_tenant_is_not_another_tenants(
    byok_first_patient: Harness,
) -> None:
    h = byok_first_patient
    for _ in range(3):  # each spends one retry of ten_a's budget (3 + 0.2 per request)
        h.byok.script([Fault.status(500), Fault.status(500)])
        await h.chat("ten_a")
        assert h.attempts()[:2] == [("byok", "server_error", "retry"), ("byok", "server_error", "fallback")]
    budget = h.dispatcher.tenant_budget("ten_a", "byok")
    assert budget is not None and not budget.allow(5_000_000)
    h.byok.script([Fault.status(500)])
    run = await h.chat("ten_b")  # a budget shared by tenants would refuse this retry
    assert h.attempts() == [("byok", "server_error", "retry"), ("byok", "ok", "done")]
    assert run.route == "byok:byok"


# --- x-zumik-profile ---------------------------------------------------------------------------

CHAT = {"model": "zumik-tiny", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4}


async def test_profile_header_is_checked_against_the_tenants_policy(
    module_redis_url: str, tiny_model_dir: Path
) -> None:
    gateway = make_gateway(module_redis_url, tiny_model_dir)
    served = gateway.context.profile.name
    limited = await gateway.create_tenant("profile-limited", profiles=frozenset({"qwen-small-gpu"}))
    allowed = await gateway.create_tenant("profile-allowed", profiles=frozenset({served, "other-profile"}))
    async with gateway.client(limited) as http:
        refused = await http.post("/v1/chat/completions", json=CHAT)
        named = await http.post("/v1/chat/completions", json=CHAT, headers={"x-zumik-profile": served})
    async with gateway.client(allowed) as http:
        ok = await http.post("/v1/chat/completions", json=CHAT, headers={"x-zumik-profile": served})
        plain = await http.post("/v1/chat/completions", json=CHAT)
        elsewhere = await http.post(
            "/v1/chat/completions", json=CHAT, headers={"x-zumik-profile": "other-profile"}
        )
    for response in (refused, named):
        assert response.status_code == 403
        error = response.json()["error"]
        assert error["type"] == "permission_error" and error["param"] == "x-zumik-profile"
        assert "qwen-small-gpu" in error["message"] and served in error["message"]
    assert ok.status_code == 200 and plain.status_code == 200
    assert "zumik" not in json.dumps(ok.json()["choices"])  # nothing of Zumik's in the /v1 body
    assert elsewhere.status_code == 404 and elsewhere.json()["error"]["code"] == "profile_not_found"


# --- zumik decision replay ---------------------------------------------------------------------


async def test_decision_replay_cli_exits_0_when_equal_1_when_altered_2_when_unknown(
    module_redis_url: str, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    gateway = make_gateway(module_redis_url, tiny_model_dir)
    key = await gateway.create_tenant("replayer")
    async with gateway.client(key) as http:
        response = await http.post("/v1/chat/completions", json=CHAT)
    decision_id = response.headers["x-zumik-decision-id"]
    monkeypatch.setenv("ZUMIK_REDIS_URL", module_redis_url)
    monkeypatch.setenv("ZUMIK_HOME", str(tmp_path / "home"))

    assert await asyncio.to_thread(main, ["decision", "replay", decision_id, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["equal"] is True and shown["record"]["decision_id"] == decision_id
    assert await asyncio.to_thread(main, ["decision", "replay", decision_id, "--tenant", "replayer"]) == 0

    client = plain_client(module_redis_url)
    try:  # the stored record altered behind Zumik's back
        tenant = await RedisTenantStore(client).require("replayer")
        stored_key = f"z:{{{tenant.id}}}:dec:{decision_id}"
        raw = await client.get(stored_key)
        assert raw is not None
        stored = json.loads(raw)
        stored["record"]["pick_reason"] = "altered"
        await client.set(stored_key, json.dumps(stored))
    finally:
        await client.aclose()
    capsys.readouterr()
    assert await asyncio.to_thread(main, ["decision", "replay", decision_id, "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["differing_fields"] == ["pick_reason"]
    assert await asyncio.to_thread(main, ["decision", "replay", "dec_" + "z" * 26]) == 2
    assert (
        await asyncio.to_thread(main, ["decision", "replay", decision_id, "--tenant", "no-such-tenant"]) == 2
    )
    assert await asyncio.to_thread(main, ["decision", "replay", "not-a-decision"]) == 2


async def test_tenant_create_stores_the_profiles_it_may_use(
    module_redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ZUMIK_REDIS_URL", module_redis_url)
    monkeypatch.setenv("ZUMIK_HOME", str(tmp_path / "home"))
    argv = ["tenant", "create", "cli-profiles", "--profiles", "local-cpu, qwen-small-gpu", "--json"]
    assert await asyncio.to_thread(main, argv) == 0
    client = plain_client(module_redis_url)
    try:
        tenant = await RedisTenantStore(client).require("cli-profiles")
    finally:
        await client.aclose()
    assert tenant.profiles == frozenset({"local-cpu", "qwen-small-gpu"})
