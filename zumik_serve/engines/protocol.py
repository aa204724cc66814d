"""What an engine replica sends back to the gateway, as plain frozen values.

One call produces this ordered stream of events (each is pickled across the Ray handle):

    ReplicaAssigned             always first: which replica took the call (for x-zumik-route)
    then exactly one of:
      EngineFailure             the call failed before any output (a real HTTP status)
      EngineResponse            a whole non-streaming response body
      EngineChunks*             streaming: batches of SSE ``data:`` payloads, in order; the last
                                payload of a finished stream is ``[DONE]``; a payload holding
                                ``{"error": ...}`` is a failure after output began

Bodies are the engine's own JSON (vLLM's OpenAI protocol objects, dumped); the gateway renders
them to the official OpenAI schema. No framework types cross this boundary.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol


class EngineCall(StrEnum):
    CHAT = "chat"
    COMPLETION = "completion"


@dataclass(frozen=True)
class ReplicaAssigned:
    replica_id: str


@dataclass(frozen=True)
class EngineResponse:
    body: dict[str, Any]


@dataclass(frozen=True)
class EngineChunks:
    payloads: tuple[str, ...]


@dataclass(frozen=True)
class EngineFailure:
    status: int
    message: str
    type: str = "server_error"
    param: str | None = None
    code: str | None = None
    outcome: str | None = None  # a routing.retry.AttemptOutcome value, when the route knows it
    retry_after_s: int | None = None


EngineEvent = ReplicaAssigned | EngineResponse | EngineChunks | EngineFailure


class EngineClient(Protocol):
    """Starts one call on some engine replica and streams its events (the order above).

    Implementations: ``engines/ray_client.py`` (a Serve handle), ``engines/replica.py``'s
    in-process client (the colocated placement), ``providers/engine_client.py`` (a managed or
    BYOK route over HTTP). An implementation may raise when no replica can take the call; the
    dispatcher turns that into a 503.
    """

    def generate(self, call: EngineCall, body: dict[str, Any]) -> AsyncIterator[EngineEvent]: ...

    async def complete(self, call: EngineCall, body: dict[str, Any]) -> list[EngineEvent]:
        """A non-streaming call: all of its events at once (one round trip)."""
        ...


def parse_stream_error(payload: str) -> dict[str, Any] | None:
    """The error object of an in-stream ``{"error": ...}`` payload, else None."""
    if not payload.startswith('{"error"'):
        return None
    try:
        data = json.loads(payload)
    except json.JSONDecodeError:
        return None
    error = data.get("error")
    return error if isinstance(error, dict) else None
