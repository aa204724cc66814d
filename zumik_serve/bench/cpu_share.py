"""Where a benchmark's CPU goes: CPU seconds by serving component over a measured window.

On a machine whose cores the engines share with everything else, a component's CPU is taken
from the engines: a throughput difference between two arms is explained (or not) by what each
component burned meanwhile. ``snapshot`` reads every process's user + system CPU time (psutil);
``delta`` groups the difference between two snapshots by component, named from the process
title Ray, Serve and vLLM give their processes (``component``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# (a marker in the process title or command line, the component), first match wins
COMPONENTS: tuple[tuple[str, str], ...] = (
    ("EngineCore", "vllm engine core"),
    ("ServeReplica:", ""),  # named by its deployment: see ``component``
    ("ProxyActor", "serve proxy"),
    ("ServeController", "serve controller"),
    ("haproxy", "haproxy"),
    ("redis-server", "redis"),
    ("gcs_server", "ray system"),
    ("raylet", "ray system"),
    ("dashboard", "ray system"),
    ("log_monitor", "ray system"),
    ("ray::", ""),  # another actor or task: named by its class
)


def component(title: str) -> str | None:
    """The component a process with this title (its command line joined) belongs to; None for
    a process that is none of the serving stack's."""
    for marker, name in COMPONENTS:
        at = title.find(marker)
        if at < 0:
            continue
        if name:
            return name
        rest = title[at + len(marker) :].split()[0] if title[at + len(marker) :].strip() else "?"
        if marker == "ServeReplica:":  # ServeReplica:<app>:<deployment>
            return "serve replica " + rest.split(":")[-1].split(".")[0]
        return "ray " + rest.split(".")[0].split("(")[0]
    return None


@dataclass(frozen=True)
class Sample:
    """One process as seen: its title, CPU seconds so far, and when it started (what tells a
    process from a later one that got the same pid; its title is no such mark, since Ray sets an
    actor's title to the method it runs)."""

    title: str
    cpu_s: float
    started: float = 0.0


def snapshot() -> dict[int, Sample]:
    """Every process's title and CPU seconds so far (this process's included, as the client)."""
    import psutil

    samples: dict[int, Sample] = {}
    me = os.getpid()
    for process in psutil.process_iter(["cmdline", "name", "create_time"]):
        try:
            title = "bench client" if process.pid == me else " ".join(process.info["cmdline"] or ())
            times = process.cpu_times()
        except psutil.Error:  # exited meanwhile, or not ours to read
            continue
        started = process.info["create_time"] or 0.0
        samples[process.pid] = Sample(title or process.info["name"] or "", times.user + times.system, started)
    return samples


def delta(before: Mapping[int, Sample], after: Mapping[int, Sample]) -> dict[str, float]:
    """CPU seconds each component used between the snapshots, each process named by its title
    now (a process started meanwhile counts from zero; one that ended meanwhile is lost, which
    undercounts short-lived workers)."""
    used: dict[str, float] = {}
    for pid, sample in after.items():
        name = "bench client" if sample.title == "bench client" else component(sample.title)
        if name is None:
            continue
        earlier = before.get(pid)
        start = earlier.cpu_s if earlier is not None and earlier.started == sample.started else 0.0
        used[name] = used.get(name, 0.0) + max(0.0, sample.cpu_s - start)
    return dict(sorted(used.items(), key=lambda item: -item[1]))


def per_request_ms(used: Mapping[str, float], requests: int) -> dict[str, float]:
    """``delta``'s seconds as CPU milliseconds per request."""
    return {name: seconds * 1000 / requests for name, seconds in used.items()} if requests else {}


def table_rows(by_arm: Mapping[str, Mapping[str, float]]) -> list[tuple[str, ...]]:
    """Rows of component, then ms per request for each arm, biggest first, and the total."""
    arms: Sequence[str] = list(by_arm)
    names = sorted({name for used in by_arm.values() for name in used}, key=lambda n: -max(
        by_arm[arm].get(n, 0.0) for arm in arms
    ))  # fmt: skip
    rows = [(name, *(f"{by_arm[arm].get(name, 0.0):.1f}" for arm in arms)) for name in names]
    rows.append(("total", *(f"{sum(by_arm[arm].values()):.1f}" for arm in arms)))
    return rows
