"""`zumik bench routing`'s scaling arm, driven through the real gateway in process (the engine is
the shared stand-in; the autoscaler is played by ``running()``, stepping on the engine's count of
calls). The arm on real engines and Serve's real autoscaler is `zumik bench routing`
(docs/benchmarks.md); here: the phases end on the autoscaler's steps and nowhere else, every
request is counted once, a failed request is reported and never retried or dropped, and a step
that never comes is reported as not reached."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.support.fake_engine import FakeEngine
from tests.support.inprocess import make_gateway
from zumik_serve.bench.routing import (
    ArmResult,
    arrival_offsets,
    figures,
    ideal_cached,
    open_loop_loads,
    open_sweep_table,
    plot_routing,
    pooled_ideal,
    shared_prefix,
)
from zumik_serve.bench.routing_scaling import measure_scaling_arm
from zumik_serve.engines.protocol import EngineFailure

pytestmark = pytest.mark.redis

STEADY = 6


def autoscaler(engine: FakeEngine, steps: list[tuple[int, int]]) -> tuple[list[int], object]:
    """``running()`` that reports the ``replicas`` of each step ``(calls, replicas)`` in turn,
    moving to the next once the engine saw ``calls`` more calls than when the current one was
    first reported (one step a poll); and the counts it reported.

    Counted from the report, not from the start: the bench ends a phase on the poll that sees
    its step, with at most ``concurrency`` requests still on their way to the engine, so a next
    step more than that many calls later never comes before the phase's end. Steps at fixed
    call counts raced the polls: under load the steady phase's last requests in flight reached
    the scale-down step's count before the phase ended (its end then saw 2 replicas)."""
    seen: list[int] = []
    current, since = 0, 0

    async def running() -> int:
        nonlocal current, since
        calls = len(engine.bodies)
        if current + 1 < len(steps) and calls - since >= steps[current + 1][0]:
            current, since = current + 1, calls
        seen.append(steps[current][1])
        return steps[current][1]

    return seen, running


async def test_the_phases_follow_the_autoscaler_and_count_every_request(
    module_redis_url: str, tiny_model_dir: Path
) -> None:
    gateway = make_gateway(module_redis_url, tiny_model_dir)
    engine = gateway.engine
    prompts = shared_prefix(random.Random(5), 30)  # 120 requests, far more than the run needs
    # Idle after the deploy: 2 running; the steady load brings the third, then the scaling steps,
    # each more calls after the last than the 3 requests a phase may have in flight at its end.
    steps = [(0, 2), (STEADY + 3, 3), (5, 2), (6, 3)]
    seen, running = autoscaler(engine, steps)
    # The first request fails for good (a 503 would be retried by the gateway, and succeed).
    engine.fail_next(EngineFailure(status=400, message="bad prompt", type="invalid_request_error"))
    async with gateway.client() as client:
        run = await measure_scaling_arm(
            client, "zumik-tiny", prompts, block_size=32, concurrency=3,
            replicas=3, running=running, phase_requests=STEADY, poll_s=0.01,  # type: ignore[arg-type]
        )  # fmt: skip
    names = [phase.name for phase in run.phases]
    assert names == ["steady", "scale-down", "scale-up", "after"]
    steady, down, up, after = run.phases
    assert steady.requests >= STEADY + 3 and steady.replicas_at_end == 3 and after.requests == STEADY
    assert down.reached and down.replicas_at_end == 2 and up.reached and up.replicas_at_end == 3
    assert run.scaled and 2 in seen
    sent = sum(phase.requests for phase in run.phases)
    assert run.result.requests == sent == len(engine.bodies)  # each reached the engine once
    assert len(run.failures) == 1 and run.failures[0].startswith("request ") and "400" in run.failures[0]
    assert run.result.prompt_tokens == sum(len(p) for p in prompts[:sent])
    assert run.result.ideal_cached_tokens == sum(ideal_cached(prompts[:sent], 32))
    assert run.to_json()["scaled"] is True and run.to_json()["failures"] == list(run.failures)


