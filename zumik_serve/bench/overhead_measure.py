"""What ``zumik bench overhead`` measures and how: the prompt shapes, the interleaved requests,
and the statistics, differences and goals computed from the answers (no server is started
here; ``bench/overhead.py`` starts the arms)."""

from __future__ import annotations

import random
import socket
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

import httpx


class Shape(StrEnum):
    REPEATED = "repeated"
    SHARED_PREFIX = "shared-prefix"
    UNIQUE = "unique"
    ACCOUNTING = "accounting"  # --accounting only: a long repeated prompt


DEFAULT_SHAPES = (Shape.REPEATED, Shape.SHARED_PREFIX, Shape.UNIQUE)
DEFAULT_ARMS = ("vllm-defaults", "vllm", "vllm-connector", "zumik")
DIRECT_ARMS = ("vllm-defaults", "vllm", "vllm-connector")
ARM_LABELS = {
    "vllm-defaults": "vLLM, its defaults",
    "vllm": "vLLM, Zumik's settings",
    "vllm-connector": "vLLM + KV connector",
    "zumik": "Zumik /v1",
    "zumik-no-accounting": "Zumik, no accounting",
}

# Digits separated by spaces are one token each in byte-level BPE tokenizers (the tiny model's
# among them), so every prompt of a shape has the same number of tokens.
_BODY = (
    "Ticket: the parcel for order 5 arrived late and the box was open. Reply with one word "
    "for the mood of the customer, please."
)
_SYSTEM = (
    "You are the support agent of a small shop. Read each ticket, look up the order, and answer "
    "with the shortest useful reply. Tools: lookup_order(id), refund(id, amount), escalate(team). "
    "Never share another customer's data."
)
ACCOUNTING_PROMPT = "You are a careful assistant. Follow the tools' schemas exactly. " * 40


def parse_selection(arms: Sequence[str], shapes: Sequence[str]) -> tuple[list[str], list[Shape]]:
    """``--arms`` and ``--shapes`` checked: an unknown name is refused, naming the choices; the
    differences need the ``vllm`` arm (Zumik's engine settings without the connector)."""
    known_arms = (*DEFAULT_ARMS, "zumik-no-accounting")
    for arm in arms:
        if arm not in known_arms:
            raise ValueError(f"unknown arm {arm!r}: choose from {', '.join(known_arms)}")
    chosen: list[Shape] = []
    for name in shapes:
        try:
            chosen.append(Shape(name))
        except ValueError:
            known = ", ".join(s.value for s in DEFAULT_SHAPES)
            raise ValueError(f"unknown shape {name!r}: choose from {known}") from None
    if "vllm" not in arms:
        raise ValueError(
            "the differences are taken against vLLM at Zumik's settings: --arms needs the vllm arm"
        )
    return list(arms), chosen


@dataclass(frozen=True)
class Prompts:
    """The prompts of one run: ``run_id`` (6 digits, random per run) keeps blocks stored by an
    earlier run in the disk or Redis tier from turning a new prompt into a restore."""

    run_id: int

    @classmethod
    def fresh(cls) -> Prompts:
        return cls(run_id=random.SystemRandom().randrange(10**6))

    def prompt(self, shape: Shape, arm_index: int, n: int) -> str:
        """The ``n``-th prompt of ``shape`` for arm number ``arm_index`` (0-9)."""
        if not 0 <= arm_index <= 9 or not 0 <= n < 10**6:
            raise ValueError("arm_index must be 0-9 and n below 10**6")
        owner = _spaced(f"{self.run_id:06d}{arm_index}")
        if shape is Shape.REPEATED:
            return f"{owner} {_spaced('0' * 6)} {_BODY}"
        if shape is Shape.UNIQUE:
            return f"{owner} {_spaced(f'{n:06d}')} {_BODY}"
        if shape is Shape.SHARED_PREFIX:
            return f"{owner} {_SYSTEM} {_spaced(f'{n:06d}')} {_BODY}"
        return f"{owner} {ACCOUNTING_PROMPT}"


