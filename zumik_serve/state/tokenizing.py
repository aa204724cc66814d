"""Tokenizing off the event loop, bounded in size and in threads.

Tokenizing a snapshot or a /v2 prompt is CPU work of up to seconds (the chat template, then the
tokenizer). On the event loop it would stall every other request of the gateway process, and in
the colocated placement every stream of the engine replica too. ``Tokenization.run`` checks the
size of the text first (a 413 beyond ``gateway.max_tokenize_bytes``, before any work), then runs
the work on a thread pool of its own: the loop keeps serving while it runs, and at most
``threads`` tokenizations run at once (the rest wait in the pool's queue, which admission
bounds: only admitted requests tokenize). A tokenization whose request is cancelled (deadline,
client gone) is dropped if it has not started and finishes unobserved if it has.

``engine_chat`` is the one use that never fails a request: a /v1 chat prompt's token ids, only
to key its prefix (``engines/chat_prompt.py``); past the limit, or on any failure, it returns
the reason instead (the prompt then keeps text keys).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from profiles.model import GatewaySpec
from zumik_serve.engines.chat_prompt import ChatFallback
from zumik_serve.errors import PayloadTooLargeError
from zumik_serve.state.compiler import ChatTokenizer, CompiledSnapshot, Message, compile_messages

logger = logging.getLogger("ray.serve")

TOKENIZER_THREADS = 2  # tokenizations at once per gateway process (each holds a core)
T = TypeVar("T")


class Tokenization:
    def __init__(self, max_bytes: int, *, threads: int = TOKENIZER_THREADS) -> None:
        self.max_bytes = max_bytes
        self._threads = threads
        self._pool: ThreadPoolExecutor | None = None  # started on first use

    def check(self, messages: Sequence[Message]) -> int:
        """The bytes of text in ``messages``; a 413 when above ``max_bytes``."""
        size = message_bytes(messages)
        if size > self.max_bytes:
            raise PayloadTooLargeError(
                f"The text to tokenize for this request is {size} bytes (a snapshot's content and "
                f"the request's messages together), above this server's limit of {self.max_bytes} "
                "bytes. Use a smaller snapshot or shorter input.",
                code="prompt_too_large",
            )
        return size

    async def run(self, messages: Sequence[Message], work: Callable[[], T]) -> T:
        """``work()`` (which tokenizes ``messages``) on the pool, once ``messages`` passed
        ``check``."""
        self.check(messages)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="zumik-tokenize")
        return await asyncio.get_running_loop().run_in_executor(self._pool, work)

    async def encode_chat(
        self, tokenizer: ChatTokenizer, messages: Sequence[Message], *, add_generation_prompt: bool
    ) -> list[int]:
        return await self.run(
            messages, lambda: tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt)
        )

    async def engine_chat(
        self, tokenizer: Callable[[], Any], body: Mapping[str, Any]
    ) -> list[int] | ChatFallback:
        """The token ids vLLM builds from the chat ``body`` (``HfChatTokenizer.encode_engine_chat``
        of ``tokenizer()``, which is loaded in the pool too), or why not: never an error."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
            return ChatFallback.MESSAGE
        if message_bytes(messages) > self.max_bytes:
            return ChatFallback.TOO_LARGE

        def work() -> list[int] | ChatFallback:
            try:
                encode = getattr(tokenizer(), "encode_engine_chat", None)
            except Exception:
                return ChatFallback.NO_TOKENIZER
            if encode is None:  # a tokenizer that does not rebuild vLLM's rendering
                return ChatFallback.NO_TOKENIZER
            try:
                return encode(body)
            except Exception as exc:  # a body no rule here foresaw: its keys only, never the request
                # The error's class only: its message may quote the tenant's prompt.
                logger.warning("zumik: a chat prompt's engine token ids failed (%s); it keeps text keys",
                               type(exc).__name__)  # fmt: skip
                return ChatFallback.RENDER_ERROR

        return await self.run(messages, work)

    async def compile(self, messages: Sequence[Message], tokenizer: ChatTokenizer) -> CompiledSnapshot:
        return await self.run(messages, lambda: compile_messages(messages, tokenizer))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def message_bytes(messages: Sequence[Message]) -> int:
    """The UTF-8 bytes of the messages' contents (a content that is not text: its JSON)."""
    return sum(_content_bytes(message.get("content")) for message in messages)


def _content_bytes(content: Any) -> int:
    if isinstance(content, str):
        return len(content.encode())
    if content is None:
        return 0
    return len(json.dumps(content, ensure_ascii=False).encode())


def default_tokenization() -> Tokenization:
    return Tokenization(GatewaySpec().max_tokenize_bytes)