async def test_a_step_that_never_comes_is_reported_not_reached(
    module_redis_url: str, tiny_model_dir: Path
) -> None:
    gateway = make_gateway(module_redis_url, tiny_model_dir)

    async def never_scales() -> int:
        return 3

    prompts = shared_prefix(random.Random(6), 3)  # 12 requests: the scale-down phase runs them out
    async with gateway.client() as client:
        run = await measure_scaling_arm(
            client, "zumik-tiny", prompts, block_size=32, concurrency=2,
            replicas=3, running=never_scales, phase_requests=4, poll_s=0.01,
        )  # fmt: skip
    assert not run.scaled and not run.phases[1].reached and run.phases[1].replicas_at_end == 3
    assert sum(phase.requests for phase in run.phases) == run.result.requests == len(prompts)
    assert not run.failures


def test_the_figures_compare_zumik_with_serves_balancing_in_the_same_run() -> None:
    def arm(name: str, *, cached: int, p90: float, wall: float) -> ArmResult:
        return ArmResult(name, "shared_prefix", 10, 1000, cached, 900, 10.0, p90, wall)

    zumik = arm("zumik", cached=880, p90=30.0, wall=2.0)
    rows = figures([arm("rr-cache", cached=300, p90=90.0, wall=4.0), zumik])
    assert rows["shared_prefix"]["ttft_p90_ratio"] == pytest.approx(3.0)
    assert rows["shared_prefix"]["throughput_ratio"] == pytest.approx(2.0)
    assert rows["shared_prefix"]["capture_efficiency"] == pytest.approx(880 / 900)
    alone = figures([zumik])  # no rr-cache arm in the run
    assert alone["shared_prefix"]["ttft_p90_ratio"] is None
    assert rows["shared_prefix"]["ttft_p90_ratio_open"] is None  # no open-loop phase ran


def test_open_loop_results_have_their_own_ratio_and_leave_the_closed_loop_figures_alone() -> None:
    def arm(name: str, *, p90: float, arrival: str) -> ArmResult:
        rate = 2.0 if arrival == "open" else None
        return ArmResult(name, "shared_prefix", 10, 1000, 500, 900, 10.0, p90, 5.0, None, arrival, rate)

    rows = figures([
        arm("rr-cache", p90=90.0, arrival="closed"), arm("rr-cache", p90=800.0, arrival="open"),
        arm("zumik", p90=45.0, arrival="closed"), arm("zumik", p90=100.0, arrival="open"),
    ])  # fmt: skip
    assert rows["shared_prefix"]["ttft_p90_ratio"] == pytest.approx(2.0)
    assert rows["shared_prefix"]["ttft_p90_ratio_open"] == pytest.approx(8.0)
    assert rows["shared_prefix"]["open_rate_per_s"] == 2.0


def test_an_open_loop_sweep_is_judged_at_the_lowest_load_that_saturates_the_baselines_group(
    tmp_path: Path,
) -> None:
    def arm(name: str, *, load: float, p90: float, wall: float) -> ArmResult:
        # 10 requests offered at 2 req/s per unit of load: answered in 5 s / load when keeping up
        return ArmResult(
            name, "agent_sessions", 10, 1000, 500, 900, 10.0, p90, wall, None, "open", 2.0 * load, load=load
        )

    results = [  # the baseline keeps up at load 1, not at 2 nor at 3; Zumik's group up to 2
        arm("rr-cache", load=1.0, p90=300.0, wall=5.2), arm("zumik", load=1.0, p90=150.0, wall=5.1),
        arm("rr-cache", load=2.0, p90=1200.0, wall=4.0), arm("zumik", load=2.0, p90=200.0, wall=2.6),
        arm("rr-cache", load=3.0, p90=3000.0, wall=4.5), arm("zumik", load=3.0, p90=600.0, wall=2.5),
    ]  # fmt: skip
    assert [r.saturated for r in results] == [False, False, True, False, True, True]
    closed = [
        ArmResult(arm, "agent_sessions", 10, 1000, 500, 900, 10.0, 50.0, 5.0) for arm in ("rr-cache", "zumik")
    ]
    assert closed[0].saturated is None  # a closed loop is offered no rate
    row = figures([*closed, *results])["agent_sessions"]
    assert [point["load"] for point in row["open_sweep"]] == [1.0, 2.0, 3.0]
    assert [point["ttft_p90_ratio"] for point in row["open_sweep"]] == pytest.approx([2.0, 6.0, 5.0])
    assert row["ttft_p90_ratio_open"] == pytest.approx(6.0) and row["open_load"] == 2.0
    assert row["open_rate_per_s"] == 4.0 and row["open_baseline_saturated"] is True
    # A sweep the baseline kept up with all along: judged at its highest load, said unsaturated.
    kept_up = figures([*closed, *results[:2]])["agent_sessions"]
    assert (
        kept_up["ttft_p90_ratio_open"] == pytest.approx(2.0) and kept_up["open_baseline_saturated"] is False
    )
    summary = {"baseline": "rr-cache", "figures": {"agent_sessions": row}}
    table = open_sweep_table(summary)
    assert table is not None and table.row_count == 3
    assert open_sweep_table({"figures": {"agent_sessions": {"open_sweep": []}}}) is None  # no open loop
    plot_routing({"results": [result.to_json() for result in results]}, tmp_path / "routing.png")
    assert (tmp_path / "routing.png").read_bytes()[:4] == b"\x89PNG"


