"""Reuse accounting on a real redis-server.

- Evidence levels are ordered unknown < estimated < reported < observed; combining reports the
  weakest; a provider that leaves ``cached_tokens`` out gives capture ``unknown``, never zero.
- The opportunity index counts the leading blocks a scope has seen, stops at the first gap,
  keeps scopes apart, and stays within its entry bound.
- The report keeps opportunity and each capture level apart (unknown counted in requests, with
  no tokens), sums over the window, groups by route or snapshot, prices savings per route, and
  shows a tenant only its own figures.
- A ledger group reads back whole whatever its names hold (a ``|`` included), and fields written
  in the format before (``profile|snapshot|route|figure``) still count, summed with new ones.
- Escalation evidence is the strongest capture level with tokens in the window (observed >
  reported > estimated; none: unknown) with the tokens at that level or stronger, for the
  tenant's whole traffic or one snapshot, and never another tenant's or an older window's.
- The scripts are registered once per store and survive a ``SCRIPT FLUSH`` (reloaded).
- One request's figures write exactly the group's, its prefix family's and (when it captured
  any) the capture roll-up hashes of its minute, each with the ledger's TTL.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from profiles import load_builtin
from zumik_serve.api.headers import reuse_headers
from zumik_serve.errors import InvalidRequestError
from zumik_serve.reuse.evidence import EvidenceLevel, weakest
from zumik_serve.reuse.figures import ReuseFigures
from zumik_serve.reuse.service import ReuseService
from zumik_serve.reuse.store import BUCKET_S, LedgerCounts, LedgerGroup, RedisReuseStore
from zumik_serve.routing.decision import NO_EVIDENCE, Evidence
from zumik_serve.store.local_redis import LocalRedis

pytestmark = pytest.mark.redis


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    server = LocalRedis(data_dir=tmp_path / "redis").start()
    yield server.url
    server.stop()


def test_levels_are_ordered_and_combine_to_the_weakest() -> None:
    assert EvidenceLevel.UNKNOWN < EvidenceLevel.ESTIMATED < EvidenceLevel.REPORTED < EvidenceLevel.OBSERVED
    assert [level.value for level in EvidenceLevel] == [0, 1, 2, 3]
    assert weakest([EvidenceLevel.OBSERVED, EvidenceLevel.REPORTED]) is EvidenceLevel.REPORTED
    assert weakest([]) is EvidenceLevel.UNKNOWN
    assert EvidenceLevel.parse("observed") is EvidenceLevel.OBSERVED


def test_missing_provider_field_is_unknown_not_zero() -> None:
    missing = ReuseFigures.of(
        prompt_tokens=100, opportunity_tokens=64, route_kind="managed", cached_tokens=None
    )
    assert missing.captured_tokens is None and missing.captured_level is EvidenceLevel.UNKNOWN
    headers = reuse_headers(missing)
    assert "x-zumik-reuse-captured-tokens" not in headers
    assert headers["x-zumik-reuse-evidence"] == "opportunity=estimated; captured=unknown"
    zero = ReuseFigures.of(prompt_tokens=100, opportunity_tokens=0, route_kind="managed", cached_tokens=0)
    assert (
        reuse_headers(zero)["x-zumik-reuse-captured-tokens"] == "0"
        and zero.captured_level is EvidenceLevel.REPORTED
    )
    engine = ReuseFigures.of(prompt_tokens=100, opportunity_tokens=0, route_kind="byoc", cached_tokens=32)
    assert engine.captured_level is EvidenceLevel.OBSERVED


async def test_opportunity_walk_stops_at_the_first_gap_and_keeps_scopes_apart(redis_url: str) -> None:
    store = RedisReuseStore(aioredis.from_url(redis_url), max_entries=5)
    assert await store.seen_prefix_blocks("scope-a", "c" * 64, ["k1", "k2", "k3"]) == 0
    assert await store.seen_prefix_blocks("scope-a", "c" * 64, ["k1", "k2", "k3", "k4"]) == 3
    assert await store.seen_prefix_blocks("scope-a", "c" * 64, ["k1", "x", "k3"]) == 1  # a gap ends it
    assert await store.seen_prefix_blocks("scope-b", "c" * 64, ["k1", "k2"]) == 0  # another scope
    client = aioredis.from_url(redis_url)
    assert await client.zcard("zumik:seen:scope-a:" + "c" * 16) <= 5  # the memory bound
    assert await store.seen_prefix_blocks("scope-c", "c" * 64, ["k1", "k2"]) == 0  # now seen in c too
    assert await store.forget_scopes(["scope-b", "scope-c", "scope-z"]) == 2  # several in one pass
    assert await store.forget_scopes(["scope-a"]) == 1
    assert await store.seen_prefix_blocks("scope-a", "c" * 64, ["k1"]) == 0
    await client.script_flush()  # a restarted Redis forgets scripts: the store loads it again
    assert await store.seen_prefix_blocks("scope-a", "c" * 64, ["k1"]) == 1


async def test_report_keeps_levels_apart_and_tenants_apart(redis_url: str) -> None:
    service = ReuseService(
        RedisReuseStore(aioredis.from_url(redis_url)), load_builtin("local-cpu-2x"), scope_digest="d"
    )
    figures = [
        (
            "local",
            ReuseFigures.of(prompt_tokens=100, opportunity_tokens=64, route_kind="byoc", cached_tokens=64),
        ),
        (
            "managed",
            ReuseFigures.of(prompt_tokens=100, opportunity_tokens=64, route_kind="managed", cached_tokens=32),
        ),
        (
            "managed",
            ReuseFigures.of(
                prompt_tokens=100, opportunity_tokens=0, route_kind="managed", cached_tokens=None
            ),
        ),
    ]
    for route, item in figures:
        await service.record("ten_a", item, snapshot="snp_x" if route == "local" else None, route=route)
    by_route = {
        g["route"]: g for g in (await service.report("ten_a", group_by="route", window_s=600))["groups"]
    }
    managed = by_route["managed"]
    assert managed["requests"] == 2 and managed["opportunity"] == {"tokens": 64, "evidence": "estimated"}
    captured = {c["evidence"]: c for c in managed["captured"]}
    assert captured["reported"]["tokens"] == 32 and captured["observed"]["tokens"] == 0
    assert captured["unknown"] == {"requests": 1, "tokens": None, "evidence": "unknown"}
    savings = {s["evidence"]: s["usd"] for s in managed["savings_usd"]}
    assert Decimal(savings["reported"]) == Decimal("0.0000024")  # 32 tokens x (0.15 - 0.075) USD/M
    assert {c["evidence"]: c["tokens"] for c in by_route["local"]["captured"]}["observed"] == 64
    tenant = (await service.report("ten_a", group_by="tenant", window_s=600))["groups"]
    assert len(tenant) == 1 and tenant[0]["requests"] == 3 and tenant[0]["opportunity"]["tokens"] == 128
    snapshots = {
        g["snapshot"] for g in (await service.report("ten_a", group_by="snapshot", window_s=600))["groups"]
    }
    assert snapshots == {"snp_x", "-"}
    assert (await service.report("ten_b", group_by="tenant", window_s=600))["groups"] == []
    with pytest.raises(InvalidRequestError):
        await service.report("ten_a", group_by="color", window_s=600)
    with pytest.raises(InvalidRequestError):
        await service.report("ten_a", group_by="route", window_s=0)
    week = (await service.report("ten_a", group_by="tenant", window_s=7 * 24 * 3600))["groups"]
    assert week[0]["requests"] == 3  # a week back, within what the ledger keeps (8 days)
    with pytest.raises(InvalidRequestError, match="1 to 604800 seconds"):
        await service.report("ten_a", group_by="tenant", window_s=7 * 24 * 3600 + 1)


PROFILE = load_builtin("local-cpu-2x")


def make_service(redis_url: str) -> ReuseService:
    return ReuseService(RedisReuseStore(aioredis.from_url(redis_url)), PROFILE, scope_digest="d")


def figures_of(route_kind: str, cached_tokens: int | None) -> ReuseFigures:
    return ReuseFigures.of(
        prompt_tokens=100, opportunity_tokens=64, route_kind=route_kind, cached_tokens=cached_tokens
    )


async def test_ledger_group_with_a_pipe_in_its_names_reads_back_whole(redis_url: str) -> None:
    store = RedisReuseStore(aioredis.from_url(redis_url))
    tricky = LedgerGroup(profile="p|1", snapshot="snp|x|y", route="r|2")
    plain = LedgerGroup(profile="p", snapshot=None, route="r")
    counts = LedgerCounts.of(figures_of("byoc", 32))
    await store.record("ten_a", tricky, counts)
    await store.record("ten_a", plain, counts)
    await store.record("ten_a", plain, counts)
    assert await store.window("ten_a", 600) == {tricky: counts, plain: counts.plus(counts)}
    service = make_service(redis_url)
    await service.record("ten_b", figures_of("managed", 16), snapshot="a|b", route="x|y")
    (group,) = (await service.report("ten_b", group_by="route", window_s=600))["groups"]
    assert group["route"] == "x|y" and group["requests"] == 1
    (group,) = (await service.report("ten_b", group_by="snapshot", window_s=600))["groups"]
    assert group["snapshot"] == "a|b"


async def test_ledger_fields_written_before_still_count(redis_url: str) -> None:
    client = aioredis.from_url(redis_url)
    bucket = f"z:{{ten_a}}:reuse:{int(time.time()) // BUCKET_S}"
    old = {  # one byoc request on snp_x and one managed request without a snapshot, as written before
        "local-cpu-2x|snp_x|local|requests": 1,
        "local-cpu-2x|snp_x|local|prompt": 100,
        "local-cpu-2x|snp_x|local|opportunity:estimated": 64,
        "local-cpu-2x|snp_x|local|captured:observed": 64,
        "local-cpu-2x|snp_x|local|captured_source:engine": 64,
        "local-cpu-2x|-|managed|requests": 1,
        "local-cpu-2x|-|managed|prompt": 100,
        "local-cpu-2x|-|managed|opportunity:estimated": 0,
        "local-cpu-2x|-|managed|captured_requests:unknown": 1,
    }
    for field, value in old.items():
        await client.hincrby(bucket, field, value)
    store = RedisReuseStore(client)
    window = await store.window("ten_a", 600)
    assert window[LedgerGroup("local-cpu-2x", "snp_x", "local")].captured_tokens == {
        EvidenceLevel.OBSERVED: 64
    }
    assert window[LedgerGroup("local-cpu-2x", None, "managed")].captured_unknown_requests == 1
    service = make_service(redis_url)
    await service.record("ten_a", figures_of("byoc", 32), snapshot="snp_x", route="local")  # the new format
    by_snapshot = {
        g["snapshot"]: g for g in (await service.report("ten_a", group_by="snapshot", window_s=600))["groups"]
    }
    assert set(by_snapshot) == {"snp_x", "-"}
    snp_x = by_snapshot["snp_x"]
    assert snp_x["requests"] == 2 and snp_x["opportunity"] == {"tokens": 128, "evidence": "estimated"}
    assert {c["evidence"]: c["tokens"] for c in snp_x["captured"]}["observed"] == 96
    assert snp_x["captured_by_source"] == {"engine": 64}
    assert by_snapshot["-"]["captured"][-1] == {"requests": 1, "tokens": None, "evidence": "unknown"}


async def test_escalation_evidence_is_the_strongest_level_with_captured_tokens(redis_url: str) -> None:
    service = make_service(redis_url)
    assert await service.escalation_evidence("ten_a", snapshot=None, window_s=3600) == NO_EVIDENCE
    await service.record("ten_a", figures_of("managed", 40), snapshot=None, route="managed")
    await service.record("ten_a", figures_of("managed", None), snapshot=None, route="managed")  # unknown
    await service.record("ten_a", figures_of("managed", 0), snapshot="snp_y", route="managed")  # reported 0
    assert await service.escalation_evidence("ten_a", snapshot=None, window_s=3600) == Evidence(
        EvidenceLevel.REPORTED, 40
    )
    await service.record("ten_a", figures_of("byoc", 64), snapshot="snp_x", route="local")
    await service.record("ten_a", figures_of("byoc", 32), snapshot="snp_x", route="local")
    assert await service.escalation_evidence("ten_a", snapshot=None, window_s=3600) == Evidence(
        EvidenceLevel.OBSERVED, 96
    )
    assert await service.escalation_evidence("ten_a", snapshot="snp_x", window_s=120) == Evidence(
        EvidenceLevel.OBSERVED, 96
    )
    assert await service.escalation_evidence("ten_a", snapshot="snp_y", window_s=3600) == NO_EVIDENCE
    assert await service.escalation_evidence("ten_b", snapshot=None, window_s=3600) == NO_EVIDENCE


async def test_escalation_evidence_counts_stronger_levels_and_only_its_window(redis_url: str) -> None:
    store = RedisReuseStore(aioredis.from_url(redis_url))
    service = ReuseService(store, PROFILE, scope_digest="d")
    group = LedgerGroup(PROFILE.name, "snp_x", "local")
    now = int(time.time())
    estimated = LedgerCounts(requests=1, captured_tokens={EvidenceLevel.ESTIMATED: 500})
    await store.record("ten_a", group, estimated, now_s=now)
    assert await service.escalation_evidence("ten_a", snapshot="snp_x", window_s=120) == Evidence(
        EvidenceLevel.ESTIMATED, 500
    )
    await store.record("ten_a", group, LedgerCounts.of(figures_of("managed", 30)), now_s=now)
    assert await service.escalation_evidence("ten_a", snapshot="snp_x", window_s=120) == Evidence(
        EvidenceLevel.REPORTED,
        30,  # the estimated tokens are weaker than the level: not counted
    )
    await store.record("ten_a", group, LedgerCounts.of(figures_of("byoc", 1000)), now_s=now - 2 * 3600)
    assert await service.escalation_evidence("ten_a", snapshot=None, window_s=3600) == Evidence(
        EvidenceLevel.REPORTED,
        30,  # two hours ago is outside the window
    )
    assert await service.escalation_evidence("ten_a", snapshot=None, window_s=3 * 3600) == Evidence(
        EvidenceLevel.OBSERVED, 1000
    )
    with pytest.raises(ValueError, match="window_s"):
        await service.escalation_evidence("ten_a", snapshot=None, window_s=0)


async def test_one_record_writes_every_hash_of_its_minute_with_the_ledger_ttl(redis_url: str) -> None:
    """The exact hashes one request's figures write (one script): the group's figures, the
    prefix family's, and the capture roll-ups of the tenant and its snapshot, each expiring
    with the ledger; a request that captured nothing writes no capture hash."""
    client = aioredis.from_url(redis_url)
    store = RedisReuseStore(client)
    now = int(time.time())
    minute = now // BUCKET_S
    group = LedgerGroup("p", "snp_x", "local")
    await store.record("ten_a", group, LedgerCounts.of(figures_of("byoc", 32)), now_s=now, family="fam_1")
    await store.record("ten_a", group, LedgerCounts.of(figures_of("byoc", 8)), now_s=now, family="fam_1")
    ledger = await client.hgetall(f"z:{{ten_a}}:reuse:{minute}")
    assert ledger == {
        b'["p","snp_x","local","requests"]': b"2",
        b'["p","snp_x","local","prompt"]': b"200",
        b'["p","snp_x","local","opportunity:estimated"]': b"128",
        b'["p","snp_x","local","captured:observed"]': b"40",
    }
    assert await client.hgetall(f"z:{{ten_a}}:reuse-family:{minute}") == {
        b'["fam_1","requests"]': b"2",
        b'["fam_1","prompt"]': b"200",
        b'["fam_1","captured:observed"]': b"40",
    }
    assert await client.hgetall(f"z:{{ten_a}}:reuse-capture:{minute}") == {
        b'[null,"observed"]': b"40",
        b'["snp_x","observed"]': b"40",
    }
    for kind in ("reuse", "reuse-family", "reuse-capture"):
        assert 8 * 24 * 3600 - 5 <= await client.ttl(f"z:{{ten_a}}:{kind}:{minute}") <= 8 * 24 * 3600
    await client.script_flush()  # a restarted Redis forgets scripts: the store loads it again
    await store.record(
        "ten_b", LedgerGroup("p", None, "managed"), LedgerCounts.of(figures_of("managed", None))
    )
    assert (
        await client.exists(f"z:{{ten_b}}:reuse-capture:{minute}", f"z:{{ten_b}}:reuse-family:{minute}") == 0
    )
    assert (await client.hgetall(f"z:{{ten_b}}:reuse:{minute}"))[b'["p",null,"managed","requests"]'] == b"1"
    await client.aclose()
