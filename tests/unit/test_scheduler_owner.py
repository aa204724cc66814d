"""One owner per profile (routing/owner.py): gateways decide locally and converge through it.

Invariants held here:
- what one gateway sent where, every other gateway routes by after one exchange (a shared
  prefix follows the replica that holds it, whichever gateway sent it first);
- breaker failures and retries count across gateways: failures split over two gateways open
  the breaker in both once the sum reaches the threshold;
- a gateway's own ops that the owner has not acknowledged yet survive a view taken before them;
  a report seen twice counts once;
- load (in-flight counts, the prefill owed to each replica) is the sum of the other gateways'
  absolute figures, and a silent gateway's load expires;
- a gateway behind the owner's bounded log gets the whole index, keeping its own unreported
  sends;
- an engine's KV events (stored, evicted, cleared) reach every gateway's belief;
- a decision made on a view replays byte for byte;
- a replica that leaves its group is forgotten;
- a prompt of token ids is keyed by the engine's block hashes, which its KV events name; the
  owner counts sends where the send-only belief differs from the engine's word;
- the links' background loop (an exchange per round while busy, a long-poll while idle) carries
  one gateway's sends to another; an idle gateway's first send ends its poll, and an idle
  gateway with nothing in flight sends no heartbeat;
- in the two-gateway simulation of the bench, an owner captures more than none.
"""

from __future__ import annotations

import asyncio
import contextlib
from decimal import Decimal
from typing import Any

import pytest

from profiles import load_builtin
from zumik_serve.routing.breaker import BreakerPolicy, BreakerStatus
from zumik_serve.routing.decision import NO_EVIDENCE, Pick
from zumik_serve.routing.owner import LOAD_TTL_MS, KvEvent, ProfileOwner, Report, View, exchange
from zumik_serve.routing.replay import replay
from zumik_serve.routing.scheduler import ProfileScheduler, SchedulingRequest, owner_for, prefix_keys

PROFILE = load_builtin("local-cpu-2x")
REPLICAS = {"local": ["r0", "r1", "r2"]}
SALT = "s" * 64


def make_gateway(name: str) -> ProfileScheduler:
    scheduler = ProfileScheduler(PROFILE, replicas=REPLICAS)
    scheduler.link(name)
    return scheduler


def make_request(text: str, digest: str = "d" * 32) -> SchedulingRequest:
    return SchedulingRequest(
        tenant="ten_a", cache_salt=SALT, prompt_text=text, expected_output_tokens=4, request_digest=digest,
        release_id=None, snapshot_id=None, allowed_routes=frozenset({"local"}), evidence=NO_EVIDENCE,
    )  # fmt: skip


def matched(scheduler: ProfileScheduler, text: str) -> dict[str, int]:
    inputs, _ = scheduler.inputs(make_request(text), now_ms=1_000, seed=1)
    return {c.replica or "": c.matched_prefix_blocks for c in inputs.candidates}


DOCUMENT = "the tools block and the system prompt of this agent, shared by every call. " * 40


def test_a_prefix_sent_by_one_gateway_routes_the_other_gateways_requests() -> None:
    owner = owner_for(PROFILE)
    a, b = make_gateway("gw-a"), make_gateway("gw-b")
    record, keys = a.decide("dec_1", make_request(DOCUMENT + "first"), now_ms=1_000, seed=3)
    assert record.pick is not None and record.pick.replica is not None
    a.sent(record.pick, keys)
    assert set(matched(b, DOCUMENT).values()) == {0}  # b knows nothing yet
    exchange(a, owner, 1_000)
    exchange(b, owner, 1_000)
    held = matched(b, DOCUMENT)
    assert held[record.pick.replica] > 0 and sum(held.values()) == held[record.pick.replica]
    again, _ = b.decide("dec_2", make_request(DOCUMENT + "second"), now_ms=1_001, seed=99)
    assert again.pick == record.pick  # b follows a's prefix
    ok, _ = replay(again.to_json())
    assert ok


