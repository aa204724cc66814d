"""``zumik bench routing --api chat``'s workloads (``bench/routing_chat.py``).

Invariants held here:
- a workload's conversations keep its shape: the same sessions continue the same earlier turns
  (``previous_turns`` of the engine's ids equals that of the token-id form), and their ids fit
  the bench engines' context (2,048 tokens);
- a conversation ends with the user's message, and the ids are the gateway's rebuilt ones;
- side by side, chat pairs ``zumik`` with the text keys for chat (``zumik-text-chat``) when
  given, completions with ``rr-cache``; both arms get every conversation at once, each under its
  own ``x-zumik-profile``, and the figures, table and plot compare them;
- a result's belief checks are its workload's own (the owner's counts before and after).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from zumik_serve.bench.routing import (
    PAIRED_CPUS_PER_REPLICA,
    ArmResult,
    _sharing_cpus,
    arm_profile,
    chat_sized,
    figures,
    figures_table,
    make_workloads,
    measure_side_by_side,
    plot_routing,
    previous_turns,
    side_by_side_pair,
    with_beliefs,
)
from zumik_serve.bench.routing_chat import TEXT_CHAT_ARM, TEXT_CHAT_VLLM_ARGS, chat_workloads


def test_chat_workloads_keep_their_sessions_and_fit_the_context(tiny_model_dir: Path) -> None:
    workloads = chat_sized(make_workloads(3, 10, 32, None), 3, 10)
    chats = chat_workloads(workloads, tiny_model_dir)
    for name, prompts in workloads.items():
        conversations, ids = chats[name]
        assert len(conversations) == len(ids) == len(prompts)
        assert previous_turns(ids) == previous_turns(prompts), name
        assert max(map(len, ids)) < 2048 - 2
        assert all(conversation[-1]["role"] == "user" for conversation in conversations)
    assert any(turn is not None for turn in previous_turns(chats["agent_sessions"][1]))


def test_chat_pairs_zumik_with_the_text_keys_and_completions_with_serves_balancing() -> None:
    every = ["rr-cache", "zumik", TEXT_CHAT_ARM]
    assert side_by_side_pair(every, chat=True) == (TEXT_CHAT_ARM, "zumik")
    assert side_by_side_pair(every, chat=False) == ("rr-cache", "zumik")  # as before --api chat
    assert side_by_side_pair(["rr-cache", "zumik"], chat=True) == ("rr-cache", "zumik")
    assert side_by_side_pair([TEXT_CHAT_ARM, "zumik"], chat=False) is None
    assert side_by_side_pair([TEXT_CHAT_ARM, "rr-cache"], chat=True) is None  # no zumik arm


def test_the_text_chat_arm_keeps_its_engine_args_and_model_when_sharing_cpus() -> None:
    text, tokens = (
        _sharing_cpus(arm_profile(arm, replicas=3, gateways=2, model_source="builtin:tiny-wide"))
        for arm in (TEXT_CHAT_ARM, "zumik")
    )
    assert text.engine.vllm_args == {**(tokens.engine.vllm_args or {}), **TEXT_CHAT_VLLM_ARGS}
    assert text.model.source == tokens.model.source == "builtin:tiny-wide"
    assert text.engine.cpus_per_replica == tokens.engine.cpus_per_replica == PAIRED_CPUS_PER_REPLICA
    assert text.name != tokens.name  # x-zumik-profile tells them apart


def test_side_by_side_chat_sends_each_conversation_to_both_arms_at_once(tiny_model_dir: Path) -> None:
    """Every conversation reaches both profiles on /v1/chat/completions; a session's turn still
    waits for its previous answer within each arm, and each arm's results are its own."""
    workloads = chat_sized(make_workloads(3, 4, 32, None), 3, 4)
    conversations, prompts = chat_workloads({"agent_sessions": workloads["agent_sessions"]}, tiny_model_dir)[
        "agent_sessions"
    ]
    index_of = {json.dumps(chat): index for index, chat in enumerate(conversations)}
    seen: list[tuple[str, int]] = []
    both_busy = False
    in_flight: set[str] = set()

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal both_busy
        assert request.url.path == "/v1/chat/completions"
        profile = request.headers["x-zumik-profile"]
        seen.append((profile, index_of[json.dumps(json.loads(request.content)["messages"])]))
        in_flight.add(profile)
        await asyncio.sleep(0.005)
        both_busy = both_busy or len(in_flight) == 2
        in_flight.discard(profile)
        cached = 32 if profile == "text" else 64
        usage = {"prompt_tokens_details": {"cached_tokens": cached}}
        chunks = [{"choices": [{"delta": {"content": "x"}}]}, {"choices": [], "usage": usage}]
        body = "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks) + "data: [DONE]\n\n"
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    results = asyncio.run(measure_side_by_side(
        "http://bench", "key", "m", {TEXT_CHAT_ARM: "text", "zumik": "tokens"}, "agent_sessions",
        prompts, block_size=32, concurrency=3, chats=conversations,
        transport=httpx.MockTransport(handler),
    ))  # fmt: skip
    assert [r.arm for r in results] == [TEXT_CHAT_ARM, "zumik"]
    assert all(r.side_by_side and r.arrival == "closed" for r in results)
    assert [r.cached_tokens for r in results] == [32 * len(prompts), 64 * len(prompts)]
    assert both_busy  # the arms ran at the same time, not one after the other
    after = previous_turns(prompts)
    assert any(previous is not None for previous in after)
    for profile in ("text", "tokens"):
        order = [index for name, index in seen if name == profile]
        assert sorted(order) == list(range(len(prompts)))
        for index in order:
            previous = after[index]
            assert previous is None or order.index(previous) < order.index(index)


