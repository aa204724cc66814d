"""Reuse figures on the real stack (Redis, Ray Serve, vLLM on CPU).

- The first request of a prefix has opportunity 0; its repeats have opportunity > 0 and capture
  > 0, opportunity ``estimated`` and capture ``observed``; the captured header equals
  ``usage.prompt_tokens_details.cached_tokens``.
- The sum of the per-request headers equals the ``/v2/reuse`` totals equals the Ray metric
  counters over the same requests.
- Another tenant's report does not show them.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from tests.integration.conftest import RunningStack, _create_tenant

pytestmark = [pytest.mark.redis, pytest.mark.ray, pytest.mark.vllm]


@pytest.fixture(scope="module")
def tenant(running_stack: RunningStack) -> Iterator[tuple[str, httpx.Client]]:
    name = f"reuser-{uuid.uuid4().hex[:8]}"
    key = asyncio.run(_create_tenant(running_stack.redis_url, name))
    with httpx.Client(
        base_url=running_stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=180
    ) as client:
        yield name, client


def _counter(name: str, tenant_id: str) -> float:
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and f'tenant="{tenant_id}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_headers_report_and_metrics_agree(
    tenant: tuple[str, httpx.Client], other_http: httpx.Client, running_stack: RunningStack
) -> None:
    _, client = tenant
    prompt = f"{uuid.uuid4()} " + "The agent's tools and instructions, resent on every turn. " * 20
    figures = []
    for turn in range(3):
        messages = [{"role": "user", "content": prompt}, {"role": "user", "content": f"turn {turn}"}]
        body = {"model": running_stack.model, "max_tokens": 1, "messages": messages}
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        cached = response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert response.headers["x-zumik-reuse-captured-tokens"] == str(cached)
        assert response.headers["x-zumik-reuse-evidence"] == "opportunity=estimated; captured=observed"
        timing = dict(part.strip().split(";dur=") for part in response.headers["server-timing"].split(","))
        assert {"decide", "first-output", "record"} <= set(timing)
        assert all(float(value) >= 0 for value in timing.values())
        figures.append((int(response.headers["x-zumik-reuse-opportunity-tokens"]), cached))
    assert figures[0][0] == 0  # the first request of a prefix: nothing seen before
    assert all(opportunity > 0 and cached > 0 for opportunity, cached in figures[1:])

    # The ledger is written just after each answer is sent (off the request's path): poll briefly.
    deadline = time.monotonic() + 10
    while True:
        report = client.get("/v2/reuse", params={"group_by": "tenant", "window_s": 3600}).json()
        if (report["groups"] and report["groups"][0]["requests"] == 3) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    (group,) = report["groups"]
    assert group["requests"] == 3
    assert group["opportunity"] == {"tokens": sum(o for o, _ in figures), "evidence": "estimated"}
    observed = next(c for c in group["captured"] if c["evidence"] == "observed")
    assert observed["tokens"] == sum(c for _, c in figures)
    assert other_http.get("/v2/reuse", params={"group_by": "tenant"}).json()["groups"] != report["groups"]
    by_route = client.get("/v2/reuse", params={"group_by": "route"}).json()["groups"]
    assert [g["route"] for g in by_route] == ["local"]
    assert client.get("/v2/reuse", params={"group_by": "nope"}).status_code == 400

    tenant_id = group["tenant"]
    assert re.fullmatch(r"ten_[0-9a-f]+", tenant_id)
    deadline = time.monotonic() + 120
    while True:  # Ray exports metrics on an interval
        opportunity = _counter("ray_zumik_reuse_opportunity_tokens_total", tenant_id)
        captured = _counter("ray_zumik_reuse_captured_tokens_total", tenant_id)
        if (opportunity, captured) == (sum(o for o, _ in figures), sum(c for _, c in figures)):
            break
        assert time.monotonic() < deadline, f"metrics {opportunity}, {captured} vs headers {figures}"
        time.sleep(5)


def test_reuse_report_command_prints_a_table_and_plots(
    tenant: tuple[str, httpx.Client], running_stack: RunningStack, tmp_path
) -> None:
    import json
    import os
    import subprocess
    import sys

    _, client = tenant
    key = client.headers["Authorization"][7:]
    command = [sys.executable, "-m", "zumik_serve.cli", "reuse", "report", "--url", running_stack.url,
               "--key", key, "--group-by", "route", "--out", str(tmp_path)]  # fmt: skip
    env = {**os.environ, "COLUMNS": "240"}  # one line per table row
    shown = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert shown.returncode == 0, shown.stderr
    # The CLI's console writes to stderr (stdout is kept for --json).
    assert "opportunity (estimated)" in shown.stderr and "local" in shown.stderr
    assert (tmp_path / "reuse.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((tmp_path / "reuse.json").read_text())
    assert report["series"] and {point["route"] for point in report["series"]} == {"local"}
    bad = subprocess.run(
        [*command[:-4], "--key", "zk-wrong", "--out", str(tmp_path)], capture_output=True, text=True
    )
    assert bad.returncode == 1 and "401" in bad.stderr