def test_breaker_failures_from_two_gateways_add_up_to_the_threshold() -> None:
    owner = owner_for(PROFILE)
    a, b = make_gateway("gw-a"), make_gateway("gw-b")
    pick = Pick("managed", None)
    threshold = PROFILE.routing.breaker.failure_threshold
    for _ in range(threshold - 1):
        a.failed(pick, 1_000)
    b.failed(pick, 1_001)
    assert not a.breaker_open(pick, 1_002) and not b.breaker_open(pick, 1_002)  # each alone: below
    for gateway in (a, b, a):
        exchange(gateway, owner, 1_002)
    assert a.breaker_open(pick, 1_003) and b.breaker_open(pick, 1_003)
    assert owner.state.breakers["managed"].state is BreakerStatus.OPEN


def test_own_unacknowledged_ops_survive_an_older_view_and_a_report_counts_once() -> None:
    owner = owner_for(PROFILE)
    a = make_gateway("gw-a")
    pick = Pick("managed", None)
    exchange(a, owner, 0)
    stale = owner.view("gw-a", 0, 0)
    a.failed(pick, 10)
    a.failed(pick, 11)
    report = a.take_report()  # in flight to the owner, not applied yet
    a.apply_view(stale)
    assert a.breakers["managed"].consecutive_failures == 2  # replayed over the older view
    owner.report(report, 12)
    owner.report(report, 13)  # delivered twice (a retried call): counted once
    a.apply_view(owner.view("gw-a", a.version, 13))
    assert owner.state.breakers["managed"].consecutive_failures == 2
    assert a.breakers["managed"].consecutive_failures == 2


def test_retries_count_against_one_budget_across_gateways() -> None:
    owner = owner_for(PROFILE)
    a, b = make_gateway("gw-a"), make_gateway("gw-b")
    allowed = 0
    while a.allow_retry(1_000):  # no requests yet: only the budget's floor of retries
        allowed += 1
    exchange(a, owner, 1_000)
    exchange(b, owner, 1_000)
    assert allowed > 0 and not b.allow_retry(1_000)  # a spent the floor for both


def test_load_is_the_other_gateways_sum_and_expires_when_they_fall_silent() -> None:
    owner = owner_for(PROFILE)
    a, b = make_gateway("gw-a"), make_gateway("gw-b")
    for _ in range(3):
        a.sent(Pick("local", "r1"), [])
    exchange(a, owner, 1_000)
    exchange(b, owner, 1_000)
    inputs, _ = b.inputs(make_request("x"), now_ms=1_000, seed=1)
    running = {c.replica: c.running + c.queue_depth for c in inputs.candidates}
    assert running == {"r0": 0, "r1": 3, "r2": 0}
    assert b.route_inflight.get("local", 0) == 0 and b.remote_route_inflight == {"local": 3}
    exchange(b, owner, 1_000 + LOAD_TTL_MS + 1)  # a said nothing since
    inputs, _ = b.inputs(make_request("x"), now_ms=1_000, seed=1)
    assert all(c.running == 0 for c in inputs.candidates)


def test_the_prefill_owed_to_a_replica_is_summed_over_gateways_until_each_first_output() -> None:
    owner = owner_for(PROFILE)
    a, b = make_gateway("gw-a"), make_gateway("gw-b")
    a.started(Pick("local", "r1"), 700)
    a.started(Pick("local", "r1"), 300)
    b.started(Pick("local", "r1"), 50)
    b.started(Pick("local", "r2"), 20)
    for gateway in (a, b, a, b):
        exchange(gateway, owner, 1_000)

    def owed(scheduler: ProfileScheduler) -> dict[str | None, int | None]:
        inputs, _ = scheduler.inputs(make_request("x"), now_ms=1_000, seed=1)
        return {c.replica: c.pending_prefill_tokens for c in inputs.candidates}

    assert owed(a) == owed(b) == {"r0": 0, "r1": 1_050, "r2": 20}
    a.prefilled(Pick("local", "r1"), 700)  # its first output came
    b.prefilled(Pick("local", "r2"), 20)
    assert a.pending_prefill == {"r1": 300} and b.pending_prefill == {"r1": 50}
    for gateway in (a, b, a, b):
        exchange(gateway, owner, 1_000)
    assert owed(a) == owed(b) == {"r0": 0, "r1": 350, "r2": 0}
    exchange(b, owner, 1_000 + LOAD_TTL_MS + 1)  # a silent: what it owed is no one's now
    assert owed(b) == {"r0": 0, "r1": 50, "r2": 0}


