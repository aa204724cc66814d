"""Metrics reach Ray's metrics export: Zumik's KV tier counters (by event and tier) and every
series the Grafana dashboard in deploy/grafana queries, scraped from the running stack."""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.redis, pytest.mark.ray, pytest.mark.vllm]

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "zumik-dashboard.json"


def _dashboard_metrics() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    return {name for expr in exprs for name in re.findall(r"\bray_[a-z0-9_]+", expr)}


def _scrape(running_stack) -> str:
    monitoring = running_stack.stack.monitoring  # the URLs `zumik serve` prints (app/monitoring.py)
    (url,) = monitoring.metrics  # one node
    return httpx.get(url, timeout=10).text


def _exported(text: str) -> set[str]:
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and line[0] != "#"}


GAUGE_TTL_S = 20  # Ray's agent drops a gauge not set again within two 10 s export intervals


def test_kv_tier_counters_and_dashboard_series_are_exported(http: httpx.Client, running_stack) -> None:
    wanted = _dashboard_metrics()
    assert "ray_zumik_kv_tier_blocks_total" in wanted

    def send() -> None:  # a new prompt each time: its blocks go through the tiers
        prompt = f"{uuid.uuid4()} " + "Metrics need traffic through the tiers. " * 20
        messages = [{"role": "user", "content": prompt}]
        body = {"model": running_stack.model, "messages": messages, "max_tokens": 2}
        for _ in range(2):
            assert http.post("/v1/chat/completions", json=body).status_code == 200

    # vLLM sets its gauges (requests running, KV cache usage) only in engine steps, so the
    # series the dashboard reads exist while the engine serves: traffic goes on while polling.
    deadline = time.monotonic() + 120
    while True:  # Ray exports metrics on an interval
        send()
        text = _scrape(running_stack)
        missing = wanted - _exported(text)
        stores = [line for line in text.splitlines() if line.startswith("ray_zumik_kv_tier_blocks_total{")]
        if not missing and any('event="store"' in line and "tier=" in line for line in stores):
            break
        assert time.monotonic() < deadline, f"not exported: {sorted(missing)}; tier series: {stores[:3]}"
        time.sleep(5)

    # The tiers' occupancy is not a figure of activity: it stays on the dashboard while the
    # engine is idle, past Ray's gauge TTL (the connector's metrics set it again).
    time.sleep(GAUGE_TTL_S + 10)
    idle = _exported(_scrape(running_stack))
    tier_gauges = {"ray_zumik_kv_tier_used_bytes", "ray_zumik_kv_tier_capacity_bytes"}
    assert tier_gauges <= idle, f"idle engine's tier occupancy gone: {sorted(tier_gauges - idle)}"
