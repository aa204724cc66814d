"""Monitoring where users look, and a drain before a stop. Invariants:

- every series the shipped Grafana dashboard queries is one that Zumik, vLLM or Ray Serve
  defines (Zumik's from its real metric objects, named as Ray's export names them), grouped by
  labels the metric has; every Zumik metric has a panel;
- the Prometheus configs in deploy/prometheus read Ray's discovery file (the name Ray writes) or
  the default metrics port of ``zumik serve``;
- ``zumik serve`` asks Ray for its dashboard on loopback and for fixed dashboard and metrics
  ports (flags or environment); a taken port stops the start, naming the flag;
- a draining gateway answers new requests (``/healthz`` included) with 503 shutting_down and
  Retry-After, waits for the requests in flight (a stream until its end), and returns at its
  timeout with those still in flight counted;
- ``zumik serve``'s signals: before it serves, a signal interrupts the start; then the first asks
  for a drain, a second cuts it short, and once stopping they are ignored.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from tests.support.inprocess import InProcessGateway, make_gateway, wait_until
from zumik_serve.app.monitoring import (
    DEFAULT_DASHBOARD_PORT,
    DEFAULT_METRICS_PORT,
    DISCOVERY_FILE,
    LOOPBACK,
    MonitoringOptions,
    MonitoringPortError,
)
from zumik_serve.app.shutdown import StopSignals

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "zumik-dashboard.json"
PROMETHEUS = ROOT / "deploy" / "prometheus"
SERIES = re.compile(r"\bray_[a-z0-9_]+")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
RAY_LABELS = {"Component", "NodeAddress", "SessionName", "Version", "WorkerId", "JobId", "le"}


def _dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    variables = [variable["query"] for variable in dashboard["templating"]["list"]]
    return exprs + [query for query in variables if isinstance(query, str) and "ray_" in query]


def _ray_metric(obj: Any) -> Any:
    from ray.util.metrics import Metric

    inner = getattr(obj, "metric", obj)  # vLLM's Ray wrappers hold the Ray metric
    return inner if isinstance(inner, Metric) else None


def _zumik_metrics() -> dict[str, tuple[str, set[str]]]:
    """Every metric Zumik defines, by exported series name: (kind, label names). Built from the
    real objects: the gateway's Ray metrics and the KV connector's, made with the Ray wrapper
    classes ray.serve.llm gives vLLM's connector metrics."""
    from prometheus_client import Counter, Gauge, Histogram
    from ray.util.metrics import Counter as RayCounter
    from ray.util.metrics import Histogram as RayHistogram
    from vllm.v1.metrics.ray_wrappers import RayCounterWrapper, RayGaugeWrapper, RayHistogramWrapper

    from kvstore.connector import ZumikKVPromMetrics
    from zumik_serve.app.metrics import RayDecisionMetrics, RayReuseMetrics

    connector = ZumikKVPromMetrics(
        SimpleNamespace(kv_transfer_config=None),  # type: ignore[arg-type]
        {Gauge: RayGaugeWrapper, Counter: RayCounterWrapper, Histogram: RayHistogramWrapper},
        ["model_name", "engine"],
        {0: ["zumik-tiny", "0"]},
    )
    metrics: dict[str, tuple[str, set[str]]] = {}
    for owner in (RayReuseMetrics(), RayDecisionMetrics("p"), connector):
        for value in vars(owner).values():
            metric = _ray_metric(value)
            if metric is None:
                continue
            kind = "counter" if isinstance(metric, RayCounter) else "histogram"
            kind = kind if isinstance(metric, RayCounter | RayHistogram) else "gauge"
            for suffix in SUFFIXES[kind]:
                metrics[f"ray_{metric.info['name']}{suffix}"] = (kind, set(metric.info["tag_keys"]))
    return metrics


def _defined_in(package_dir: Path, literal: str) -> bool:
    return any(literal in path.read_text(errors="ignore") for path in package_dir.rglob("*.py"))