def test_a_gateway_behind_the_log_gets_the_whole_index_and_keeps_its_own_sends() -> None:
    owner = ProfileOwner(PROFILE_POLICY, capacity_blocks=1_000, budget_ratio=Decimal("0.2"), log_entries=2)
    a, b = make_gateway("gw-a"), make_gateway("gw-b")
    texts = [f"{index} " * 200 for index in range(4)]
    for index, text in enumerate(texts):
        a.sent(Pick("local", f"r{index % 3}"), keys_of(text))
        exchange(a, owner, index)  # one version per report: the log keeps only the last two
    b.sent(Pick("local", "r2"), keys_of(DOCUMENT))  # b's own, not reported yet
    view = owner.view("gw-b", b.version, 10)
    assert view.residency_full is not None
    b.apply_view(view)
    assert matched(b, texts[0])["r0"] > 0 and matched(b, texts[3])["r0"] > 0
    assert matched(b, DOCUMENT)["r2"] > 0  # kept across the replacement


def test_engine_kv_events_reach_every_gateways_belief() -> None:
    owner = owner_for(PROFILE)
    a, b = make_gateway("gw-a"), make_gateway("gw-b")
    keys = keys_of(DOCUMENT)
    a.sent(Pick("local", "r0"), keys)
    exchange(a, owner, 0)
    exchange(b, owner, 0)
    assert matched(b, DOCUMENT)["r0"] == len(keys)
    owner.engine_events([KvEvent("r0", removed=(keys[3],)), KvEvent("r1", stored=tuple(keys[:2]))])
    exchange(a, owner, 1)
    exchange(b, owner, 1)
    for gateway in (a, b):
        assert matched(gateway, DOCUMENT) == {"r0": 3, "r1": 2, "r2": 0}
    owner.engine_events([KvEvent("r0", cleared=True)])
    exchange(b, owner, 2)
    assert matched(b, DOCUMENT)["r0"] == 0


def test_a_replica_that_leaves_is_forgotten_and_one_that_joins_is_chosen_from() -> None:
    a = make_gateway("gw-a")
    a.sent(Pick("local", "r0"), keys_of(DOCUMENT))
    a.set_replicas("local", ["r1", "r2", "r3"])
    assert matched(a, DOCUMENT) == {"r1": 0, "r2": 0, "r3": 0}
    assert a.residency.num_blocks("r0") == 0 and "r0" not in a.inflight


def test_take_report_needs_a_link() -> None:
    with pytest.raises(RuntimeError, match="link"):
        ProfileScheduler(PROFILE, replicas=REPLICAS).take_report()


PROFILE_POLICY = BreakerPolicy(failure_threshold=3, cooldown_ms=10_000)


def keys_of(text: str) -> list[str]:
    return prefix_keys(text, block_size=PROFILE.engine.block_size, salt=SALT, max_blocks=1_000)


def test_a_token_prompt_is_keyed_by_the_engines_block_hashes_that_its_events_name() -> None:
    from zumik_serve.routing.block_hashes import engine_block_keys

    owner = owner_for(PROFILE)
    a = make_gateway("gw-a")
    tokens = list(range(100, 100 + PROFILE.engine.block_size * 5 + 3))
    request = SchedulingRequest(
        tenant="ten_a", cache_salt=SALT, prompt_text="ignored for token prompts", expected_output_tokens=4,
        request_digest="d" * 32, release_id=None, snapshot_id=None, allowed_routes=frozenset({"local"}),
        evidence=NO_EVIDENCE, prompt_token_ids=tokens,
    )  # fmt: skip
    inputs, keys = a.inputs(request, now_ms=0, seed=1)
    engine_keys = engine_block_keys(
        tokens, block_size=PROFILE.engine.block_size, cache_salt=SALT, max_blocks=99
    )
    assert keys == engine_keys and inputs.prompt_num_tokens == len(tokens) and inputs.num_prompt_blocks == 5
    owner.engine_events([KvEvent("r1", stored=tuple(engine_keys[:4]))])  # r1's engine says so
    exchange(a, owner, 0)
    inputs, _ = a.inputs(request, now_ms=0, seed=1)
    assert {c.replica: c.matched_prefix_blocks for c in inputs.candidates} == {"r0": 0, "r1": 4, "r2": 0}