def _spaced(digits: str) -> str:
    return " ".join(digits)


@dataclass(frozen=True)
class ArmStats:
    name: str
    n: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float


@dataclass(frozen=True)
class Delta:
    """``minuend`` minus ``subtrahend`` on one shape (ms): pooled p50 and p99 differences, and
    the median and IQR over rounds of the per-round p50 differences."""

    minuend: str
    subtrahend: str
    what: str
    p50_ms: float
    p99_ms: float
    round_median_ms: float
    round_iqr_ms: tuple[float, float]
    per_round_ms: list[float]


# (minuend, subtrahend, what it measures); computed where both arms ran.
DELTAS = (
    ("zumik", "vllm", "Zumik over vLLM at the same engine settings (goal: p50 <= 1 ms, p99 <= 3 ms)"),
    ("vllm-connector", "vllm", "the KV connector, nothing to restore (goal: p50 <= 0.3 ms)"),
    ("zumik", "vllm-connector", "the gateway and ingress, connector in both"),
    ("zumik", "vllm-defaults", "Zumik over vLLM at vLLM's defaults"),
    ("vllm", "vllm-defaults", "Zumik's engine settings over vLLM's defaults"),
    ("zumik", "zumik-no-accounting", "the reuse accounting"),
)
GOALS = {("zumik", "vllm"): (1.0, 3.0), ("vllm-connector", "vllm"): (0.3, None)}


@dataclass(frozen=True)
class OverheadResult:
    rounds: int
    requests_per_round: int
    arms: list[str]
    shapes: list[str]
    stats: dict[str, dict[str, ArmStats]]  # shape → arm → latency statistics
    deltas: dict[str, dict[str, Delta]]  # shape → "minuend-subtrahend" → difference
    prompt_tokens: dict[str, dict[str, float]]  # shape → arm → mean usage.prompt_tokens
    cached_tokens: dict[str, dict[str, float | None]]  # shape → arm → mean cached (None: not given)
    server_timing_ms: dict[str, dict[str, float]]  # shape → Zumik phase → median ms
    per_round_p50_ms: dict[str, dict[str, list[float]]]  # shape → arm → p50 of each round
    samples_ms: dict[str, dict[str, list[float]]]  # shape → arm → every latency
    context: dict[str, Any] = field(default_factory=dict)  # tree, niceness, profile: set by the CLI

    def goals(self) -> dict[str, dict[str, bool]]:
        """Per shape, whether each goal of issue #15 was met in this run."""
        met: dict[str, dict[str, bool]] = {}
        for shape, deltas in self.deltas.items():
            for (minuend, subtrahend), (p50_goal, p99_goal) in GOALS.items():
                delta = deltas.get(f"{minuend}-{subtrahend}")
                if delta is None:
                    continue
                met.setdefault(shape, {})[f"{minuend}-{subtrahend} p50 <= {p50_goal} ms"] = (
                    delta.p50_ms <= p50_goal
                )
                if p99_goal is not None:
                    met[shape][f"{minuend}-{subtrahend} p99 <= {p99_goal} ms"] = delta.p99_ms <= p99_goal
        return met

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("samples_ms")
        data["goals"] = self.goals()
        return data


def nodelay_client(base_url: str, headers: dict[str, str]) -> httpx.Client:
    transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    return httpx.Client(base_url=base_url, headers=headers, transport=transport, timeout=120.0)


@dataclass
class _Answer:
    latency_ms: float
    prompt_tokens: int
    cached_tokens: int | None
    phases_ms: dict[str, float]


