"""Zumik's Ray metrics accept every figure a request can produce (zero tokens included: Ray
counters refuse non-positive increments, so a first request must not break the request path)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from zumik_serve.reuse.figures import ReuseFigures

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_runtime() -> Iterator[None]:
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")
    yield
    if started:
        ray.shutdown()


def test_reuse_and_decision_metrics_take_zero_and_unknown_figures(ray_runtime: None) -> None:
    from zumik_serve.app.metrics import RayDecisionMetrics, RayReuseMetrics

    reuse = RayReuseMetrics()
    for opportunity, cached, kind in (
        (0, 0, "byoc"),
        (64, 32, "byoc"),
        (0, None, "managed"),
        (32, 0, "managed"),
    ):
        figures = ReuseFigures.of(
            prompt_tokens=100, opportunity_tokens=opportunity, route_kind=kind, cached_tokens=cached
        )
        reuse.observe(tenant="ten_a", profile="p", route="local", figures=figures)
    RayDecisionMetrics("p").observe(route="local", reason="default", decide_us=12.5)
    RayDecisionMetrics("p").chat_keys("engine")