def test_the_owner_counts_sends_whose_send_only_belief_differs_from_the_engines_word() -> None:
    from zumik_serve.routing.block_hashes import engine_block_keys

    owner = owner_for(PROFILE)
    a = make_gateway("gw-a")
    text_keys = keys_of(DOCUMENT)
    keys = engine_block_keys(
        list(range(500, 900)), block_size=PROFILE.engine.block_size, cache_salt=SALT, max_blocks=99
    )
    owner.engine_events([KvEvent("r2", stored=tuple(keys))])
    a.sent(Pick("local", "r2"), text_keys)  # keyed by text: the engine never names these, not checked
    a.sent(Pick("local", "r0"), keys)  # r0 reports no events: not checked
    exchange(a, owner, 0)
    assert (owner.belief_checked, owner.belief_wrong) == (0, 0)
    owner.engine_events([KvEvent("r1", stored=tuple(keys))])  # r1 holds it by its engine's word
    a.sent(Pick("local", "r1"), keys)  # the sends alone said r1 holds nothing: wrong
    exchange(a, owner, 1)
    owner.engine_events([KvEvent("r1", stored=tuple(keys))])
    a.sent(Pick("local", "r1"), keys)  # both agree now
    exchange(a, owner, 2)
    assert (owner.belief_checked, owner.belief_wrong) == (2, 1)
    owner.engine_events([KvEvent("r1", removed=tuple(keys[2:]))])  # evicted: the sends never know
    a.sent(Pick("local", "r1"), keys)
    exchange(a, owner, 3)
    assert (owner.belief_checked, owner.belief_wrong) == (3, 2)


def test_the_cluster_figure_captures_more_with_an_owner_than_without() -> None:
    from zumik_serve.bench.routing_cluster import cluster_figures

    arms = {arm.arm: arm for arm in cluster_figures(PROFILE, seed=3, requests=120)}
    alone, owned = arms["two-no-owner"], arms["two-owner"]
    assert owned.ideal_blocks == alone.ideal_blocks > 0  # the same sequence
    assert owned.cached_blocks > alone.cached_blocks and owned.belief_wrong < alone.belief_wrong


class _Method:
    def __init__(self, function: Any) -> None:
        self._function = function

    async def remote(self, *args: Any) -> Any:
        await asyncio.sleep(0)  # a call returns on a later turn of the loop, as over a handle
        return await self._function(*args)


class _OwnerHandle:
    """The owner's Serve handle as OwnerLink calls it, over a ProfileOwner in this process:
    ``exchange`` and ``view`` as ``SchedulerOwner`` answers them (a view long-polls until the
    owner moves past the caller's version, or ``wait_s``), each call counted, and each view
    given up by its caller (cancelled) counted too."""

    def __init__(self, owner: ProfileOwner) -> None:
        self._owner = owner
        self._moved = asyncio.Event()
        self.calls = {"exchange": 0, "view": 0, "view_cancelled": 0}
        self.exchange = _Method(self._exchange)
        self.view = _Method(self._view)

    async def _exchange(self, report: Report, since: int) -> View:
        self.calls["exchange"] += 1
        before = self._owner.version
        self._owner.report(report, 0)
        if self._owner.version != before:
            moved, self._moved = self._moved, asyncio.Event()
            moved.set()
        return self._owner.view(report.gateway, since, 0)

    async def _view(self, gateway: str, since: int, wait_s: float) -> View:
        self.calls["view"] += 1
        try:
            if self._owner.version == since:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._moved.wait(), timeout=wait_s)
        except asyncio.CancelledError:
            self.calls["view_cancelled"] += 1
            raise
        return self._owner.view(gateway, since, 0)


