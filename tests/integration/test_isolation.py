"""Tenant isolation at the engine: the cache salt is set by Zumik per tenant.

Positive control: tenant A repeating its own prompt hits the prefix cache. Tenant B sending
exactly A's prompt gets ``cached_tokens == 0``. A client-supplied ``cache_salt`` never reaches
the engine. ``zumik bench isolation-timing``'s rounds (T5c; its timing figures are the bench's,
docs/benchmarks.md) report cached tokens for A's repeat and none for B on A's prefix.
"""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest

from zumik_serve.bench.isolation_timing import measure

pytestmark = [pytest.mark.redis, pytest.mark.ray, pytest.mark.vllm]


def _cached(client: httpx.Client, body: dict) -> int:
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return int(response.json()["usage"]["prompt_tokens_details"]["cached_tokens"])


def test_another_tenant_never_hits_a_tenants_prefix(
    http: httpx.Client, other_http: httpx.Client, running_stack
) -> None:
    prompt = f"{uuid.uuid4()} " + "The shared tool registry and repository policy. " * 15
    body = {"model": running_stack.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 1}
    assert _cached(http, body) == 0
    assert _cached(http, body) > 0  # the positive control: A's own repeat hits
    assert _cached(other_http, body) == 0  # B, with A's exact prompt, does not
    assert _cached(other_http, body) > 0  # and B's own repeat hits B's own blocks


def test_client_cache_salt_is_ignored(http: httpx.Client, running_stack) -> None:
    prompt = f"{uuid.uuid4()} " + "Another long and stable prefix for the salt test. " * 15
    body = {"model": running_stack.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 1}
    assert _cached(http, body) == 0
    # A client trying to pick its own salt still lands in its tenant's scope (and hits its cache).
    assert _cached(http, {**body, "cache_salt": "attacker-chosen"}) > 0


def test_isolation_timing_rounds_see_a_hit_for_a_and_none_for_b(running_stack) -> None:
    result = asyncio.run(measure(
        running_stack.url, running_stack.tenant_key, running_stack.other_tenant_key, running_stack.model,
        rounds=3, prompt_tokens=400, warm=1, seed=5,
    ))  # fmt: skip
    assert [len(result.cached(arm)) for arm in ("a-repeat", "b-same", "b-fresh")] == [3, 3, 3]
    assert all(cached > 0 for cached in result.cached("a-repeat")), result.samples  # the control
    assert result.cached("b-same") == [0, 0, 0], result.samples  # A's warm prefix: nothing for B
    assert result.cached("b-fresh") == [0, 0, 0], result.samples
