"""``zumik bench routing``'s scaling arm: Zumik's replica choice while Serve's autoscaler removes
one engine replica and adds another, mid-run.

The group autoscales between ``replicas - 1`` and ``replicas`` (``arm_profile("zumik-scaling")``:
target 2 ongoing requests per replica, windows of seconds). One request sequence (a shared-prefix
workload, long enough for every phase) is sent in phases, each ended by what the autoscaler did,
read from Serve's own status:

    steady      ``phase_requests`` requests at the arm's concurrency, and on until Serve runs
                ``replicas`` (an idle group scales down between the deploy and the first request)
    scale-down  one request at a time until Serve runs one replica fewer (the load asks for fewer)
    scale-up    the arm's concurrency until Serve runs ``replicas`` again (the load asks for more)
    after       ``phase_requests`` more, the new replica among the candidates

Every request is counted: a failed one (an error status, a broken stream) is a failure of the
arm, never retried here. Capture efficiency is over the requests sent. A phase that the
autoscaler did not end within ``timeout_s`` is reported as not reached (the figure then does
not hold), never hidden.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from zumik_serve.bench.routing import ArmResult, ideal_cached, stream_completion


@dataclass(frozen=True)
class ScalingPhase:
    name: str
    requests: int
    seconds: float
    replicas_at_end: int
    reached: bool  # the autoscaler's step this phase waits for happened (a count phase: True)


@dataclass(frozen=True)
class ScalingRun:
    result: ArmResult
    phases: tuple[ScalingPhase, ...]
    failures: tuple[str, ...]  # "request <index>: what happened", in order

    @property
    def scaled(self) -> bool:
        return all(phase.reached for phase in self.phases)

    def to_json(self) -> dict[str, Any]:
        return {"result": self.result.to_json(), "phases": [asdict(p) for p in self.phases],
                "failures": list(self.failures), "scaled": self.scaled}  # fmt: skip


async def measure_scaling_arm(
    client: httpx.AsyncClient, model: str, prompts: list[list[int]], *, block_size: int, concurrency: int,
    replicas: int, running: Callable[[], Awaitable[int]], phase_requests: int, timeout_s: float = 900.0,
    poll_s: float = 1.0, on_request: Callable[[], None] = lambda: None,
    progress: Callable[[str], None] = lambda _: None,
) -> ScalingRun:  # fmt: skip
    """Send ``prompts`` in order through the phases above with ``client`` (authenticated, its
    base URL Zumik's); ``running()``: the group's running replicas as Serve reports them."""
    ttfts: list[float] = []
    cached = 0
    failures: list[str] = []
    phases: list[ScalingPhase] = []
    cursor = 0

    async def send(index: int) -> None:
        nonlocal cached
        try:
            ttft_ms, hit = await stream_completion(client, model, prompts[index], what=f"request {index}")
        except (RuntimeError, httpx.HTTPError) as error:
            failures.append(str(error) if isinstance(error, RuntimeError) else f"request {index}: {error!r}")
        else:
            ttfts.append(ttft_ms)
            cached += hit
        on_request()

    async def phase(name: str, workers: int, *, count: int = 0, until: int | None = None) -> None:
        """Send with ``workers`` in parallel: at least ``count`` requests, and until Serve runs
        ``until`` replicas (when given)."""
        nonlocal cursor
        began, stop, sent = time.monotonic(), asyncio.Event(), 0

        async def worker() -> None:
            nonlocal cursor, sent
            while cursor < len(prompts) and not (stop.is_set() and sent >= count):
                index, cursor, sent = cursor, cursor + 1, sent + 1
                await send(index)

        async def watch() -> bool:
            while await running() != until:
                if time.monotonic() - began > timeout_s or cursor >= len(prompts):
                    return False
                await asyncio.sleep(poll_s)
            return True

        tasks = [asyncio.create_task(worker()) for _ in range(workers)]
        reached = True
        if until is not None:
            reached = await watch()
        stop.set()
        await asyncio.gather(*tasks)
        now = await running()
        phases.append(ScalingPhase(name, sent, round(time.monotonic() - began, 1), now, reached))
        missed = "" if reached else " (the autoscaler's step did not come)"
        progress(f"scaling arm: {name}: {sent} requests, {now} replicas running{missed}")

    began = time.perf_counter()
    await phase("steady", concurrency, count=phase_requests, until=replicas)  # idle after deploy: fewer
    await phase("scale-down", 1, until=replicas - 1)
    await phase("scale-up", concurrency, until=replicas)
    await phase("after", concurrency, count=phase_requests)
    wall_s = time.perf_counter() - began
    sent_prompts = prompts[:cursor]
    ordered = sorted(ttfts) or [0.0]
    result = ArmResult(
        arm="zumik-scaling", workload="shared_prefix_long", requests=len(sent_prompts),
        prompt_tokens=sum(len(p) for p in sent_prompts), cached_tokens=cached,
        ideal_cached_tokens=sum(ideal_cached(sent_prompts, block_size)),
        ttft_p50_ms=statistics.median(ordered), ttft_p90_ms=ordered[int(0.9 * (len(ordered) - 1))],
        wall_s=wall_s,
    )  # fmt: skip
    return ScalingRun(result, tuple(phases), tuple(failures))


def running_replicas(app: str, deployment: str) -> Callable[[], Awaitable[int]]:
    """The RUNNING replicas of ``deployment`` as Serve's controller reports them (off the loop)."""

    def count() -> int:
        from ray import serve

        status = serve.status().applications.get(app)
        if status is None or deployment not in status.deployments:
            return 0
        states = status.deployments[deployment].replica_states
        # Typed as ReplicaState (a str enum); the status carries the plain names.
        return sum(
            count for state, count in states.items() if str(getattr(state, "value", state)) == "RUNNING"
        )

    async def running() -> int:
        return await asyncio.to_thread(count)

    return running


def owner_stats(app: str, deployment: str = "SchedulerOwner") -> dict[str, int] | None:
    """The scheduler owner's counts (engine events, how often the send-only belief was wrong),
    or None when the arm has no owner."""
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None or deployment not in status.deployments:
        return None
    stats: dict[str, int] = serve.get_deployment_handle(deployment, app).stats.remote().result(timeout_s=60)
    return stats