def test_side_by_side_chat_results_give_the_figures_against_the_text_keys(tmp_path: Path) -> None:
    def arm(name: str, *, cached: int, p90: float, paired: bool) -> ArmResult:
        return ArmResult(name, "shared_prefix", 10, 1000, cached, 900, 10.0, p90, 4.0, side_by_side=paired)

    results = [
        arm(TEXT_CHAT_ARM, cached=700, p90=90.0, paired=False),
        arm("zumik", cached=880, p90=45.0, paired=False),
        arm(TEXT_CHAT_ARM, cached=600, p90=60.0, paired=True),
        arm("zumik", cached=890, p90=50.0, paired=True),
    ]
    rows = figures(results, baseline=TEXT_CHAT_ARM)["shared_prefix"]
    assert rows["ttft_p90_ratio"] == pytest.approx(2.0)
    assert rows["ttft_p90_ratio_side_by_side"] == pytest.approx(1.2)
    assert figures(results)["shared_prefix"]["ttft_p90_ratio_side_by_side"] is None  # no rr-cache arm
    summary = {"baseline": TEXT_CHAT_ARM, "figures": {"shared_prefix": rows}, "scaling": None}
    assert figures_table(summary).title == f"Zumik against {TEXT_CHAT_ARM}, same run"
    plot_routing({"results": [result.to_json() for result in results]}, tmp_path / "routing.png")
    assert (tmp_path / "routing.png").read_bytes()[:4] == b"\x89PNG"


def test_belief_checks_are_counted_per_workload_and_absent_without_an_owner() -> None:
    result = ArmResult("zumik", "agent_sessions", 10, 1000, 500, 900, 10.0, 20.0, 4.0)
    before = {"belief_checked": 40, "belief_wrong": 3, "engine_events": 9}
    after = {"belief_checked": 120, "belief_wrong": 10, "engine_events": 30}
    counted = with_beliefs(result, before, after)
    assert (counted.belief_checked, counted.belief_wrong) == (80, 7)
    assert counted.to_json()["belief_wrong"] == 7
    assert with_beliefs(result, None, None) == result  # an arm without an owner
    assert result.belief_checked is None
