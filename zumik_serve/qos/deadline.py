"""Deadlines: a request's ``timeout_s`` (``x-zumik-timeout-s`` on /v1, ``timeout_s`` on /v2).

A deadline counts from the moment the request arrived: time spent queued for admission, deciding,
waiting for the first output and streaming all come out of it. When it passes, the engine's work
is cancelled (the handle call or the provider request is abandoned, which aborts it in vLLM) and
the client gets 504 ``deadline_exceeded``, or, mid-stream, an error event then ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from zumik_serve.errors import DeadlineExceededError, InvalidRequestError, ZumikError

MAX_TIMEOUT_S = 3600.0

T = TypeVar("T")


@dataclass(frozen=True)
class Deadline:
    at: float | None  # time.monotonic() when it passes; None: no deadline

    @classmethod
    def parse(cls, value: Any, *, param: str, started: float) -> Deadline:
        if value is None or value == "":
            return cls(None)
        try:
            seconds = float(value)
        except (TypeError, ValueError, OverflowError):  # OverflowError: an integer past a double
            seconds = float("nan")
        if isinstance(value, bool) or not 0 < seconds <= MAX_TIMEOUT_S:
            raise InvalidRequestError(
                f"{param} must be a number of seconds above 0 and at most {MAX_TIMEOUT_S:.0f}.", param=param
            )
        return cls(started + seconds)

    def left(self) -> float | None:
        return None if self.at is None else max(0.0, self.at - time.monotonic())

    async def run(self, awaitable: Awaitable[T]) -> T:
        """Await ``awaitable`` within the deadline; past it the work is cancelled (504)."""
        if self.at is None:
            return await awaitable
        timer = asyncio.timeout_at(self._loop_time())
        try:
            async with timer:
                return await awaitable
        except TimeoutError:
            raise exceeded() from None
        except ZumikError:  # the work answered its cancellation with an error (vLLM does: 400)
            if timer.expired():
                raise exceeded() from None
            raise

    def _loop_time(self) -> float:
        assert self.at is not None
        return asyncio.get_running_loop().time() + (self.at - time.monotonic())


def exceeded() -> DeadlineExceededError:
    return DeadlineExceededError(
        "The request's deadline (timeout_s) passed before it finished; the work was cancelled. "
        "Retry with a longer timeout, a shorter max_tokens, or a higher QoS class."
    )