def measure(
    arms: dict[str, tuple[str, dict[str, str]]],
    *,
    model: str,
    rounds: int,
    requests: int,
    warmup: int,
    shapes: Sequence[Shape] = DEFAULT_SHAPES,
    prompts: Prompts | None = None,
    on_progress: Callable[[int], None] | None = None,
    seed: int = 0,
) -> OverheadResult:
    """Interleaved rounds over ``arms`` (name → (base URL, headers)): per round, per shape,
    ``requests`` request indexes, each sent to every arm in a shuffled order."""
    prompts = prompts or Prompts.fresh()
    clients = {name: nodelay_client(url, headers) for name, (url, headers) in arms.items()}
    arm_index = {name: index for index, name in enumerate(arms)}
    rng = random.Random(seed)
    answers: dict[str, dict[str, list[_Answer]]] = {s.value: {a: [] for a in arms} for s in shapes}
    per_round: dict[str, dict[str, list[float]]] = {s.value: {a: [] for a in arms} for s in shapes}
    counter = 0  # one prompt number per request index, shared by the arms (each its own prompt)

    def body(shape: Shape, arm: str, n: int) -> dict[str, Any]:
        prompt = prompts.prompt(shape, arm_index[arm], n)
        return {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0}

    try:
        for shape in shapes:  # warm-up: connections, the engines' first steps, the repeated prompt
            for _ in range(warmup):
                counter += 1
                for name, client in clients.items():
                    _post(client, body(shape, name, counter))
        for _ in range(rounds):
            for shape in shapes:
                latest: dict[str, list[float]] = {name: [] for name in arms}
                for _ in range(requests):
                    counter += 1
                    order = list(arms)
                    rng.shuffle(order)
                    for name in order:
                        answer = _post(clients[name], body(shape, name, counter))
                        answers[shape.value][name].append(answer)
                        latest[name].append(answer.latency_ms)
                    if on_progress is not None:
                        on_progress(len(order))
                for name, values in latest.items():
                    per_round[shape.value][name].append(statistics.median(values))
    finally:
        for client in clients.values():
            client.close()
    return _result(answers, per_round, rounds=rounds, requests=requests, arms=list(arms), shapes=shapes)


def _result(
    answers: dict[str, dict[str, list[_Answer]]],
    per_round: dict[str, dict[str, list[float]]],
    *,
    rounds: int,
    requests: int,
    arms: list[str],
    shapes: Sequence[Shape],
) -> OverheadResult:
    stats: dict[str, dict[str, ArmStats]] = {}
    deltas: dict[str, dict[str, Delta]] = {}
    prompt_tokens: dict[str, dict[str, float]] = {}
    cached: dict[str, dict[str, float | None]] = {}
    timing: dict[str, dict[str, float]] = {}
    samples: dict[str, dict[str, list[float]]] = {}
    for shape, by_arm in answers.items():
        samples[shape] = {arm: [a.latency_ms for a in got] for arm, got in by_arm.items()}
        stats[shape] = {arm: _stats(arm, values) for arm, values in samples[shape].items()}
        prompt_tokens[shape] = {
            arm: statistics.fmean(a.prompt_tokens for a in got) for arm, got in by_arm.items()
        }
        cached[shape] = {}
        for arm, got in by_arm.items():
            counts = [a.cached_tokens for a in got if a.cached_tokens is not None]
            cached[shape][arm] = statistics.fmean(counts) if len(counts) == len(got) else None
        phases: dict[str, list[float]] = {}
        for answer in by_arm.get("zumik", []):
            for phase, ms in answer.phases_ms.items():
                phases.setdefault(phase, []).append(ms)
        timing[shape] = {phase: round(statistics.median(values), 3) for phase, values in phases.items()}
        deltas[shape] = {}
        for minuend, subtrahend, what in DELTAS:
            if minuend in by_arm and subtrahend in by_arm:
                deltas[shape][f"{minuend}-{subtrahend}"] = _delta(
                    minuend, subtrahend, what, stats[shape], per_round[shape]
                )
    return OverheadResult(
        rounds=rounds, requests_per_round=requests, arms=arms, shapes=[s.value for s in shapes],
        stats=stats, deltas=deltas, prompt_tokens=prompt_tokens, cached_tokens=cached,
        server_timing_ms=timing, per_round_p50_ms=per_round, samples_ms=samples,
    )  # fmt: skip


