"""``zumik bench routing --api chat``: the workloads as ``/v1`` chat requests, the agent shape.

Each token-id prompt becomes a conversation (``chat_form``): its first ``SYSTEM_TOKENS`` ids (the
workload's shared block: the tools, the group's prefix) decoded as the system message, then
chunks of ``CHAT_TURN_TOKENS`` ids decoded as an assistant's answer and the user's next message
(a chunk's messages are fixed by its place, so a session's next turn repeats its previous
turn's messages and continues them). The ids
the ideal and the sessions' order are computed from are the engine's own for the conversation
(``HfChatTokenizer.encode_engine_chat``, equal to vLLM's renderer): what vLLM prefills.

Arm ``zumik-text-chat`` is the ``zumik`` arm with text keys for chat, as every chat prompt was
keyed before: its engines' ``vllm_args`` set ``chat_template_content_format: string``, which is
what vLLM detects for the tiny model's template anyway (the engines render the same), and with
which the gateway does not rebuild chat prompts (``engines/vllm_args.py``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx

from zumik_serve.providers.sse import sse_lines

SYSTEM_TOKENS = {"shared_prefix": 1400, "agent_sessions": 500}  # a workload's shared block
CHAT_TURN_TOKENS = 60
TEXT_CHAT_ARM = "zumik-text-chat"
TEXT_CHAT_VLLM_ARGS = {"chat_template_content_format": "string"}

Messages = list[dict[str, str]]


def chat_form(prompt: list[int], decode: Any, *, system_tokens: int) -> Messages:
    """``prompt`` as a conversation (``decode``: ids to text, the model's tokenizer's): the
    system message, a user message of the first chunk, then each next chunk as an assistant's
    answer (its first half) and the user's next message, so that a turn ends with the user's
    message and the next turn continues it with the answer (its ids extend the turn's)."""
    messages = [{"role": "system", "content": decode(prompt[:system_tokens])}] if system_tokens else []
    half = CHAT_TURN_TOKENS // 2
    for index, start in enumerate(range(system_tokens, len(prompt), CHAT_TURN_TOKENS)):
        chunk = prompt[start : start + CHAT_TURN_TOKENS]
        if index and len(chunk) > half:
            messages.append({"role": "assistant", "content": decode(chunk[:half])})
            chunk = chunk[half:]
        messages.append({"role": "user", "content": decode(chunk)})
    return messages


def chat_workloads(
    workloads: dict[str, list[list[int]]], model_dir: Path
) -> dict[str, tuple[list[Messages], list[list[int]]]]:
    """Each workload's conversations, and the token ids vLLM builds from each."""
    from zumik_serve.engines.hf_tokenizer import HfChatTokenizer
    from zumik_serve.engines.vllm_args import chat_content_format

    tokenizer = HfChatTokenizer(model_dir, chat_content_format=chat_content_format(model_dir, {}))
    decode = tokenizer._tokenizer.decode
    result: dict[str, tuple[list[Messages], list[list[int]]]] = {}
    for name, prompts in workloads.items():
        chats = [chat_form(prompt, decode, system_tokens=SYSTEM_TOKENS.get(name, 0)) for prompt in prompts]
        ids = [tokenizer.encode_engine_chat({"messages": chat}) for chat in chats]
        result[name] = (chats, [list(i) for i in ids if isinstance(i, list)])
        if len(result[name][1]) != len(chats):
            raise RuntimeError(f"{name}: a conversation the gateway does not rebuild")
    return result


async def stream_chat(
    client: httpx.AsyncClient, model: str, messages: Messages, *, what: str, max_tokens: int = 2
) -> tuple[float, int]:
    """One streamed ``/v1/chat/completions``: time to the first chunk with a choice (ms) and
    ``cached_tokens`` from the usage chunk."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens}
    return await stream_first_chunk(client, "/v1/chat/completions", body, what=what)


async def stream_first_chunk(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], *, what: str
) -> tuple[float, int]:
    """One streamed generation of ``body`` at ``path`` (greedy, with usage): time to the first
    chunk with a choice (ms) and ``cached_tokens`` from the usage chunk."""
    body = {**body, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first: float | None = None
    cached = 0
    async with client.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{what}: {response.status_code} {await response.aread()!r}")
        async for line in sse_lines(response.aiter_bytes()):
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk.get("choices"):
                first = time.perf_counter() - started
            usage = chunk.get("usage")
            if usage:
                cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    return (first if first is not None else time.perf_counter() - started) * 1000, cached