def test_the_open_loop_loads_are_one_multiple_or_a_sweep() -> None:
    assert open_loop_loads("1.6") == [1.6] and open_loop_loads("2.4,1.2,1.6") == [1.2, 1.6, 2.4]
    assert open_loop_loads("") == [] == open_loop_loads("0") == open_loop_loads(None)
    for wrong in ("fast", "1.2,-1"):
        with pytest.raises(SystemExit, match="--open-loop-load"):
            open_loop_loads(wrong)


def test_side_by_side_results_have_their_own_ratios_and_plot(tmp_path: Path) -> None:
    def arm(name: str, *, p90: float, wall: float, paired: bool) -> ArmResult:
        return ArmResult(name, "no_reuse", 10, 1000, 0, 0, 10.0, p90, wall, side_by_side=paired)

    results = [
        arm("rr-cache", p90=90.0, wall=4.0, paired=False), arm("zumik", p90=45.0, wall=8.0, paired=False),
        arm("rr-cache", p90=60.0, wall=5.0, paired=True), arm("zumik", p90=50.0, wall=4.0, paired=True),
    ]  # fmt: skip
    rows = figures(results)["no_reuse"]
    assert rows["ttft_p90_ratio"] == pytest.approx(2.0) and rows["throughput_ratio"] == pytest.approx(0.5)
    assert rows["ttft_p90_ratio_side_by_side"] == pytest.approx(1.2)
    assert rows["throughput_ratio_side_by_side"] == pytest.approx(1.25)
    plot_routing({"results": [result.to_json() for result in results]}, tmp_path / "routing.png")
    assert (tmp_path / "routing.png").read_bytes()[:4] == b"\x89PNG"


def test_arrivals_are_a_seeded_poisson_process_at_the_asked_rate() -> None:
    offsets = arrival_offsets(4.0, 4001, seed=7)
    assert offsets == arrival_offsets(4.0, 4001, seed=7)  # every arm gets the same schedule
    assert offsets[0] == 0.0 and all(b > a for a, b in zip(offsets, offsets[1:], strict=False))
    gaps = [b - a for a, b in zip(offsets, offsets[1:], strict=False)]
    assert sum(gaps) / len(gaps) == pytest.approx(0.25, rel=0.05)  # mean gap 1/rate
    # exponential gaps: about e^-1 of them are longer than the mean (a fixed pace would give none)
    assert sum(gap > 0.25 for gap in gaps) / len(gaps) == pytest.approx(0.368, abs=0.03)


def test_the_pooled_ideal_is_the_unlimited_one_until_the_groups_kv_runs_out() -> None:
    a, b = list(range(10, 75)), list(range(100, 165))  # 65 tokens: two full blocks of 32 each
    prompts = [a, b, a, b]
    assert pooled_ideal(prompts, 32, capacity_blocks=100) == ideal_cached(prompts, 32) == [0, 0, 64, 64]
    # Room for 3 blocks: when b's blocks came in, a's tail went (a tail goes before its head),
    # so a's second request finds a's first block only; b's then finds b's first block only.
    assert pooled_ideal(prompts, 32, capacity_blocks=3) == [0, 0, 32, 32]
    assert pooled_ideal(prompts, 32, capacity_blocks=1) == [0, 0, 0, 0]