def _delta(
    minuend: str, subtrahend: str, what: str, stats: dict[str, ArmStats], per_round: dict[str, list[float]]
) -> Delta:
    rounds = [a - b for a, b in zip(per_round[minuend], per_round[subtrahend], strict=True)]
    quartiles = statistics.quantiles(rounds, n=4) if len(rounds) >= 2 else [rounds[0]] * 3
    return Delta(
        minuend=minuend, subtrahend=subtrahend, what=what,
        p50_ms=round(stats[minuend].p50_ms - stats[subtrahend].p50_ms, 3),
        p99_ms=round(stats[minuend].p99_ms - stats[subtrahend].p99_ms, 3),
        round_median_ms=round(statistics.median(rounds), 3),
        round_iqr_ms=(round(quartiles[0], 3), round(quartiles[2], 3)),
        per_round_ms=[round(value, 3) for value in rounds],
    )  # fmt: skip


def accounting_summary(result: OverheadResult) -> dict[str, Any]:
    """The reuse accounting's cost: per round, (Zumik with accounting) - (Zumik without), and its
    share of the gateway's added latency (Zumik with accounting - vLLM at the same settings).
    When that added latency's median is not positive (a short, noisy run where Zumik's arm came
    out ahead), the share and its goal are undefined: None (JSON null), never NaN, which strict
    JSON readers refuse and which equals nothing, itself included."""
    per_round = result.per_round_p50_ms[Shape.ACCOUNTING.value]
    on, off, direct = (per_round[name] for name in ("zumik", "zumik-no-accounting", "vllm"))
    cost = [a - b for a, b in zip(on, off, strict=True)]
    added = [a - d for a, d in zip(on, direct, strict=True)]
    share = statistics.median(cost) / statistics.median(added) if statistics.median(added) > 0 else None
    return {
        "accounting_cost_round_median_ms": round(statistics.median(cost), 3),
        "accounting_cost_per_round_ms": [round(value, 3) for value in cost],
        "gateway_added_round_median_ms": round(statistics.median(added), 3),
        "accounting_share_of_added": round(share, 4) if share is not None else None,
        "goal_under_5_percent": share < 0.05 if share is not None else None,
    }


def parse_server_timing(value: str) -> dict[str, float]:
    """``name;dur=1.23;desc="..."`` entries → {name: ms}; entries without a duration are left out."""
    phases: dict[str, float] = {}
    for entry in value.split(","):
        name, _, params = entry.strip().partition(";")
        for param in params.split(";"):
            key, _, number = param.strip().partition("=")
            if key == "dur" and name:
                try:
                    phases[name] = float(number)
                except ValueError:
                    continue
    return phases


def _post(client: httpx.Client, body: dict[str, Any]) -> _Answer:
    t0 = time.perf_counter()
    response = client.post("/v1/completions", json=body)
    elapsed_ms = (time.perf_counter() - t0) * 1000.0
    if response.status_code != 200:
        raise RuntimeError(f"{client.base_url} answered {response.status_code}: {response.text[:200]}")
    usage = response.json().get("usage") or {}
    details = usage.get("prompt_tokens_details") or {}
    return _Answer(
        latency_ms=elapsed_ms,
        prompt_tokens=int(usage.get("prompt_tokens", 0)),
        cached_tokens=details.get("cached_tokens"),
        phases_ms=parse_server_timing(response.headers.get("server-timing", "")),
    )


def _stats(name: str, values: list[float]) -> ArmStats:
    ordered = sorted(values)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, round(p * (len(ordered) - 1)))]

    return ArmStats(
        name=name, n=len(values), p50_ms=round(pct(0.5), 3), p90_ms=round(pct(0.9), 3),
        p99_ms=round(pct(0.99), 3), mean_ms=round(statistics.fmean(values), 3),
    )  # fmt: skip
