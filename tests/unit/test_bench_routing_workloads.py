"""The routing bench's workloads fit the engine they are sent to, at any scale."""

from __future__ import annotations

import random

from profiles import load_builtin
from zumik_serve.bench.routing import SESSION_MAX_PROMPT_TOKENS, agent_sessions


def test_agent_sessions_start_over_before_the_context_is_full() -> None:
    prompts = agent_sessions(random.Random(7), 40)  # 160 turns: 27 a session, past 2,048 tokens
    assert len(prompts) == 160
    assert max(map(len, prompts)) <= SESSION_MAX_PROMPT_TOKENS
    tools = prompts[0][:500]
    assert all(prompt[:500] == tools for prompt in prompts)  # every session resends the tools
    # a session that started over: its turn is shorter than its previous one, a new history
    restarts = [turn for turn in range(6, len(prompts)) if len(prompts[turn]) < len(prompts[turn - 6])]
    assert restarts
    first = restarts[0]
    assert prompts[first][500:800] != prompts[first - 6][500:800]
    assert len(prompts[first]) == 500 + 300 + 60


def test_session_cap_leaves_room_in_the_bench_engines_context() -> None:
    assert load_builtin("local-cpu-2x").engine.max_model_len > SESSION_MAX_PROMPT_TOKENS


def test_short_runs_keep_the_growing_sessions() -> None:
    prompts = agent_sessions(random.Random(7), 5)  # 20 turns: no session reaches the cap
    for turn in range(6, len(prompts)):
        assert prompts[turn][: len(prompts[turn - 6])] == prompts[turn - 6]
