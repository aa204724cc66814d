"""Two gateways, one profile: what one owner of the scheduler state (``routing/owner.py``) is worth.

A simulation over the real scheduler code, no engine (labelled so in every output): requests of
a shared-prefix workload arrive at two gateways in turn (as an ingress spreads them); each
gateway decides with its own ``ProfileScheduler`` and sends to one of three replicas whose
prefix caches are LRU sets of ``capacity_blocks`` blocks (the engines' truth, the working set
larger than one replica). Arms, on the same request sequence:

    one-gateway      every request through one scheduler (the reference)
    two-no-owner     two schedulers, each knowing only what it sent (today without an owner)
    two-owner        two schedulers linked to one ProfileOwner, exchanging after every request
    two-owner-every-10  the same, exchanging every 10 requests (views that lag)

Per arm: cached blocks (the engine's LRU walked at send time) over the workload's ideal (every
block-aligned prefix seen before is a hit), and how often the deciding gateway's belief of the
picked replica differed from its truth (``belief_wrong``).
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from profiles import Profile
from zumik_serve.routing.decision import NO_EVIDENCE
from zumik_serve.routing.owner import exchange
from zumik_serve.routing.residency import ResidencyIndex
from zumik_serve.routing.scheduler import CHARS_PER_TOKEN, ProfileScheduler, SchedulingRequest, owner_for

REPLICAS = ("r0", "r1", "r2")
LAGGING_EVERY = 10  # views that lag: the gateways exchange with the owner every 10 requests
SALT = "s" * 64
AGENT_TURN_TOKENS = 256  # what an agent's next turn adds to its previous prompt, in the timers


@dataclass(frozen=True)
class ClusterArm:
    arm: str
    requests: int
    cached_blocks: int
    ideal_blocks: int
    belief_wrong: int

    @property
    def capture_efficiency(self) -> float:
        return self.cached_blocks / self.ideal_blocks if self.ideal_blocks else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "arm": self.arm, "requests": self.requests, "cached_blocks": self.cached_blocks,
            "ideal_blocks": self.ideal_blocks, "capture_efficiency": self.capture_efficiency,
            "belief_wrong": self.belief_wrong, "evidence": "simulated (scheduler code, LRU engines)",
        }  # fmt: skip


def shared_prefix_texts(seed: int, *, groups: int, prefix_chars: int, requests: int) -> list[str]:
    rng = random.Random(seed)
    prefixes = ["".join(rng.choice("abcdefghij ") for _ in range(prefix_chars)) for _ in range(groups)]
    order = [rng.randrange(groups) for _ in range(requests)]
    return [prefixes[g] + f" question {index} " + "x" * 64 for index, g in enumerate(order)]


def run_arm(
    profile: Profile, arm: str, texts: list[str], *, capacity_blocks: int, every: int = 1
) -> ClusterArm:
    gateways = [ProfileScheduler(profile, replicas={"local": list(REPLICAS)})]
    if arm != "one-gateway":
        gateways.append(ProfileScheduler(profile, replicas={"local": list(REPLICAS)}))
    owner = owner_for(profile) if arm == "two-owner" else None
    if owner is not None:
        for index, gateway in enumerate(gateways):
            gateway.link(f"gw-{index}")
    engines = ResidencyIndex(capacity_blocks)
    seen: set[str] = set()
    cached = ideal = wrong = 0
    for index, text in enumerate(texts):
        gateway = gateways[index % len(gateways)]
        request = SchedulingRequest(
            tenant="ten_bench", cache_salt=SALT, prompt_text=text, expected_output_tokens=4,
            request_digest=f"{index:032x}", release_id=None, snapshot_id=None,
            allowed_routes=frozenset({"local"}), evidence=NO_EVIDENCE,
        )  # fmt: skip
        record, keys = gateway.decide(f"dec_{index}", request, now_ms=index, seed=index)
        assert record.pick is not None and record.pick.replica is not None
        replica = record.pick.replica
        believed = gateway.residency.matched_prefix_blocks(replica, keys)
        held = engines.matched_prefix_blocks(replica, keys)
        cached += held
        wrong += believed != held
        ideal += next((n for n in range(len(keys), 0, -1) if keys[n - 1] in seen), 0)
        seen.update(keys)
        engines.record_sent(replica, keys)
        gateway.sent(record.pick, keys)
        gateway.finished(record.pick)
        if owner is not None and (index + 1) % every == 0:
            for each in gateways:
                exchange(each, owner, index)
    return ClusterArm(arm, len(texts), cached, ideal, wrong)


def cluster_figures(profile: Profile, *, seed: int = 1, requests: int = 400) -> list[ClusterArm]:
    """The three arms on one shared-prefix sequence whose working set is 2x one replica."""
    block_chars = profile.engine.block_size * 4
    groups, prefix_chars = 12, block_chars * 24
    capacity = groups * 24 // 2  # half the working set per replica: three hold 1.5x of it
    texts = shared_prefix_texts(seed, groups=groups, prefix_chars=prefix_chars, requests=requests)
    arms = [run_arm(profile, arm, texts, capacity_blocks=capacity) for arm in ("one-gateway", "two-no-owner")]
    arms.append(run_arm(profile, "two-owner", texts, capacity_blocks=capacity))
    lagging = run_arm(profile, "two-owner", texts, capacity_blocks=capacity, every=LAGGING_EVERY)
    return [*arms, ClusterArm(f"two-owner-every-{LAGGING_EVERY}", *_counts(lagging))]


def _counts(arm: ClusterArm) -> tuple[int, int, int, int]:
    return arm.requests, arm.cached_blocks, arm.ideal_blocks, arm.belief_wrong


def token_decision_times_us(
    profile: Profile, *, lengths: tuple[int, ...], samples: int = 200
) -> dict[int, dict[str, float]]:
    """Decision time when the prompt is token ids (keys: the engine's block hashes), by length:
    with the profile's context raised to the longest length, so every block of it is keyed.
    Both cases of ``time_decisions``: a prompt's first request, and an agent's next turn."""

    scheduler = ProfileScheduler(with_context(profile, max(lengths)), replicas={"local": list(REPLICAS)})
    rng = random.Random(7)
    result: dict[int, dict[str, float]] = {}
    for length in lengths:
        tokens = [rng.randrange(10, 30_000) for _ in range(length)]
        result[length] = time_decisions(scheduler, *timer_requests(tokens), samples=samples)
    return result


def chat_render_times_us(
    model_dir: Path, *, lengths: tuple[int, ...], samples: int = 30
) -> dict[int, dict[str, float]]:
    """What keying a /v1 chat prompt by the engine's block hashes costs the gateway before its
    decision, by prompt length (tokens): p50 and p99 (µs) of rendering the chat template and
    tokenizing (``HfChatTokenizer.encode_engine_chat``, the tiny model's tokenizer) for an
    agent's conversation (a system prompt, then user and assistant turns of about
    ``AGENT_TURN_TOKENS`` tokens each, words of the model's corpus); each sample is a new turn
    (the last user message changed), so nothing is reused between samples. The keys then cost
    what a token-id prompt's do (``token_decision_times_us``)."""
    import time

    from zumik_serve.engines.hf_tokenizer import HfChatTokenizer
    from zumik_serve.engines.vllm_args import chat_content_format
    from zumik_serve.model.tiny import CORPUS_PATH

    tokenizer = HfChatTokenizer(model_dir, chat_content_format=chat_content_format(model_dir, {}))
    words = CORPUS_PATH.read_text().split()
    rng = random.Random(11)

    def text(tokens: int) -> str:
        return " ".join(rng.choice(words) for _ in range(tokens // 2))

    result: dict[int, dict[str, float]] = {}
    for length in lengths:
        messages: list[dict[str, Any]] = [{"role": "system", "content": text(AGENT_TURN_TOKENS)}]
        while len(cast(list[int], tokenizer.encode_engine_chat({"messages": messages}))) < length:
            role = "user" if messages[-1]["role"] != "user" else "assistant"
            messages.append({"role": role, "content": text(AGENT_TURN_TOKENS)})
        if messages[-1]["role"] != "user":
            messages.append({"role": "user", "content": text(AGENT_TURN_TOKENS)})
        times = []
        for index in range(samples):
            body = {"messages": [*messages[:-1], {"role": "user", "content": f"#{index} " + text(64)}]}
            started = time.perf_counter()
            tokenizer.encode_engine_chat(body)
            times.append((time.perf_counter() - started) * 1e6)
        result[length] = _p50_p99(times)
    return result


def chat_table(times: dict[int, dict[str, float]]) -> Any:
    from rich.table import Table

    table = Table(title="A /v1 chat prompt's engine token ids in the gateway (template + tokenizer), µs")
    for column in ("prompt tokens", "p50", "p99"):
        table.add_column(column)
    for length, row in times.items():
        table.add_row(str(length), f"{row['p50']:.0f}", f"{row['p99']:.0f}")
    return table


def timer_requests(
    prompt: str | list[int],
) -> tuple[SchedulingRequest, Callable[[int], SchedulingRequest], Callable[[int], SchedulingRequest]]:
    """The requests ``time_decisions`` times, from ``prompt`` (text of ``CHARS_PER_TOKEN``
    characters a token, or token ids): the agent's previous turn (``prompt`` less its last
    ``AGENT_TURN_TOKENS``), the first request ``first(i)`` (``prompt`` with sample ``i``'s mark
    at its start: no block shared with any request before it) and the next turn ``turn(i)``
    (the previous turn, sample ``i``'s mark, then the rest of ``prompt``). A mark is ``#`` and
    eight digits in text, the id ``30_000 + i`` in token ids: neither may occur in ``prompt``."""
    if isinstance(prompt, str):
        text, cut = prompt, len(prompt) - AGENT_TURN_TOKENS * CHARS_PER_TOKEN

        def first_text(index: int) -> SchedulingRequest:
            return bench_request(f"#{index:08d}" + text[9:])

        def turn_text(index: int) -> SchedulingRequest:
            return bench_request(f"{text[:cut]}#{index:08d}" + text[cut + 9 :])

        return bench_request(text[:cut]), first_text, turn_text
    tokens, end = prompt, len(prompt) - AGENT_TURN_TOKENS

    def first_ids(index: int) -> SchedulingRequest:
        return bench_request([30_000 + index, *tokens[1:]])

    def turn_ids(index: int) -> SchedulingRequest:
        return bench_request([*tokens[:end], 30_000 + index, *tokens[end + 1 :]])

    return bench_request(tokens[:end]), first_ids, turn_ids


def bench_request(prompt: str | list[int]) -> SchedulingRequest:
    """The request the decision timers decide: ``prompt`` as text, or as token ids."""
    text, token_ids = (prompt, None) if isinstance(prompt, str) else ("", prompt)
    return SchedulingRequest(
        tenant="ten_bench", cache_salt=SALT, prompt_text=text, expected_output_tokens=16,
        request_digest="d" * 32, release_id=None, snapshot_id=None, allowed_routes=None,
        evidence=NO_EVIDENCE, prompt_token_ids=token_ids,
    )  # fmt: skip


def with_context(profile: Profile, tokens: int) -> Profile:
    """``profile`` with an engine context of at least ``tokens`` (the scheduler keys a prompt's
    blocks up to the context; a shorter one would time a cut prompt)."""
    engine = profile.engine.model_copy(update={"max_model_len": max(tokens, profile.engine.max_model_len)})
    return profile.model_copy(update={"engine": engine})


def time_decisions(
    scheduler: ProfileScheduler,
    previous: SchedulingRequest,
    first: Callable[[int], SchedulingRequest],
    turn: Callable[[int], SchedulingRequest],
    *,
    samples: int,
) -> dict[str, float]:
    """p50 and p99 (µs) of ``decide`` in two cases, their samples alternating:

        p50, p99            a prompt's first request: ``first(i)`` shares no block with any
                            request before it (nothing resident, no chain remembered)
        turn_p50, turn_p99  an agent's next turn: ``turn(i)`` is ``previous`` (decided and
                            sent once before the timing: resident, its chain remembered) with a
                            new suffix of its own

    and ``rest_p50``, ``turn_rest_p50``: the time, after the decision, of the prompt keys it did
    not read (``routing/prompt_keys.py``; the dispatcher computes them once the call is handed
    on), timed separately. Requests are built outside the timed calls."""
    import time

    record, keys = scheduler.decide("dec_previous", previous, now_ms=0, seed=1)
    if record.pick is not None:
        scheduler.sent(record.pick, keys)
    times: dict[str, list[float]] = {"first": [], "turn": [], "first_rest": [], "turn_rest": []}
    for index in range(samples):
        for case, make in (("first", first), ("turn", turn)):
            request = make(index)
            started = time.perf_counter()
            _, keys = scheduler.decide(f"dec_{case}_{index}", request, now_ms=index, seed=index)
            decided = time.perf_counter()
            keys.all()
            times[case].append((decided - started) * 1e6)
            times[f"{case}_rest"].append((time.perf_counter() - decided) * 1e6)
    result: dict[str, float] = {}
    for case, prefix in (("first", ""), ("turn", "turn_")):
        result.update({f"{prefix}{name}": value for name, value in _p50_p99(times[case]).items()})
        result[f"{prefix}rest_p50"] = statistics.median(times[f"{case}_rest"])
    return result


def timing_table(text: dict[int, dict[str, float]], tokens: dict[int, dict[str, float]]) -> Any:
    """Both decision timers as one rich table (``zumik bench routing``, with ``--cluster-only``
    too): a prompt's first request, and an agent's next turn."""
    from rich.table import Table

    table = Table(
        title="Scheduler decision time (prefix keys + decide), in-process, µs: a prompt's first "
        f"request, and an agent's next turn (same prefix, {AGENT_TURN_TOKENS} new tokens); "
        "'keys after': the keys the decision did not read, computed after it"
    )
    columns = {"first p50": "p50", "first p99": "p99", "first keys after p50": "rest_p50",
               "next turn p50": "turn_p50", "next turn p99": "turn_p99",
               "next turn keys after p50": "turn_rest_p50"}  # fmt: skip
    for column in ("prompt tokens", "keys", *columns):
        table.add_column(column)
    for label, times_by_length in (("text", text), ("token ids", tokens)):
        for length, times in times_by_length.items():
            table.add_row(str(length), label, *(f"{times[name]:.0f}" for name in columns.values()))
    return table


def owners_table(arms: list[ClusterArm]) -> Any:
    """The simulated arms as a rich table (``zumik bench routing`` and ``--cluster-only``)."""
    from rich.table import Table

    table = Table(title="Two gateways, three replicas: one owner of the scheduler state (simulated)")
    for column in ("arm", "capture eff.", "belief wrong"):
        table.add_column(column)
    for arm in arms:
        table.add_row(arm.arm, f"{arm.capture_efficiency:.3f}", f"{arm.belief_wrong}/{arm.requests}")
    return table


def run_cluster_only(args: Any, console: Any) -> int:
    """``zumik bench routing --cluster-only``: this module's figures and both decision timers."""
    import json
    import tempfile

    from zumik_serve.bench.routing import DECISION_LENGTHS, arm_profile, decision_times_us
    from zumik_serve.model.tiny import build_tiny_model

    profile = arm_profile("zumik")
    arms = cluster_figures(profile, seed=args.seed)
    text = decision_times_us(profile)
    tokens = token_decision_times_us(profile, lengths=DECISION_LENGTHS)
    with tempfile.TemporaryDirectory() as folder:
        chat = chat_render_times_us(build_tiny_model(Path(folder) / "tiny"), lengths=DECISION_LENGTHS)
    summary = {
        "seed": args.seed,
        "cluster": [arm.to_json() for arm in arms],
        "decision_us": {str(length): times for length, times in text.items()},
        "decision_us_token_ids": {str(length): times for length, times in tokens.items()},
        "chat_token_ids_us": {str(length): times for length, times in chat.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cluster.json").write_text(json.dumps(summary, indent=2))
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    console.print(owners_table(arms))
    console.print(timing_table(text, tokens))
    console.print(chat_table(chat))
    console.print(f"wrote {args.out / 'cluster.json'}")
    return 0


def _p50_p99(times: list[float]) -> dict[str, float]:
    """The median and the 99th percentile (nearest rank below) of ``times``."""
    ordered = sorted(times)
    return {"p50": statistics.median(ordered), "p99": ordered[int(0.99 * (len(ordered) - 1))]}
