"""Reuse accounting on a real redis-server.

- Evidence levels are ordered unknown < estimated < reported < observed; combining reports the
  weakest; a provider that leaves ``cached_tokens`` out gives capture ``unknown``, never zero.
- The opportunity index counts the leading blocks a scope has seen, stops at the first gap,
  keeps scopes apart, and stays within its entry bound.
- The report keeps opportunity and each capture level apart (unknown counted in requests, with
  no tokens), sums over the window, groups by route or snapshot, prices savings per route, and
  shows a tenant only its own figures.
"""

from __future__ import annotations

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
from zumik_serve.reuse.store import RedisReuseStore
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
    assert await store.forget_scopes(["scope-a"]) == 1
    assert await store.seen_prefix_blocks("scope-a", "c" * 64, ["k1"]) == 0


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
