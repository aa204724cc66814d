"""FakeEngine: the one stand-in engine of the in-process tests, on the real ``EngineClient``
protocol (``zumik_serve/engines/protocol.py``).

It answers like vLLM's OpenAI serving layer does (the same body and chunk shapes, usage with
``prompt_tokens_details.cached_tokens``), deterministically: the reply is ``reply`` (or a fixed
sentence), the prompt's token count is its length in characters // 4, and ``cached_tokens`` is
what ``cached_tokens`` says. What the real engine does (KV, sampling, tokenization) is tested
against vLLM in ``tests/integration``; this stand-in is for the request path around it.

Scripting a failure: ``engine.fail_next(EngineFailure(...))`` answers the next call with that
failure before any output; ``engine.fail_next(ConnectionError())`` raises (an unreachable
replica); ``engine.break_stream_after(n)`` ends the next stream with an error after ``n`` chunks;
``engine.hold = asyncio.Event()`` keeps calls waiting until it is set.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from zumik_serve.engines.protocol import (
    EngineCall,
    EngineChunks,
    EngineEvent,
    EngineFailure,
    EngineResponse,
    ReplicaAssigned,
)

DEFAULT_REPLY = "Fluent nonsense from a fake engine."
CREATED_S = 1_767_225_600


@dataclass
class FakeEngine:
    replica_id: str = "fake-r0"
    reply: str = DEFAULT_REPLY
    cached_tokens: int = 0
    calls: list[tuple[EngineCall, dict[str, Any]]] = field(default_factory=list)
    hold: asyncio.Event | None = None  # set: calls wait for it before answering
    _failures: deque[EngineFailure | Exception] = field(default_factory=deque)
    _break_after: int | None = None

    def fail_next(self, failure: EngineFailure | Exception) -> None:
        self._failures.append(failure)

    def break_stream_after(self, chunks: int) -> None:
        self._break_after = chunks

    @property
    def bodies(self) -> list[dict[str, Any]]:
        return [body for _, body in self.calls]

    async def complete(self, call: EngineCall, body: dict[str, Any]) -> list[EngineEvent]:
        return [event async for event in self._events(call, body, stream=False)]

    def generate(self, call: EngineCall, body: dict[str, Any]) -> AsyncIterator[EngineEvent]:
        return self._events(call, body, stream=True)

    async def _events(
        self, call: EngineCall, body: dict[str, Any], *, stream: bool
    ) -> AsyncIterator[EngineEvent]:
        self.calls.append((call, body))
        if self.hold is not None:
            await self.hold.wait()
        if self._failures:
            failure = self._failures.popleft()
            if isinstance(failure, Exception):
                raise failure
            yield ReplicaAssigned(self.replica_id)
            yield failure
            return
        yield ReplicaAssigned(self.replica_id)
        if not stream:
            yield EngineResponse(self._answer(call, body))
            return
        payloads = self._chunks(call, body)
        if self._break_after is not None:
            cut, self._break_after = self._break_after, None
            error = {"error": {"message": "engine died", "type": "server_error", "code": 500}}
            payloads = [*payloads[:cut], json.dumps(error)]
        for payload in payloads:
            yield EngineChunks((payload,))

    def _usage(self, body: dict[str, Any], completion_tokens: int) -> dict[str, Any]:
        prompt_tokens = max(1, len(json.dumps(body.get("messages") or body.get("prompt"))) // 4)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": min(self.cached_tokens, prompt_tokens)},
        }

    def _answer(self, call: EngineCall, body: dict[str, Any]) -> dict[str, Any]:
        usage = self._usage(body, len(self.reply.split()))
        if call is EngineCall.CHAT:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": self.reply, "refusal": None, "tool_calls": []},
                "logprobs": None,
                "finish_reason": "stop",
                "stop_reason": None,
            }
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": self.reply, "logprobs": None, "finish_reason": "stop"}
            kind = "text_completion"
        return {
            "id": f"cmpl-fake-{len(self.calls)}",
            "object": kind,
            "created": CREATED_S,
            "model": body.get("model"),
            "choices": [choice],
            "usage": usage,
            "prompt_logprobs": None,  # a vLLM extension: the gateway must drop it
            "kv_transfer_params": None,
        }

    def _chunks(self, call: EngineCall, body: dict[str, Any]) -> list[str]:
        words = self.reply.split(" ")
        ident = f"chatcmpl-fake-{len(self.calls)}"
        chunks = []
        for index, word in enumerate(words):
            text = word if index == 0 else " " + word
            last = index == len(words) - 1
            if call is EngineCall.CHAT:
                delta: dict[str, Any] = {"content": text}
                if index == 0:
                    delta["role"] = "assistant"
                choice: dict[str, Any] = {
                    "index": 0,
                    "delta": delta,
                    "finish_reason": "stop" if last else None,
                }
            else:
                choice = {"index": 0, "text": text, "finish_reason": "stop" if last else None}
            chunks.append(
                {"id": ident, "created": CREATED_S, "model": body.get("model"), "choices": [choice]}
            )
        options = body.get("stream_options") or {}
        if options.get("include_usage"):
            usage = self._usage(body, len(words))
            chunks.append(
                {"id": ident, "created": CREATED_S, "model": body.get("model"), "choices": [], "usage": usage}
            )
        return [*(json.dumps(chunk) for chunk in chunks), "[DONE]"]
