"""``zumik bench routing``: how much reuse each way of choosing a replica captures.

A group of vLLM CPU replicas of the tiny model (``--replicas``, default 3) behind ``--gateways``
gateway replicas (default 2, one scheduler owner), each replica with a small KV cache
(``--kv-mib``, default 32 MiB: 256 blocks of 32 tokens), so one replica cannot hold a
workload's whole working set. Arms (``--arms``), one after another on the same request
sequences, each on freshly started engines:

    rr-nocache     Ray Serve's own balancing, prefix caching off   (the floor)
    rr-cache       Ray Serve's own balancing, prefix caching on    (what a plain deployment gets)
    zumik          Zumik's scheduler: prefix residency and load    (``routing.replica_choice``)
    zumik-scaling  Zumik's scheduler while Serve's autoscaler removes a replica and adds one
                   (``bench/routing_scaling.py``)
    zumik-text-chat  Zumik's scheduler with text keys for chat prompts (``--api chat``:
                   ``bench/routing_chat.py``)

Workloads (token-id prompts on ``/v1/completions``, so that sharing is exact and the ideal is
computable from the workload itself; ``--seed`` makes them identical across runs; with
``--api chat`` each as conversations on ``/v1/chat/completions``, ``bench/routing_chat.py``):

    no_reuse        unique prompts (the control: throughput must not drop)
    shared_prefix   groups sharing a long prefix, interleaved across groups
    agent_sessions  12 sessions that resend a shared tools block + their growing history
    mooncake        a rescaled slice of the Mooncake conversation trace: each of its hash ids
                    (a 512-token block there) becomes one block of ``block_size`` tokens here;
                    read from ``../shared/data/mooncake`` and skipped, saying so, when absent

With zumik and its baseline among the arms (``side_by_side_pair``: ``zumik-text-chat`` with
``--api chat`` when it is given, else ``rr-cache``), the workloads again with the two side by
side (``_run_side_by_side``): both profiles deployed together on fresh engines and sent the same
requests at once, closed loop, and with ``--open-loop-load`` (completions only, baseline
rr-cache) fresh prompts of the reuse workloads open loop (Poisson arrivals), so that both arms
meet the same load from the rest of the machine. In every loop a session's turn waits for its
previous turn's answer (``previous_turns``).

Per arm and workload: token-weighted hit ratio (cached / prompt tokens), capture efficiency
(hit ratio over the ideal one: every block-aligned prefix seen before is a hit, unlimited
cache), the share of the pooled ideal (one LRU cache of the group's whole KV), prefill tokens
computed, TTFT p50/p90, throughput and, for an arm whose scheduler owner checks the gateways'
record of sends against the engines' events, how many checks and how many found it wrong.
Separately, the scheduler's decision time (prefix keys + ``decide``) by prompt length,
in-process.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from profiles import Profile, load_builtin
from zumik_serve.api.headers import PROFILE as PROFILE_HEADER
from zumik_serve.bench import cpu_share
from zumik_serve.bench.routing_chat import (
    TEXT_CHAT_ARM,
    TEXT_CHAT_VLLM_ARGS,
    Messages,
    chat_workloads,
    stream_chat,
    stream_first_chunk,
)
from zumik_serve.bench.routing_cluster import (
    cluster_figures,
    owners_table,
    run_cluster_only,
    time_decisions,
    timer_requests,
    timing_table,
    token_decision_times_us,
    with_context,
)

if TYPE_CHECKING:
    from zumik_serve.bench.routing_scaling import ScalingRun

ARMS = ("rr-nocache", "rr-cache", "zumik", "zumik-scaling", TEXT_CHAT_ARM)
WORKLOADS = ("no_reuse", "shared_prefix", "agent_sessions", "mooncake")
VOCAB = (10, 1000)  # token ids drawn from here: plain tokens of the tiny model
DECISION_LENGTHS = (1024, 2048, 4096, 8192)
# The bench's engines take 2,048 tokens (``local-cpu-2x``'s max_model_len); a session's prompt
# stays below, with room for the answer.
SESSION_MAX_PROMPT_TOKENS = 2000
CHAT_SESSION_MAX_PROMPT_TOKENS = 1400  # --api chat: its conversations' ids stay below 2,048
BENCH_MAX_QUEUED = 100_000  # the standard class's queue in each arm's gateways: never full
BENCH_QUEUE_TIMEOUT_S = 600.0  # the longest a profile allows
AGENT_SESSIONS = 12  # agent_sessions' working set: more than a replica's KV, less than the group's
# An open-loop arm that answered below this share of the rate it was offered is saturated: one
# that keeps up ends within its last requests' latency of the last arrival (about 0.95 of the
# offered rate on the bench's runs of 15-20 s), one that cannot ends at its own, lower rate.
SATURATED_BELOW = 0.9


@dataclass(frozen=True)
class ArmResult:
    arm: str
    workload: str
    requests: int
    prompt_tokens: int
    cached_tokens: int
    ideal_cached_tokens: int
    ttft_p50_ms: float
    ttft_p90_ms: float
    wall_s: float
    pooled_ideal_tokens: int | None = None  # one LRU cache of the group's whole KV (``pooled_ideal``)
    # "closed": ``concurrency`` clients back to back; "open": Poisson arrivals at ``rate_per_s``
    arrival: str = "closed"
    rate_per_s: float | None = None
    # open loop: turns sent after their arrival time because their previous turn had not answered
    held_turns: int = 0
    side_by_side: bool = False  # measured at the same time as the other arm (``_run_side_by_side``)
    # the owner's checks of the gateways' record of sends against the engines' events during
    # this workload, and how many found the record wrong; None: the arm has no owner
    belief_checked: int | None = None
    belief_wrong: int | None = None
    # open loop: the load offered to the machine, as a multiple of the request rate Serve's
    # balancing sustained alone in closed loop (``--open-loop-load``; half of it to each arm)
    load: float | None = None

    @property
    def achieved_per_s(self) -> float:
        """Requests answered per second over the arm's whole run."""
        return self.requests / self.wall_s if self.wall_s else 0.0

    @property
    def saturated(self) -> bool | None:
        """Open loop: the group fell behind the load it was offered (it answered at a rate below
        ``SATURATED_BELOW`` of the offered one, so its backlog grew while requests arrived);
        None in a closed loop, which has no offered rate."""
        if self.arrival != "open" or not self.rate_per_s:
            return None
        return self.achieved_per_s < SATURATED_BELOW * self.rate_per_s

    @property
    def pooled_capture(self) -> float | None:
        """Cached tokens over what one cache of the whole group's capacity would hit: how close
        the routing comes to a perfect partition of the KV it has."""
        return self.cached_tokens / self.pooled_ideal_tokens if self.pooled_ideal_tokens else None

    @property
    def hit_ratio(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def ideal_ratio(self) -> float:
        return self.ideal_cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def capture_efficiency(self) -> float | None:
        return self.hit_ratio / self.ideal_ratio if self.ideal_ratio else None

    @property
    def prefill_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens

    @property
    def tokens_per_s(self) -> float:
        return self.prompt_tokens / self.wall_s if self.wall_s else 0.0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            hit_ratio=self.hit_ratio, ideal_ratio=self.ideal_ratio,
            capture_efficiency=self.capture_efficiency, prefill_tokens=self.prefill_tokens,
            pooled_capture=self.pooled_capture,
            tokens_per_s=self.tokens_per_s, achieved_per_s=self.achieved_per_s, saturated=self.saturated,
        )  # fmt: skip
        return data


