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

from dataclasses import dataclass
from enum import StrEnum
from typing import Any


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