def test_every_series_the_dashboard_queries_is_defined_by_zumik_vllm_or_serve() -> None:
    import ray.serve
    import vllm.v1.metrics

    zumik = _zumik_metrics()
    assert {"ray_zumik_decisions_total", "ray_zumik_kv_tier_blocks_total"} <= set(zumik)
    vllm_dir = Path(vllm.v1.metrics.__file__).parent
    serve_dir = Path(ray.serve.__file__).parent
    undefined = []
    for name in {name for query in _dashboard_queries() for name in SERIES.findall(query)}:
        base = re.sub(r"_(total|bucket|sum|count)$", "", name)
        if name.startswith("ray_zumik_"):
            defined = name in zumik
        elif name.startswith("ray_vllm_"):
            defined = _defined_in(vllm_dir, f'"vllm:{base.removeprefix("ray_vllm_")}"')
        elif name.startswith("ray_serve_"):
            defined = _defined_in(serve_dir, f'"{base.removeprefix("ray_")}"')
        else:
            defined = False
        if not defined:
            undefined.append(name)
    assert not undefined, f"the dashboard queries series nothing defines: {sorted(undefined)}"


def test_every_zumik_metric_has_a_panel_grouped_by_its_own_labels() -> None:
    zumik = _zumik_metrics()
    queries = _dashboard_queries()
    queried = {name for query in queries for name in SERIES.findall(query)}
    bases = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in zumik}
    missing = {base for base in bases if not any(name.startswith(base) for name in queried)}
    assert not missing, f"Zumik metrics with no panel: {sorted(missing)}"
    for query in queries:
        for name in SERIES.findall(query):
            if name in zumik:
                for group in re.findall(r"by \(([^)]*)\)", query):
                    labels = {label.strip() for label in group.split(",")}
                    assert labels <= zumik[name][1] | RAY_LABELS, (query, zumik[name][1])


