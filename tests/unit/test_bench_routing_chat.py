"""``zumik bench routing --api chat``'s workloads (``bench/routing_chat.py``).

Invariants held here:
- a workload's conversations keep its shape: the same sessions continue the same earlier turns
  (``previous_turns`` of the engine's ids equals that of the token-id form), and their ids fit
  the bench engines' context (2,048 tokens);
- a conversation ends with the user's message, and the ids are the gateway's rebuilt ones.
"""

from __future__ import annotations

from pathlib import Path

from zumik_serve.bench.routing import chat_sized, make_workloads, previous_turns
from zumik_serve.bench.routing_chat import chat_workloads


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