# --- workloads ---------------------------------------------------------------------------------


def _tokens(rng: random.Random, count: int) -> list[int]:
    return [rng.randrange(*VOCAB) for _ in range(count)]


def no_reuse(rng: random.Random, scale: int) -> list[list[int]]:
    return [_tokens(rng, 600) for _ in range(4 * scale)]


def shared_prefix(rng: random.Random, scale: int) -> list[list[int]]:
    groups = [_tokens(rng, 1400) for _ in range(8)]  # 8 x 1400 tokens: more than one replica holds
    return [groups[i % len(groups)] + _tokens(rng, 40) for i in range(4 * scale)]


def agent_sessions(
    rng: random.Random, scale: int, *, max_prompt_tokens: int = SESSION_MAX_PROMPT_TOKENS
) -> list[list[int]]:
    """``AGENT_SESSIONS`` sessions taking turns, each resending the shared tools block and its
    history plus 60 new tokens. Their histories together (about 1,300 tokens a session) are
    more than one replica's KV holds (8,192 tokens at the default ``--kv-mib``) and less than
    the group's, like ``shared_prefix``'s groups: a replica that serves every session evicts.
    A session whose next turn would pass ``max_prompt_tokens`` starts over (the same tools, a
    new history), as an agent starts a new session when its context is full: at any ``scale``
    every prompt fits the engine's context."""
    tools = _tokens(rng, 500)
    histories = [tools + _tokens(rng, 300) for _ in range(AGENT_SESSIONS)]
    prompts = []
    for turn in range(4 * scale):
        session = turn % len(histories)
        if len(histories[session]) + 60 > max_prompt_tokens:
            histories[session] = tools + _tokens(rng, 300)
        histories[session] = histories[session] + _tokens(rng, 60)
        prompts.append(list(histories[session]))
    return prompts


def mooncake(
    rng: random.Random, count: int, *, block_size: int, trace: Path | None
) -> list[list[int]] | None:
    if trace is None or not trace.is_file():
        return None
    blocks: dict[int, list[int]] = {}
    prompts = []
    with trace.open() as lines:
        for line in lines:
            hash_ids = json.loads(line)["hash_ids"][:40]  # at most 40 blocks: within max_model_len
            for hash_id in hash_ids:
                blocks.setdefault(hash_id, _tokens(rng, block_size))
            prompts.append([token for hash_id in hash_ids for token in blocks[hash_id]] + _tokens(rng, 8))
            if len(prompts) >= count:
                break
    return prompts


def previous_turns(prompts: list[list[int]]) -> list[int | None]:
    """Per request, the earlier request it continues (the latest one that is a proper prefix of
    it: a session's previous turn), or None. A turn is sent only once that one has answered, as
    an agent sends its next turn only with the last answer in hand; ``agent_sessions``' turns
    have one, ``shared_prefix``'s and the Mooncake slice's requests (each ends with its own
    tokens) have none."""
    index_of: dict[tuple[int, ...], int] = {}
    lengths: set[int] = set()
    result: list[int | None] = []
    for index, prompt in enumerate(prompts):
        earlier = [index_of.get(tuple(prompt[:length])) for length in lengths if length < len(prompt)]
        result.append(max((i for i in earlier if i is not None), default=None))
        index_of[tuple(prompt)] = index
        lengths.add(len(prompt))
    return result