def test_prometheus_configs_read_rays_discovery_file_or_the_default_metrics_port() -> None:
    from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

    assert DISCOVERY_FILE == PROMETHEUS_SERVICE_DISCOVERY_FILE
    discovery = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    (job,) = discovery["scrape_configs"]
    (files,) = [config["files"] for config in job["file_sd_configs"]]
    assert files == [f"/tmp/ray/session_latest/{PROMETHEUS_SERVICE_DISCOVERY_FILE}"]
    static = yaml.safe_load((PROMETHEUS / "prometheus-static.yml").read_text())
    (job,) = static["scrape_configs"]
    (targets,) = [config["targets"] for config in job["static_configs"]]
    assert targets == [f"127.0.0.1:{DEFAULT_METRICS_PORT}"]
    for config in (discovery, static):
        assert set(config) == {"global", "scrape_configs"}
        assert config["global"]["scrape_interval"] == "10s"
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian's prometheus package): YAML and ports checked only")
    for name in ("prometheus.yml", "prometheus-static.yml"):
        checked = subprocess.run(
            [promtool, "check", "config", "--syntax-only", str(PROMETHEUS / name)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert checked.returncode == 0, checked.stdout + checked.stderr


def _serve_args(*argv: str) -> Any:
    from zumik_serve.cli import _parser

    return _parser().parse_args(["serve", *argv])


def test_serve_starts_the_dashboard_on_loopback_and_fixed_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DASHBOARD_HOST", "DASHBOARD_PORT", "METRICS_PORT", "DRAIN_TIMEOUT_S"):
        monkeypatch.delenv(f"ZUMIK_{name}", raising=False)
    args = _serve_args()
    assert (args.dashboard_host, args.dashboard_port, args.metrics_port) == (
        LOOPBACK, DEFAULT_DASHBOARD_PORT, DEFAULT_METRICS_PORT,
    )  # fmt: skip
    assert not args.no_dashboard and args.drain_timeout == 30
    options = MonitoringOptions(
        include_dashboard=True, dashboard_host=args.dashboard_host, dashboard_port=12345, metrics_port=23456
    )
    assert options.ray_init_kwargs() == {
        "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": 12345,
        "_metrics_export_port": 23456,
    }  # fmt: skip
    monkeypatch.setenv("ZUMIK_METRICS_PORT", "9300")
    monkeypatch.setenv("ZUMIK_DASHBOARD_HOST", "0.0.0.0")
    monkeypatch.setenv("ZUMIK_DRAIN_TIMEOUT_S", "75")
    args = _serve_args("--dashboard-port", "9301", "--no-dashboard")
    assert (args.metrics_port, args.dashboard_host, args.dashboard_port) == (9300, "0.0.0.0", 9301)
    assert args.no_dashboard and args.drain_timeout == 75


def test_library_callers_get_no_dashboard_and_a_free_metrics_port() -> None:
    options = MonitoringOptions().resolved()
    assert options.metrics_port is not None and not options.include_dashboard
    assert options.ray_init_kwargs()["_metrics_export_port"] == options.metrics_port
    assert "dashboard_port" not in options.ray_init_kwargs()  # Ray's own choice, should it start


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_a_taken_port_stops_the_start_naming_its_flag(taken_port: int) -> None:
    with pytest.raises(MonitoringPortError, match="--metrics-port"):
        MonitoringOptions(metrics_port=taken_port).resolved()
    with pytest.raises(MonitoringPortError, match="--dashboard-port"):
        MonitoringOptions(include_dashboard=True, dashboard_port=taken_port, metrics_port=None).resolved()


CHAT = {"model": "zumik-tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8}


@pytest.fixture
async def gateway(module_redis_url: str, tiny_model_dir: Path) -> InProcessGateway:
    return make_gateway(module_redis_url, tiny_model_dir)


@pytest.mark.redis
async def test_drain_finishes_a_stream_in_flight_and_refuses_new_requests(gateway: InProcessGateway) -> None:
    from zumik_serve.api.drain import DrainReport, drain_app

    gateway.engine.hold = asyncio.Event()
    async with gateway.client() as http:
        streaming = asyncio.create_task(http.post("/v1/chat/completions", json={**CHAT, "stream": True}))

        async def engine_called() -> bool:
            return len(gateway.engine.calls) == 1

        await wait_until(engine_called, what="the stream to reach the engine")
        assert (await http.get("/healthz")).json() == {"status": "ok", "in_flight": 1}
        draining = asyncio.create_task(drain_app(gateway.app, timeout_s=60))

        async def drain_began() -> bool:
            return bool(gateway.app.state.drain.draining)

        await wait_until(drain_began, what="the drain to begin")
        refused = await http.post("/v1/chat/completions", json=CHAT)
        health = await http.get("/healthz")
        native = await http.post("/v2/generate", json={"input": "hi"})
        assert not draining.done() and not streaming.done()
        gateway.engine.hold.set()
        response = await streaming
        report = await draining
    assert refused.status_code == health.status_code == native.status_code == 503
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("service_unavailable_error", "shutting_down")
    assert "retry" in error["message"] and refused.headers["retry-after"] == "1"
    assert native.json()["error"]["code"] == "shutting_down"
    assert response.status_code == 200 and response.text.rstrip().endswith("data: [DONE]")
    assert report == DrainReport(in_flight_at_start=1, left_in_flight=0)
    assert len(gateway.engine.calls) == 1  # the refused requests never reached the engine


@pytest.mark.redis
async def test_drain_returns_at_its_timeout_counting_requests_still_in_flight(
    gateway: InProcessGateway,
) -> None:
    from zumik_serve.api.drain import DrainReport, drain_app

    gateway.engine.hold = asyncio.Event()
    async with gateway.client() as http:
        held = asyncio.create_task(http.post("/v1/chat/completions", json=CHAT))

        async def engine_called() -> bool:
            return len(gateway.engine.calls) == 1

        await wait_until(engine_called, what="the request to reach the engine")
        report = await drain_app(gateway.app, timeout_s=0.05)
        assert report == DrainReport(in_flight_at_start=1, left_in_flight=1)
        gateway.engine.hold.set()
        assert (await held).status_code == 200
    assert gateway.app.state.drain.in_flight == 0


@pytest.fixture
def held_ledger(monkeypatch: pytest.MonkeyPatch) -> tuple[asyncio.Event, asyncio.Event]:
    """Reuse-ledger writes wait for the first event before they run, and set the second once done."""
    from zumik_serve.reuse.store import RedisReuseStore

    hold, written = asyncio.Event(), asyncio.Event()
    original = RedisReuseStore.record

    async def held_record(self: RedisReuseStore, *args: Any, **kwargs: Any) -> None:
        await hold.wait()
        await original(self, *args, **kwargs)
        written.set()

    monkeypatch.setattr(RedisReuseStore, "record", held_record)
    return hold, written


@pytest.mark.redis
@pytest.mark.parametrize("released", [True, False])
async def test_drain_waits_for_the_ledger_writes_its_requests_left_within_its_timeout(
    gateway: InProcessGateway, held_ledger: tuple[asyncio.Event, asyncio.Event], released: bool
) -> None:
    """A request's reuse-ledger write runs after its answer is sent; a drain that returned once
    the answer was out let the process stop with the write unfinished, and the figures were lost."""
    from zumik_serve.api.drain import DrainReport, drain_app

    hold, written = held_ledger
    async with gateway.client() as http:
        assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200
    draining = asyncio.create_task(drain_app(gateway.app, timeout_s=30 if released else 0.2))
    await asyncio.sleep(0.05)
    assert not draining.done() and not written.is_set()  # the answer is out, its write is not
    if released:
        hold.set()
    report = await draining
    assert report == DrainReport(
        in_flight_at_start=0, left_in_flight=0, ledger_writes_left=0 if released else 1
    )
    assert written.is_set() is released
    hold.set()
    await asyncio.wait_for(written.wait(), timeout=10)  # let it finish before the next test


@pytest.mark.redis
async def test_a_replica_stopped_by_serve_waits_for_its_ledger_writes_in_its_lifespan(
    gateway: InProcessGateway, held_ledger: tuple[asyncio.Event, asyncio.Event]
) -> None:
    """Serve stops a replica (a scale-down, a redeploy) through the app's lifespan, without
    ``drain_app``: its shutdown waits for the reuse-ledger writes too."""
    hold, written = held_ledger
    async with gateway.app.router.lifespan_context(gateway.app):
        async with gateway.client() as http:
            assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200
        await asyncio.sleep(0.05)
        assert not written.is_set()
        asyncio.get_running_loop().call_later(0.2, hold.set)
    assert written.is_set()  # the shutdown waited for it


@pytest.fixture
def signals() -> Iterator[StopSignals]:
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    stop = StopSignals()
    stop.install()
    yield stop
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def _raise(signum: int) -> None:
    os.kill(os.getpid(), signum)  # Python runs the handler in this thread before the next line


def test_a_signal_during_the_start_interrupts_it(signals: StopSignals) -> None:
    with pytest.raises(KeyboardInterrupt):
        _raise(signal.SIGTERM)
    assert signals.received == signal.SIGTERM


def test_first_signal_drains_a_second_cuts_the_drain_short_then_signals_are_ignored(
    signals: StopSignals,
) -> None:
    signals.serving()
    _raise(signal.SIGTERM)
    assert signals.wait() == signal.SIGTERM
    with pytest.raises(KeyboardInterrupt):
        _raise(signal.SIGINT)
    signals.stopping()
    _raise(signal.SIGTERM)  # ignored: the stop completes
    assert signals.received == signal.SIGTERM