def test_owner_links_carry_one_gateways_sends_to_the_other_off_the_request_path() -> None:
    from zumik_serve.app.scheduler_actor import OwnerLink

    owner = owner_for(PROFILE)
    a = ProfileScheduler(PROFILE, replicas=REPLICAS)
    b = ProfileScheduler(PROFILE, replicas=REPLICAS)

    async def run() -> dict[str, int]:
        handle = _OwnerHandle(owner)
        links = [OwnerLink(a, handle, "gw-a"), OwnerLink(b, handle, "gw-b")]
        for link in links:
            link.start()
        a.sent(Pick("local", "r2"), keys_of(DOCUMENT))
        for _ in range(500):  # until b's view holds it (each round is a few loop turns)
            if matched(b, DOCUMENT)["r2"]:
                break
            await asyncio.sleep(0.01)
        for link in links:
            await link.stop()
        return matched(b, DOCUMENT)

    assert asyncio.run(run())["r2"] == len(keys_of(DOCUMENT))


def test_an_idle_gateway_gives_up_its_long_poll_for_its_first_send_and_heartbeats_only_a_load(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Idle, a link long-polls and reports nothing (no heartbeat of an empty load); its first
    send ends the poll at once, not when the poll would (here: never), and reaches the other
    gateway; while a request is in flight its load is repeated every heartbeat."""
    from zumik_serve.app import scheduler_actor
    from zumik_serve.app.scheduler_actor import OwnerLink

    monkeypatch.setattr(scheduler_actor, "LINK_INTERVAL_S", 0.01)
    monkeypatch.setattr(scheduler_actor, "HEARTBEAT_S", 0.05)
    monkeypatch.setattr(scheduler_actor, "VIEW_WAIT_S", 3600.0)  # a poll never answers by itself
    owner = owner_for(PROFILE)
    a = ProfileScheduler(PROFILE, replicas=REPLICAS)
    b = ProfileScheduler(PROFILE, replicas=REPLICAS)

    async def rounds(count: int, done: Any = lambda: False) -> None:
        for _ in range(count):
            if done():
                return
            await asyncio.sleep(0.01)

    async def run() -> tuple[dict[str, int], dict[str, int], dict[str, int], dict[str, int]]:
        handle = _OwnerHandle(owner)
        links = [OwnerLink(a, handle, "gw-a"), OwnerLink(b, handle, "gw-b")]
        for link in links:
            link.start()
        await rounds(50)  # both idle: one hello each, then long-polls
        idle = dict(handle.calls)
        a.sent(Pick("local", "r2"), keys_of(DOCUMENT))
        await rounds(500, lambda: matched(b, DOCUMENT)["r2"] > 0)
        sent = dict(handle.calls)
        a.finished(Pick("local", "r2"))
        await rounds(30)  # its load back to none is reported once, then nothing
        settled = dict(handle.calls)
        a.started(Pick("local", "r1"))
        await rounds(500, lambda: handle.calls["exchange"] - settled["exchange"] >= 4)  # in flight:
        busy = dict(handle.calls)  # its load, then heartbeats of it
        for link in links:
            await link.stop()
        return idle, sent, settled, busy

    idle, sent, settled, busy = asyncio.run(run())
    assert idle["exchange"] == 2 and idle["view"] == 2 and idle["view_cancelled"] == 0, idle
    assert matched(b, DOCUMENT)["r2"] == len(keys_of(DOCUMENT))
    assert sent["view_cancelled"] >= 1, sent  # a's poll, given up for its send
    assert settled["exchange"] - sent["exchange"] <= 2, (sent, settled)  # none after the load's end
    assert busy["exchange"] - settled["exchange"] >= 4, (settled, busy)  # heartbeats of a load
