"""The routing bench's workloads fit the engine they are sent to, at any scale."""

from __future__ import annotations

import asyncio
import json
import random

import httpx

from profiles import load_builtin
from profiles.model import QosClass
from zumik_serve.bench.routing import (
    AGENT_SESSIONS,
    BENCH_MAX_QUEUED,
    BENCH_QUEUE_TIMEOUT_S,
    SESSION_MAX_PROMPT_TOKENS,
    agent_sessions,
    arm_profile,
    measure_arm,
    previous_turns,
    shared_prefix,
)


def test_agent_sessions_start_over_before_the_context_is_full() -> None:
    prompts = agent_sessions(random.Random(7), 80)  # 320 turns: 26 a session, past 2,048 tokens
    assert len(prompts) == 320
    assert max(map(len, prompts)) <= SESSION_MAX_PROMPT_TOKENS
    tools = prompts[0][:500]
    assert all(prompt[:500] == tools for prompt in prompts)  # every session resends the tools
    # a session that started over: its turn is shorter than its previous one, a new history
    restarts = [
        turn
        for turn in range(AGENT_SESSIONS, len(prompts))
        if len(prompts[turn]) < len(prompts[turn - AGENT_SESSIONS])
    ]
    assert restarts
    first = restarts[0]
    assert prompts[first][500:800] != prompts[first - AGENT_SESSIONS][500:800]
    assert len(prompts[first]) == 500 + 300 + 60


def test_session_cap_leaves_room_in_the_bench_engines_context() -> None:
    assert load_builtin("local-cpu-2x").engine.max_model_len > SESSION_MAX_PROMPT_TOKENS


def test_short_runs_keep_the_growing_sessions() -> None:
    prompts = agent_sessions(random.Random(7), 10)  # 40 turns: no session reaches the cap
    for turn in range(AGENT_SESSIONS, len(prompts)):
        earlier = prompts[turn - AGENT_SESSIONS]
        assert prompts[turn][: len(earlier)] == earlier


def test_sessions_outgrow_one_replica_but_not_the_group() -> None:
    """Like shared_prefix's groups: one replica's KV (256 blocks of 32 tokens at the bench's
    default --kv-mib) cannot hold every session, the group's three can."""
    prompts = agent_sessions(random.Random(7), 20)
    blocks = {tuple(prompt[: (b + 1) * 32]) for prompt in prompts for b in range(len(prompt) // 32)}
    assert 256 < len(blocks) <= 3 * 256


def test_arms_queue_an_open_loop_instead_of_refusing_it() -> None:
    """An open loop past the group's rate queues in the gateways (the TTFT it measures), never
    429s at the standard class's share: the same for every arm, the running slots unchanged."""
    for arm in ("rr-cache", "zumik"):
        qos = arm_profile(arm, replicas=3, gateways=2).qos
        standard = qos.classes[QosClass.STANDARD]
        assert standard.max_queued == BENCH_MAX_QUEUED
        assert standard.tenant_share() > BENCH_MAX_QUEUED // 2  # a tenant alone: half the queue
        assert standard.max_running == load_builtin("local-cpu-2x").qos.classes[QosClass.STANDARD].max_running
        assert qos.queue_timeout_s == BENCH_QUEUE_TIMEOUT_S


def test_a_session_turn_continues_its_previous_turn_and_nothing_else_does() -> None:
    prompts = agent_sessions(random.Random(7), 80)  # restarts included
    after = previous_turns(prompts)
    assert after[:AGENT_SESSIONS] == [None] * AGENT_SESSIONS
    for turn in range(AGENT_SESSIONS, len(prompts)):
        earlier = turn - AGENT_SESSIONS
        restarted = len(prompts[turn]) < len(prompts[earlier])
        assert after[turn] == (None if restarted else earlier)
    assert previous_turns(shared_prefix(random.Random(7), 10)) == [None] * 40


def test_a_turn_is_sent_only_once_its_previous_turn_has_answered() -> None:
    """Open loop, every request due at once: without the wait a session's turns would be in
    flight together. The server (httpx's in-process transport, a streamed completion each)
    notes which prompts are in flight when a request arrives, and the profile asked for."""
    prompts = agent_sessions(random.Random(7), 6)  # 24 turns, 12 sessions of 2
    after = previous_turns(prompts)
    in_flight: set[int] = set()
    seen: list[tuple[int, set[int], str | None]] = []
    by_prompt = {tuple(prompt): index for index, prompt in enumerate(prompts)}

    async def handler(request: httpx.Request) -> httpx.Response:
        index = by_prompt[tuple(json.loads(request.content)["prompt"])]
        seen.append((index, set(in_flight), request.headers.get("x-zumik-profile")))
        in_flight.add(index)
        await asyncio.sleep(0.01)  # every other due request arrives meanwhile
        in_flight.discard(index)
        usage = {"prompt_tokens_details": {"cached_tokens": 32}}
        chunks = [{"choices": [{"text": "x"}]}, {"choices": [], "usage": usage}]
        body = "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks) + "data: [DONE]\n\n"
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    result = asyncio.run(measure_arm(
        "http://bench", "key", "m", "zumik", "agent_sessions", prompts, block_size=32, concurrency=4,
        arrivals=[0.0] * len(prompts), profile="bench-routing-zumik",
        transport=httpx.MockTransport(handler),
    ))  # fmt: skip
    assert sorted(index for index, _, _ in seen) == list(range(len(prompts)))
    assert {profile for _, _, profile in seen} == {"bench-routing-zumik"}
    order = [index for index, _, _ in seen]
    for position, (index, busy, _) in enumerate(seen):
        previous = after[index]
        if previous is not None:  # it had arrived and left before this turn arrived
            assert previous in order[:position] and previous not in busy
    assert result.held_turns == sum(previous is not None for previous in after) == 12
    assert result.cached_tokens == 32 * len(prompts)