def ideal_cached(prompts: list[list[int]], block_size: int) -> list[int]:
    """Per request, the tokens an unlimited cache would serve: the longest whole-block prefix
    some earlier request shares (never the last token, which the engine always computes)."""
    seen: set[tuple[int, ...]] = set()
    result = []
    for prompt in prompts:
        loadable = (len(prompt) - 1) // block_size
        hit = 0
        while hit < loadable and tuple(prompt[: (hit + 1) * block_size]) in seen:
            hit += 1
        result.append(hit * block_size)
        for blocks in range(1, len(prompt) // block_size + 1):
            seen.add(tuple(prompt[: blocks * block_size]))
    return result


def pooled_ideal(prompts: list[list[int]], block_size: int, capacity_blocks: int) -> list[int]:
    """Per request, the tokens one LRU cache of ``capacity_blocks`` blocks (a group's replicas'
    KV pooled) would serve, prompts in order: the longest whole-block prefix it still holds
    (never the last token), then every full block of the prompt touched, the prefix's first
    block most recent last. The unlimited ``ideal_cached`` is out of reach when the working set
    is larger than the group's KV (the Mooncake slice: mostly blocks seen once, long ago)."""
    from collections import OrderedDict

    cache: OrderedDict[tuple[int, ...], None] = OrderedDict()
    result = []
    for prompt in prompts:
        loadable = (len(prompt) - 1) // block_size
        keys = [tuple(prompt[: (b + 1) * block_size]) for b in range(len(prompt) // block_size)]
        hit = 0
        while hit < loadable and keys[hit] in cache:
            hit += 1
        result.append(hit * block_size)
        for key in reversed(keys):  # the tail goes first when space runs out, as in vLLM
            cache[key] = None
            cache.move_to_end(key)
        while len(cache) > capacity_blocks:
            cache.popitem(last=False)
    return result


def kv_block_bytes(model_dir: Path, block_size: int, dtype_bytes: int = 2) -> int:
    """One KV block's bytes across layers (K and V) for the model in ``model_dir`` (bf16)."""
    config = json.loads((model_dir / "config.json").read_text())
    heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return int(config["num_hidden_layers"]) * 2 * int(heads) * int(head_dim) * block_size * dtype_bytes


def chat_sized(workloads: dict[str, list[list[int]]], seed: int, scale: int) -> dict[str, list[list[int]]]:
    """``workloads`` for ``--api chat``: sessions that start over earlier, as their conversations
    take about a third more tokens than their ids (decoded and tokenized again, and each turn's
    role tokens) and must stay within the engine's context."""
    if "agent_sessions" not in workloads:
        return workloads
    sessions = agent_sessions(
        random.Random(seed + 2), scale, max_prompt_tokens=CHAT_SESSION_MAX_PROMPT_TOKENS
    )
    return {**workloads, "agent_sessions": sessions}


def make_workloads(
    seed: int, scale: int, block_size: int, trace: Path | None, *, mooncake_requests: int | None = None
) -> dict[str, list[list[int]]]:
    """The workloads of 4 x ``scale`` requests each (the Mooncake slice: ``mooncake_requests``,
    else 4 x ``scale`` too)."""
    workloads: dict[str, list[list[int]]] = {
        "no_reuse": no_reuse(random.Random(seed), scale),
        "shared_prefix": shared_prefix(random.Random(seed + 1), scale),
        "agent_sessions": agent_sessions(random.Random(seed + 2), scale),
    }
    count = mooncake_requests if mooncake_requests is not None else 4 * scale
    traced = mooncake(random.Random(seed + 3), count, block_size=block_size, trace=trace)
    if traced is not None:
        workloads["mooncake"] = traced
    return workloads


# --- arms --------------------------------------------------------------------------------------


def arm_profile(
    arm: str, *, replicas: int = 2, gateways: int = 1, kv_bytes: int | None = None,
    model_source: str | None = None,
) -> Profile:  # fmt: skip
    """``local-cpu-2x`` with only its BYOC route, as each arm runs it: ``replicas`` engine
    replicas (``zumik-scaling``: Serve autoscaling between ``replicas - 1`` and ``replicas``,
    starting at ``replicas``), ``gateways`` gateway replicas, ``kv_bytes`` of KV per replica,
    the model ``model_source`` (default: the profile's, ``builtin:tiny``; the served name stays,
    so the workloads' requests are unchanged)."""
    base = load_builtin("local-cpu-2x")
    data = base.model_dump(mode="json")
    if model_source is not None:
        data["model"]["source"] = model_source
    data["routes"] = [route for route in data["routes"] if route["kind"] == "byoc"]
    data["routing"] = {**data["routing"], "default_route": "local", "fallback_order": ["local"],
                       "replica_choice": "scheduler" if arm.startswith("zumik") else "serve"}  # fmt: skip
    data["engine"]["enable_prefix_caching"] = arm != "rr-nocache"
    data["engine"]["num_replicas"] = replicas
    if kv_bytes is not None:
        data["engine"]["kv_cache_memory_bytes"] = kv_bytes
    if arm == TEXT_CHAT_ARM:  # chat prompts keep text keys (bench/routing_chat.py)
        data["engine"]["vllm_args"] = {**(data["engine"].get("vllm_args") or {}), **TEXT_CHAT_VLLM_ARGS}
    if arm == "zumik-scaling":
        data["engine"]["autoscaling"] = {
            "min_replicas": max(1, replicas - 1), "max_replicas": replicas, "initial_replicas": replicas,
            "target_ongoing_requests": SCALING_TARGET, **SCALING_DELAYS,
        }  # fmt: skip
    data["gateway"]["num_replicas"] = gateways
    # An open loop past what the group sustains queues without bound: the requests wait in the
    # gateway for as long as it takes (TTFT measures the wait) instead of a 429 at the class's
    # share, which would end the run. The running slots, what the engines see at once, stay.
    data["qos"]["classes"]["standard"].update(max_queued=BENCH_MAX_QUEUED, max_per_tenant=None)
    data["qos"]["queue_timeout_s"] = BENCH_QUEUE_TIMEOUT_S
    data["name"] = f"bench-routing-{arm}"
    return Profile.model_validate(data)


# The scaling arm: one ongoing request per replica is Serve's target, so one request at a time
# asks for one replica (the minimum holds) and the arm's concurrency asks for more than there are,
# with no ambiguous load in between (a target near the load makes Serve flap: it stopped each
# starting replica when the load dipped). Short windows so that the run sees both within
# minutes; Serve wants the window above its 10 s metrics push. A production profile keeps
# Serve's slow downscale.
SCALING_TARGET = 1.0
SCALING_DELAYS = {"upscale_delay_s": 2.0, "downscale_delay_s": 20.0, "look_back_period_s": 12.0}


async def stream_completion(
    client: httpx.AsyncClient, model: str, prompt: list[int], *, what: str, max_tokens: int = 2
) -> tuple[float, int]:
    """One streamed ``/v1/completions`` of token ids: time to the first chunk with a choice (ms)
    and ``cached_tokens`` from the usage chunk."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens}
    return await stream_first_chunk(client, "/v1/completions", body, what=what)


def open_loop_loads(spec: str | float | None) -> list[float]:
    """``--open-loop-load``: one multiple of Serve's closed-loop rate or several, comma-separated
    (a sweep), in increasing order; none (empty, or 0) turns the open loop off."""
    if spec is None or isinstance(spec, (int, float)):
        return [float(spec)] if spec else []
    try:
        loads = sorted({float(part) for part in spec.split(",") if part.strip()})
    except ValueError:
        raise SystemExit(
            f"--open-loop-load takes numbers, comma-separated (e.g. 1.2,1.6,2.4), not {spec!r}"
        ) from None
    if any(load < 0 for load in loads):
        raise SystemExit(f"--open-loop-load: a load is a positive multiple, not {spec!r}")
    return [load for load in loads if load > 0]


def arrival_offsets(rate_per_s: float, count: int, seed: int) -> list[float]:
    """Seconds from the start at which an open-loop client sends each of ``count`` requests: a
    Poisson process of ``rate_per_s`` (exponential gaps), the same for every arm given ``seed``."""
    rng = random.Random(seed)
    offsets, at = [], 0.0
    for _ in range(count):
        offsets.append(at)
        at += rng.expovariate(rate_per_s)
    return offsets


async def measure_arm(
    url: str, api_key: str, model: str, arm: str, workload: str, prompts: list[list[int]], *,
    block_size: int, concurrency: int, on_request: Callable[[], None] = lambda: None,
    capacity_blocks: int | None = None, arrivals: list[float] | None = None,
    profile: str | None = None, transport: httpx.AsyncBaseTransport | None = None,
    side_by_side: bool = False, chats: list[Messages] | None = None,
) -> ArmResult:  # fmt: skip
    """One arm on one workload; ``capacity_blocks``: the group's KV in blocks, for the pooled
    ideal (``pooled_ideal``). Closed loop by default: ``concurrency`` clients, each sending its
    next request when the last one is done. With ``arrivals`` (``arrival_offsets``), open loop:
    each request is sent at its time whatever is still running, as independent users do, so a
    group slower than the offered load queues and its TTFT shows it. Either way a session's turn
    (``previous_turns``) is sent only once its previous turn has answered, and TTFT counts from
    its send. ``profile``: the ``x-zumik-profile`` to ask for (None: the stack's first);
    ``transport``: httpx's, for tests; ``side_by_side``: noted in the result; ``chats``: each
    request sent as this conversation on ``/v1/chat/completions`` (``prompts``: the token ids
    the engine builds from it, ``bench/routing_chat.py``)."""
    ttfts: list[float] = []
    cached: list[int] = [0] * len(prompts)
    after = previous_turns(prompts)
    answered = [asyncio.Event() for _ in prompts]
    held = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(len(prompts)):
        queue.put_nowait(index)
    headers = {"Authorization": f"Bearer {api_key}"}
    if profile is not None:
        headers[PROFILE_HEADER] = profile
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)

    async with httpx.AsyncClient(
        base_url=url, headers=headers, timeout=300, limits=limits, transport=transport
    ) as client:

        async def send(index: int) -> None:
            previous = after[index]
            if previous is not None:
                await answered[previous].wait()
            if chats is not None:
                ttft_ms, cached[index] = await stream_chat(
                    client, model, chats[index], what=f"{arm}/{workload}"
                )
            else:
                ttft_ms, cached[index] = await stream_completion(
                    client, model, prompts[index], what=f"{arm}/{workload}"
                )
            answered[index].set()
            ttfts.append(ttft_ms)
            on_request()

        async def worker() -> None:
            while not queue.empty():
                await send(queue.get_nowait())

        async def arrive(index: int, at_s: float) -> None:
            nonlocal held
            await asyncio.sleep(max(0.0, began + at_s - time.perf_counter()))
            previous = after[index]
            held += previous is not None and not answered[previous].is_set()
            await send(index)

        began = time.perf_counter()
        if arrivals is None:
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        else:
            await asyncio.gather(*(arrive(index, at) for index, at in enumerate(arrivals)))
        wall_s = time.perf_counter() - began
    ordered = sorted(ttfts)
    return ArmResult(
        arm=arm, workload=workload, requests=len(prompts), prompt_tokens=sum(len(p) for p in prompts),
        cached_tokens=sum(cached), ideal_cached_tokens=sum(ideal_cached(prompts, block_size)),
        ttft_p50_ms=statistics.median(ordered), ttft_p90_ms=ordered[int(0.9 * (len(ordered) - 1))],
        wall_s=wall_s,
        pooled_ideal_tokens=(
            sum(pooled_ideal(prompts, block_size, capacity_blocks)) if capacity_blocks else None
        ),
        arrival="closed" if arrivals is None else "open",
        rate_per_s=None if arrivals is None else (len(arrivals) - 1) / arrivals[-1] if arrivals[-1] else None,
        held_turns=held, side_by_side=side_by_side,
    )  # fmt: skip


def decision_times_us(profile: Profile, *, samples: int = 200) -> dict[int, dict[str, float]]:
    """Time of one scheduling decision (prefix keys of the text prompt + ``decide``), by length:
    a prompt's first request (``p50``, ``p99``) and an agent's next turn (``turn_p50``,
    ``turn_p99``), as ``time_decisions`` defines them."""
    from zumik_serve.routing.scheduler import CHARS_PER_TOKEN, ProfileScheduler

    scheduler = ProfileScheduler(
        with_context(profile, max(DECISION_LENGTHS)), replicas={"local": ["r0", "r1"]}
    )
    rng = random.Random(7)
    result: dict[int, dict[str, float]] = {}
    for length in DECISION_LENGTHS:
        text = "".join(rng.choice("abcdefghij ") for _ in range(length * CHARS_PER_TOKEN))
        result[length] = time_decisions(scheduler, *timer_requests(text), samples=samples)
    return result


def shared_trace() -> Path | None:
    """The Mooncake conversation trace in the project's reference data (``../shared`` beside the
    checkout, or ``$ZUMIK_SHARED_DIR``); a user's clone has none, and the workload is skipped."""
    import os

    roots = [os.environ.get("ZUMIK_SHARED_DIR"), str(Path(__file__).resolve().parents[3] / "shared")]
    for root in roots:
        if root and (Path(root) / "data" / "mooncake" / "conversation_trace.jsonl").is_file():
            return Path(root) / "data" / "mooncake" / "conversation_trace.jsonl"
    return None


def run_routing_bench(args: Any, console: Any) -> int:
    import os

    from rich.progress import Progress
    from rich.table import Table

    from zumik_serve.app.application import APP_NAME
    from zumik_serve.app.stack import LocalStack, StackConfig
    from zumik_serve.bench.escalation import print_escalation, run_escalation
    from zumik_serve.bench.routing_scaling import owner_stats
    from zumik_serve.home import ZumikHome
    from zumik_serve.model.resolve import resolve_model_dir
    from zumik_serve.store.local_redis import free_port

    if getattr(args, "cluster_only", False):  # in process: bench/routing_cluster.py
        return run_cluster_only(args, console)
    # The escalation arm's in-process requests would each print a line once vLLM's import has
    # set up logging (the stack does the same once Ray is up).
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # The escalation arm (bench/escalation.py) runs in process first: managed, BYOC, Zumik's choice.
    escalation = run_escalation(requests=getattr(args, "escalation_requests", 120), seed=args.seed)
    if getattr(args, "escalation_only", False):
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "escalation.json").write_text(json.dumps(escalation, indent=2))
        print(json.dumps(escalation, indent=2)) if args.json else print_escalation(escalation, console)
        return 0 if escalation["within_5_percent"] else 1
    block_size = load_builtin("local-cpu-2x").engine.block_size
    trace = shared_trace()
    if trace is None:
        console.log("mooncake workload skipped: ../shared/data/mooncake is not beside this checkout")
    workloads = make_workloads(
        args.seed, args.scale, block_size, trace, mooncake_requests=args.mooncake_requests
    )
    chosen = [name for name in getattr(args, "workloads", ",".join(WORKLOADS)).split(",") if name]
    if set(chosen) - set(WORKLOADS):
        raise SystemExit(f"unknown workload(s) {', '.join(sorted(set(chosen) - set(WORKLOADS)))}: "
                         f"choose among {', '.join(WORKLOADS)}")  # fmt: skip
    workloads = {name: prompts for name, prompts in workloads.items() if name in chosen}
    # Open loop: fresh prompts of the same shapes, sent to rr-cache and zumik side by side
    # (``_run_side_by_side``) at each load of ``--open-loop-load`` x the request rate Serve's
    # balancing sustained on them in closed loop, shared by the two arms; each load its own
    # prompts, so that no load hits the blocks an earlier one left.
    open_loads = open_loop_loads(getattr(args, "open_loop_load", None))
    open_workloads = {
        load: {
            name: prompts
            for name, prompts in make_workloads(
                args.seed + 1000 + 100 * index, args.scale, block_size, trace,
                mooncake_requests=args.mooncake_requests,
            ).items()
            if name in workloads and name != "no_reuse"
        }
        for index, load in enumerate(open_loads)
    }  # fmt: skip
    serve_rates: dict[str, float] = {}
    cpu_ms: dict[str, dict[str, dict[str, float]]] = {}  # workload -> arm -> component -> ms/request
    warmup = no_reuse(random.Random(args.seed + 2000), max(1, args.concurrency // 2))
    dev_key = os.environ.get("ZUMIK_DEV_KEY") or "zk-bench-" + os.urandom(16).hex()
    shape = {"replicas": args.replicas, "gateways": args.gateways, "kv_bytes": args.kv_mib << 20,
             "model_source": getattr(args, "model", None)}  # fmt: skip
    arms = [arm for arm in args.arms.split(",") if arm]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"unknown arm(s) {', '.join(unknown)}: choose among {', '.join(ARMS)}")
    if open_workloads and (not arms or arms[0] != "rr-cache" or "zumik" not in arms):
        raise SystemExit(
            "--open-loop-load needs rr-cache as the first arm (its closed-loop rate sets the load) "
            "and the zumik arm (the open loop runs the two side by side)"
        )
    chat = getattr(args, "api", "completions") == "chat"
    chats: dict[str, tuple[list[Messages], list[list[int]]]] = {}
    if chat and (open_workloads or "zumik-scaling" in arms):
        raise SystemExit("--api chat runs the closed-loop arms only (no --open-loop-load, no zumik-scaling)")
    pair = side_by_side_pair(arms, chat=chat)
    results: list[ArmResult] = []
    owners: dict[str, dict[str, int] | None] = {}
    scaling: ScalingRun | None = None
    with tempfile.TemporaryDirectory(prefix="zumik-bench-routing-") as tmp:
        home = ZumikHome(Path(tmp))
        stack: LocalStack | None = None
        try:
            for arm in arms:
                profile = arm_profile(arm, **shape)
                if stack is None:
                    config = StackConfig.from_env(profile, port=free_port(), dev_key=dev_key, home=home)
                    stack = LocalStack(config).start(console.log)
                else:
                    stack.redeploy(profile, console.log)
                if arm == "zumik-scaling":
                    scaling = _run_scaling_arm(stack, dev_key, profile, args, block_size, console)
                    results.append(scaling.result)
                    owners[arm] = owner_stats(APP_NAME)
                    continue
                model_dir = resolve_model_dir(profile, home)
                block_bytes = kv_block_bytes(model_dir, block_size)
                if chat and not chats:  # the conversations, and the engine's ids of each
                    chats = chat_workloads(chat_sized(workloads, args.seed, args.scale), model_dir)
                    workloads = {name: ids for name, (_, ids) in chats.items()}
                capacity_blocks = args.replicas * (shape["kv_bytes"] // block_bytes)
                total = sum(len(prompts) for prompts in workloads.values())
                # Each arm starts on fresh engines: a few unique prompts first, not counted, so
                # the first workload does not pay for the engines' and gateways' first requests.
                asyncio.run(measure_arm(
                    stack.url, dev_key, profile.model.served_name, arm, "warmup", warmup,
                    block_size=block_size, concurrency=args.concurrency,
                ))  # fmt: skip
                with Progress(console=console, transient=True) as progress:
                    task = progress.add_task(f"{arm}", total=total)
                    for workload, prompts in workloads.items():
                        before = cpu_share.snapshot()
                        beliefs_before = owner_stats(APP_NAME)
                        result = asyncio.run(measure_arm(
                            stack.url, dev_key, profile.model.served_name, arm, workload, prompts,
                            block_size=block_size, concurrency=args.concurrency,
                            on_request=functools.partial(progress.advance, task),
                            capacity_blocks=capacity_blocks,
                            chats=chats[workload][0] if chat else None,
                        ))  # fmt: skip
                        result = with_beliefs(result, beliefs_before, owner_stats(APP_NAME))
                        results.append(result)
                        cpu_ms.setdefault(workload, {})[arm] = cpu_share.per_request_ms(
                            cpu_share.delta(before, cpu_share.snapshot()), result.requests
                        )
                        console.log(
                            f"{arm:>10} {workload:<15} hit {result.hit_ratio:.3f} (ideal "
                            f"{result.ideal_ratio:.3f}) ttft p50 {result.ttft_p50_ms:.0f} ms"
                            f"{_belief_note(result)}"
                        )
                        if arm == "rr-cache":
                            serve_rates[workload] = result.requests / result.wall_s
                if arm.startswith("zumik"):
                    owners[arm] = owner_stats(APP_NAME)
            if pair is not None and stack is not None:
                results.extend(_run_side_by_side(
                    stack, dev_key, shape, pair, workloads, open_workloads, serve_rates,
                    args, block_size, console,
                    chats={name: messages for name, (messages, _) in chats.items()} if chat else None,
                ))  # fmt: skip
        finally:
            if stack is not None:
                stack.stop()
    baseline = pair[0] if pair is not None else "rr-cache"  # what the figures compare zumik with
    decisions = decision_times_us(arm_profile("zumik"))
    cluster = cluster_figures(arm_profile("zumik"), seed=args.seed)  # two gateways, one owner
    token_decisions = token_decision_times_us(arm_profile("zumik"), lengths=DECISION_LENGTHS)
    summary = {
        "seed": args.seed, "scale": args.scale, "concurrency": args.concurrency, **shape,
        "api": "chat" if chat else "completions",
        "results": [r.to_json() for r in results],
        "baseline": baseline, "figures": figures(results, baseline=baseline), "owners": owners,
        "scaling": scaling.to_json() if scaling is not None else None,
        "decision_us": {str(length): times for length, times in decisions.items()},
        "mooncake": str(trace) if trace else None,
        "escalation": escalation,
        "cluster": [arm.to_json() for arm in cluster],
        "decision_us_token_ids": {str(length): times for length, times in token_decisions.items()},
        "cpu_ms_per_request": cpu_ms,
        "open_loop": (
            f"rr-cache and zumik side by side on fresh engines, the same arrivals, each at "
            f"load/2 x rr-cache's closed-loop rate, loads {', '.join(f'{load:g}' for load in open_loads)}"
            if open_workloads else None
        ),
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "routing.json").write_text(json.dumps(summary, indent=2))
    plot_routing(summary, args.out / "routing.png")
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    table = Table(
        title=f"Routing arms: {args.gateways} gateway(s), {args.replicas} vLLM CPU replicas "
        f"({args.kv_mib} MiB KV each)"
    )
    for column in (
        "workload",
        "arm",
        "hit ratio",
        "capture eff.",
        "prefill tokens",
        "TTFT p50 ms",
        "p90 ms",
        "tok/s",
        "record wrong / checks",
    ):
        table.add_column(column)
    for r in results:
        data = r.to_json()
        efficiency = "-" if r.capture_efficiency is None else f"{r.capture_efficiency:.2f}"
        table.add_row(
            _row_label(r),
            r.arm, f"{r.hit_ratio:.3f}", efficiency, f"{r.prefill_tokens:,}",
            f"{r.ttft_p50_ms:.0f}", f"{r.ttft_p90_ms:.0f}", f"{data['tokens_per_s']:,.0f}",
            "-" if r.belief_checked is None else f"{r.belief_wrong} / {r.belief_checked}",
        )  # fmt: skip
    console.print(table)
    console.print(timing_table(decisions, token_decisions))
    console.print(figures_table(summary))
    sweep_table = open_sweep_table(summary)
    if sweep_table is not None:
        console.print(sweep_table)
    for workload, by_arm in cpu_ms.items():
        cpu_table = Table(title=f"CPU ms per request by component, {workload} (closed loop)")
        for column in ("component", *by_arm):
            cpu_table.add_column(column)
        for row in cpu_share.table_rows(by_arm):
            cpu_table.add_row(*row)
        console.print(cpu_table)
    print_escalation(escalation, console)
    console.print(owners_table(cluster))
    console.print(f"wrote {args.out / 'routing.json'} and {args.out / 'routing.png'}")
    return 0


def side_by_side_pair(arms: list[str], *, chat: bool) -> tuple[str, str] | None:
    """The arms ``_run_side_by_side`` serves together, the baseline first and ``zumik``: with
    ``--api chat`` (``chat``) the text keys for chat (``zumik-text-chat``) when among ``arms``,
    else Serve's balancing with prefix caching (``rr-cache``); None when either is missing."""
    baseline = TEXT_CHAT_ARM if chat and TEXT_CHAT_ARM in arms else "rr-cache"
    return (baseline, "zumik") if {baseline, "zumik"} <= set(arms) else None


def with_beliefs(result: ArmResult, before: dict[str, int] | None, after: dict[str, int] | None) -> ArmResult:
    """``result`` with its owner's belief checks between two of its ``owner_stats``; unchanged
    when the arm has no owner."""
    if before is None or after is None:
        return result
    return replace(
        result,
        belief_checked=after["belief_checked"] - before["belief_checked"],
        belief_wrong=after["belief_wrong"] - before["belief_wrong"],
    )


def _run_side_by_side(
    stack: Any, dev_key: str, shape: dict[str, Any], pair: tuple[str, str],
    workloads: dict[str, list[list[int]]], open_workloads: dict[float, dict[str, list[list[int]]]],
    serve_rates: dict[str, float], args: Any, block_size: int, console: Any,
    chats: dict[str, list[Messages]] | None = None,
) -> list[ArmResult]:  # fmt: skip
    """The two arms of ``pair`` (``side_by_side_pair``: a baseline, then ``zumik``) served side
    by side: both profiles deployed at once (fresh engines, the same gateways,
    ``x-zumik-profile`` choosing), each workload sent to both arms at once. Arms run one after
    the other meet different loads from the rest of the machine; run together, both meet the
    same. Closed loop: ``workloads``, ``concurrency`` clients per arm, each request as its
    conversation in ``chats`` when given (``--api chat``). Open loop (baseline ``rr-cache``), at
    each load of ``open_workloads`` (load -> its own prompts) from the lowest: arrivals at the
    same instants in both arms, each offered half of the load x rr-cache's closed-loop rate
    (``serve_rates``; the two share the machine), so the machine as a whole gets the load x what
    Serve's balancing sustained alone."""
    from ray import serve
    from rich.progress import Progress

    from zumik_serve.app.application import APP_NAME
    from zumik_serve.bench.routing_scaling import owner_stats

    baseline, zumik = pair
    profiles = {arm: _sharing_cpus(arm_profile(arm, **shape)) for arm in pair}
    # The last arm's app goes first: a rolling update would keep one of its replicas (and its
    # CPUs) until a new one runs, and the new ones would wait on those CPUs.
    serve.delete(APP_NAME)
    stack.redeploy(profiles[zumik], console.log, more=(profiles[baseline],))
    model = profiles[zumik].model.served_name
    # The first profile's owner is the app's SchedulerOwner, another's is named with its
    # profile's name first (``build_serve_app``).
    owners = {zumik: "SchedulerOwner", baseline: f"{profiles[baseline].name}-SchedulerOwner"}

    def beliefs() -> dict[str, dict[str, int] | None]:
        return {arm: owner_stats(APP_NAME, owners[arm]) for arm in pair}

    async def both(
        workload: str, prompts: list[list[int]], arrivals: list[float] | None, on_request: Callable[[], None]
    ) -> list[ArmResult]:
        return await measure_side_by_side(
            stack.url, dev_key, model, {arm: profiles[arm].name for arm in pair}, workload, prompts,
            block_size=block_size, concurrency=args.concurrency, arrivals=arrivals,
            on_request=on_request,
            chats=chats.get(workload) if chats is not None and arrivals is None else None,
        )  # fmt: skip

    def measured_both(
        workload: str, prompts: list[list[int]], arrivals: list[float] | None, on_request: Callable[[], None],
        load: float | None = None,
    ) -> list[ArmResult]:  # fmt: skip
        before = beliefs()
        measured = asyncio.run(both(workload, prompts, arrivals, on_request))
        after = beliefs()
        return [
            replace(with_beliefs(result, before[result.arm], after[result.arm]), load=load)
            for result in measured
        ]

    warmup = no_reuse(random.Random(args.seed + 3000), max(1, args.concurrency // 2))
    asyncio.run(both("warmup", warmup, None, lambda: None))  # fresh engines, not counted
    results: list[ArmResult] = []
    with Progress(console=console, transient=True) as progress:
        total = len(pair) * sum(
            len(p) for runs in (workloads, *open_workloads.values()) for p in runs.values()
        )
        task = progress.add_task(f"{baseline} + {zumik}, side by side", total=total)
        advance = functools.partial(progress.advance, task)
        for workload, prompts in workloads.items():
            measured = measured_both(workload, prompts, None, advance)
            results.extend(measured)
            for result in measured:
                console.log(
                    f"{result.arm:>10} {workload:<15} side by side: hit {result.hit_ratio:.3f} "
                    f"ttft p90 {result.ttft_p90_ms:.0f} ms, {result.tokens_per_s:.0f} tok/s"
                    f"{_belief_note(result)}"
                )
            for load, opened_workloads in open_workloads.items():
                opened = opened_workloads.get(workload)
                if opened is None:
                    continue
                rate = load * serve_rates[workload] / len(pair)
                measured = measured_both(
                    workload, opened, arrival_offsets(rate, len(opened), seed=args.seed), advance, load
                )
                results.extend(measured)
                for result in measured:
                    console.log(
                        f"{result.arm:>10} {workload:<15} open loop at {result.rate_per_s or 0:.2f} req/s "
                        f"(load {load:g}), "
                        f"side by side: hit {result.hit_ratio:.3f} ttft p90 {result.ttft_p90_ms:.0f} ms, "
                        f"answered {result.achieved_per_s:.2f} req/s"
                        f"{' (saturated)' if result.saturated else ''}, "
                        f"{result.held_turns} turns held for their previous answer"
                    )
    return results


async def measure_side_by_side(
    url: str, api_key: str, model: str, profiles: dict[str, str], workload: str,
    prompts: list[list[int]], *, block_size: int, concurrency: int,
    arrivals: list[float] | None = None, on_request: Callable[[], None] = lambda: None,
    chats: list[Messages] | None = None, transport: httpx.AsyncBaseTransport | None = None,
) -> list[ArmResult]:  # fmt: skip
    """``workload`` sent to every arm of ``profiles`` (arm -> its ``x-zumik-profile``) at once,
    each as ``measure_arm`` sends it; their results, in ``profiles``' order."""
    return list(await asyncio.gather(*(
        measure_arm(
            url, api_key, model, arm, workload, prompts, block_size=block_size,
            concurrency=concurrency, arrivals=arrivals, profile=profile, on_request=on_request,
            side_by_side=True, chats=chats, transport=transport,
        )
        for arm, profile in profiles.items()
    )))  # fmt: skip


def _belief_note(result: ArmResult) -> str:
    if result.belief_checked is None:
        return ""
    return f", record of sends wrong in {result.belief_wrong} of {result.belief_checked} checks"


# Ray's logical CPUs a side-by-side replica asks for (its engine's own bundle of 1 comes on top):
# two groups of 3 replicas then fit the local head's 8 with the gateways. Ray's figure only
# places actors; the engines' threads and processes are the same as in the arms alone.
PAIRED_CPUS_PER_REPLICA = 0.1


def _sharing_cpus(profile: Profile) -> Profile:
    engine = profile.engine.model_copy(update={"cpus_per_replica": PAIRED_CPUS_PER_REPLICA})
    return profile.model_copy(update={"engine": engine})


def _run_scaling_arm(
    stack: Any, dev_key: str, profile: Profile, args: Any, block_size: int, console: Any
) -> ScalingRun:
    """The scaling arm (``bench/routing_scaling.py``) on the deployed ``zumik-scaling`` profile."""
    from zumik_serve.app.application import APP_NAME
    from zumik_serve.bench.routing_scaling import measure_scaling_arm, running_replicas

    prompts = shared_prefix(random.Random(args.seed + 4), args.scaling_requests // 4 + 1)

    async def run() -> ScalingRun:
        headers = {"Authorization": f"Bearer {dev_key}"}
        async with httpx.AsyncClient(base_url=stack.url, headers=headers, timeout=300) as client:
            return await measure_scaling_arm(
                client, profile.model.served_name, prompts[: args.scaling_requests],
                block_size=block_size, concurrency=args.concurrency, replicas=args.replicas,
                running=running_replicas(APP_NAME, "EngineReplica"),
                phase_requests=args.scaling_phase_requests, progress=console.log,
            )  # fmt: skip

    return asyncio.run(run())


def _row_label(result: ArmResult) -> str:
    label = result.workload
    if result.arrival == "open":
        label += f", open loop at {result.rate_per_s:.2f} req/s"
        label += f" (load {result.load:g})" if result.load is not None else ""
        label += ", saturated" if result.saturated else ""
    return label + (", side by side" if result.side_by_side else "")


def figures(results: list[ArmResult], *, baseline: str = "rr-cache") -> dict[str, dict[str, Any]]:
    """Issue #17's figures per workload, Zumik against ``baseline`` in the same run (Serve's
    balancing with prefix caching, or with ``--api chat`` the text keys for chat:
    ``side_by_side_pair``): capture efficiency, TTFT p90 ratio (the baseline's / Zumik's, higher
    is better for Zumik) and throughput ratio (Zumik's / the baseline's); from the arms one after
    the other, and from the arms side by side (``_run_side_by_side``: closed loop, and the open
    loop at each load, ``open_sweep``). The open loop's headline is its ratio at the lowest load
    that saturated the baseline's group (the issue's "a load that saturates the group"), else at
    the highest load run, marked unsaturated."""
    by = {(r.arm, r.workload): r for r in results if r.arrival == "closed" and not r.side_by_side}
    paired = {(r.arm, r.workload): r for r in results if r.arrival == "closed" and r.side_by_side}
    opened: dict[tuple[str, str], list[ArmResult]] = {}
    for result in results:
        if result.arrival == "open":
            opened.setdefault((result.arm, result.workload), []).append(result)
    out: dict[str, dict[str, Any]] = {}
    for (arm, workload), zumik in by.items():
        if arm != "zumik":
            continue
        serve = by.get((baseline, workload))
        sweep = open_sweep(opened.get((baseline, workload), []), opened.get(("zumik", workload), []))
        headline = next(
            (point for point in sweep if point["baseline_saturated"]), sweep[-1] if sweep else None
        )
        serve_paired, zumik_paired = paired.get((baseline, workload)), paired.get(("zumik", workload))
        out[workload] = {
            "ttft_p90_ratio_side_by_side": (
                serve_paired.ttft_p90_ms / zumik_paired.ttft_p90_ms if serve_paired and zumik_paired else None
            ),
            "throughput_ratio_side_by_side": (
                zumik_paired.tokens_per_s / serve_paired.tokens_per_s
                if serve_paired and zumik_paired and zumik_paired.wall_s and serve_paired.wall_s
                else None
            ),
            "ttft_p90_ratio_open": headline["ttft_p90_ratio"] if headline else None,
            "open_rate_per_s": headline["rate_per_s"] if headline else None,
            "open_load": headline["load"] if headline else None,
            "open_baseline_saturated": headline["baseline_saturated"] if headline else None,
            "open_sweep": sweep,
            "capture_efficiency": zumik.capture_efficiency,
            "pooled_capture": zumik.pooled_capture,
            "baseline_pooled_capture": serve.pooled_capture if serve else None,
            "ttft_p90_ratio": serve.ttft_p90_ms / zumik.ttft_p90_ms if serve and zumik.ttft_p90_ms else None,
            "throughput_ratio": (
                zumik.tokens_per_s / serve.tokens_per_s if serve and zumik.wall_s and serve.wall_s else None
            ),
        }  # fmt: skip
    return out


def open_sweep(baseline: list[ArmResult], zumik: list[ArmResult]) -> list[dict[str, Any]]:
    """The open loop's points, the two arms' results at the same load paired, lowest rate first:
    the offered rate per arm, what each arm answered per second, whether each saturated, and
    the TTFT p90 ratio (the baseline's / Zumik's)."""
    zumik_at = {(r.load, r.rate_per_s): r for r in zumik}
    points = []
    for serve in sorted(baseline, key=lambda r: r.rate_per_s or 0.0):
        ours = zumik_at.get((serve.load, serve.rate_per_s))
        if ours is None:
            continue
        points.append({
            "load": serve.load, "rate_per_s": serve.rate_per_s,
            "ttft_p90_ratio": serve.ttft_p90_ms / ours.ttft_p90_ms if ours.ttft_p90_ms else None,
            "baseline_ttft_p90_ms": serve.ttft_p90_ms, "zumik_ttft_p90_ms": ours.ttft_p90_ms,
            "baseline_achieved_per_s": serve.achieved_per_s, "zumik_achieved_per_s": ours.achieved_per_s,
            "baseline_saturated": serve.saturated, "zumik_saturated": ours.saturated,
        })  # fmt: skip
    return points


def figures_table(summary: dict[str, Any]) -> Any:
    from rich.table import Table

    baseline = summary.get("baseline", "rr-cache")
    table = Table(title=f"Zumik against {baseline}, same run")
    columns = ("workload", "capture eff. (goal >= 0.95)", f"of the pooled ideal ({baseline}'s)",
               "TTFT p90 ratio (>= 3)", "throughput ratio", "side by side: TTFT p90 ratio",
               "side by side: throughput ratio",
               "open loop, side by side: TTFT p90 ratio at req/s per arm")  # fmt: skip
    for column in columns:
        table.add_column(column)

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    for workload, row in summary["figures"].items():
        pooled = f"{cell(row['pooled_capture'])} ({cell(row['baseline_pooled_capture'])})"
        ratio_open = row.get("ttft_p90_ratio_open")
        opened = "-" if ratio_open is None else f"{ratio_open:.2f} at {row['open_rate_per_s']:.2f}"
        if ratio_open is not None:
            opened += (
                f" ({baseline}'s group {'saturated' if row['open_baseline_saturated'] else 'NOT saturated'})"
            )
        table.add_row(workload, cell(row["capture_efficiency"]), pooled, cell(row["ttft_p90_ratio"]),
                      cell(row["throughput_ratio"]), cell(row.get("ttft_p90_ratio_side_by_side")),
                      cell(row.get("throughput_ratio_side_by_side")), opened)  # fmt: skip
    scaling = summary.get("scaling")
    if scaling:
        result = scaling["result"]
        table.add_row(
            f"scaling ({'scaled' if scaling['scaled'] else 'NOT scaled'}, "
            f"{len(scaling['failures'])} failed of {result['requests']})",
            cell(result["capture_efficiency"]) + " (goal >= 0.9)", "-", "-", "-", "-", "-", "-",
        )  # fmt: skip
    return table


def open_sweep_table(summary: dict[str, Any]) -> Any | None:
    """The open loop at each load, side by side (None: no open loop ran)."""
    from rich.table import Table

    baseline = summary.get("baseline", "rr-cache")
    rows = [
        (workload, point)
        for workload, row in summary["figures"].items()
        for point in row.get("open_sweep") or ()
    ]
    if not rows:
        return None
    table = Table(title=f"Open loop, side by side: Zumik against {baseline} at each load")
    for column in ("workload", "load", "offered req/s per arm", f"answered req/s: {baseline} / zumik",
                   f"TTFT p90 ms: {baseline} / zumik", "TTFT p90 ratio (>= 3 where saturated)"):  # fmt: skip
        table.add_column(column)

    def answered(rate: float, saturated: bool | None) -> str:
        return f"{rate:.2f}{' (saturated)' if saturated else ''}"

    for workload, point in rows:
        ratio = point["ttft_p90_ratio"]
        table.add_row(
            workload, "-" if point["load"] is None else f"{point['load']:g}", f"{point['rate_per_s']:.2f}",
            f"{answered(point['baseline_achieved_per_s'], point['baseline_saturated'])} / "
            f"{answered(point['zumik_achieved_per_s'], point['zumik_saturated'])}",
            f"{point['baseline_ttft_p90_ms']:.0f} / {point['zumik_ttft_p90_ms']:.0f}",
            "-" if ratio is None else f"{ratio:.2f}",
        )  # fmt: skip
    return table


def plot_routing(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [
        r for r in summary["results"] if r.get("arrival", "closed") == "closed" and not r.get("side_by_side")
    ]
    paired = [
        r for r in summary["results"] if r.get("arrival", "closed") == "closed" and r.get("side_by_side")
    ]
    opened = [r for r in summary["results"] if r.get("arrival") == "open"]
    workloads = list(dict.fromkeys(r["workload"] for r in results))
    arms = list(dict.fromkeys(r["arm"] for r in results))
    fig, axes = plt.subplots(1, 3 if opened else 2, figsize=(18 if opened else 12, 4))
    left, right = axes[0], axes[1]
    if opened:  # TTFT p90 against the rate offered to each arm: a line per workload and arm
        for workload in dict.fromkeys(r["workload"] for r in opened):
            for arm in dict.fromkeys(r["arm"] for r in opened):
                points = sorted(
                    (r["rate_per_s"], r["ttft_p90_ms"], bool(r.get("saturated")))
                    for r in opened if r["workload"] == workload and r["arm"] == arm
                )  # fmt: skip
                if not points:
                    continue
                (line,) = axes[2].plot([x for x, _, _ in points], [y for _, y, _ in points], marker="o",
                                       label=f"{workload}, {arm}")  # fmt: skip
                saturated = [(x, y) for x, y, flag in points if flag]
                if saturated:  # a saturated group: a hollow ring around its point
                    axes[2].scatter([x for x, _ in saturated], [y for _, y in saturated], s=140,
                                    facecolors="none", edgecolors=line.get_color())  # fmt: skip
        axes[2].set_xlabel("offered req/s per arm")
        axes[2].set_ylabel("TTFT p90 (ms)")
        axes[2].set_title("Open loop, the arms side by side (ringed: saturated)")
        axes[2].legend(fontsize="small")
    width = 0.8 / max(1, len(arms))
    for offset, arm in enumerate(arms):
        rows = {r["workload"]: r for r in results if r["arm"] == arm}
        xs = [index + offset * width for index in range(len(workloads))]
        left.bar(xs, [rows[w]["hit_ratio"] if w in rows else 0 for w in workloads], width, label=arm)
        timed = {r["workload"]: r for r in (paired or results) if r["arm"] == arm}
        right.bar(xs, [timed[w]["ttft_p50_ms"] if w in timed else 0 for w in workloads], width, label=arm)
    ideal = {r["workload"]: r["ideal_ratio"] for r in results}
    for index, workload in enumerate(workloads):
        left.hlines(ideal[workload], index - width / 2, index + width * (len(arms) - 0.5), colors="black",
                    linestyles="dashed", label="ideal" if index == 0 else None)  # fmt: skip
    for axis, label in ((left, "token-weighted hit ratio"), (right, "TTFT p50 (ms)")):
        axis.set_xticks([index + width * (len(arms) - 1) / 2 for index in range(len(workloads))], workloads)
        axis.set_ylabel(label)
        axis.legend()
    left.set_title("Cache hits by routing arm (dashed: the workload's ideal)")
    right.set_title("Time to first token, closed loop" + (", the arms side by side" if paired else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
