"""EngineReplica: one vLLM engine under Ray Serve (``ray.serve.llm.LLMServer``), speaking events.

It adds one method to ``LLMServer``: ``generate(call, body)``, which validates the body with
vLLM's own protocol models, runs it through vLLM's OpenAI serving layer, and yields the values
of ``engines/protocol.py``. Failures inside the engine become ``EngineFailure`` events (before
output) or an ``{"error": ...}`` payload (after output began), never an exception that would
reach the gateway as a bare 500.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from pydantic import ValidationError
from ray import serve
from ray.serve.llm import LLMServer

from zumik_serve.engines.protocol import (
    EngineCall,
    EngineChunks,
    EngineEvent,
    EngineFailure,
    EngineResponse,
    ReplicaAssigned,
)


class EngineReplica(LLMServer):
    async def complete(self, call: str, body: dict[str, Any]) -> list[EngineEvent]:
        """A non-streaming call as one unary reply: cheaper over a handle than a stream."""
        return [event async for event in self.generate(call, body)]

    async def generate(self, call: str, body: dict[str, Any]) -> AsyncGenerator[EngineEvent, None]:
        yield ReplicaAssigned(replica_id=_replica_id())
        from vllm.exceptions import VLLMClientError

        try:
            request = _parse_request(EngineCall(call), body)
        except ValidationError as exc:
            yield _validation_failure(exc)
            return
        except VLLMClientError as exc:  # vLLM's own checks (not a ValueError: pydantic lets it out)
            yield _client_failure(exc)
            return
        try:
            method = self.chat if call == EngineCall.CHAT else self.completions
            stream = await method(request)
            async for item in stream:
                items = item if isinstance(item, list | tuple) else [item]
                payloads = tuple(_sse_payload(part) for part in items if isinstance(part, str))
                if payloads:
                    yield EngineChunks(payloads=payloads)
                for part in items:
                    if isinstance(part, str):
                        continue
                    if hasattr(part, "error"):
                        yield _error_failure(part.error)
                        return
                    yield EngineResponse(body=part.model_dump(mode="json"))
        except VLLMClientError as exc:  # the request is wrong: a 400, not an engine failure
            yield _client_failure(exc)
        except Exception as exc:  # the engine failed; the gateway decides what the client sees
            yield EngineFailure(status=500, message=f"engine failure: {type(exc).__name__}: {exc}")


class InProcessEngineClient:
    """EngineClient over the replica this code runs in (no handle, no serialization)."""

    def __init__(self, replica: EngineReplica) -> None:
        self._replica = replica

    def generate(self, call: EngineCall, body: dict[str, Any]) -> AsyncGenerator[EngineEvent, None]:
        return self._replica.generate(call.value, body)

    async def complete(self, call: EngineCall, body: dict[str, Any]) -> list[EngineEvent]:
        return await self._replica.complete(call.value, body)


def _parse_request(call: EngineCall, body: dict[str, Any]) -> Any:
    if call is EngineCall.CHAT:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        return ChatCompletionRequest.model_validate(body)
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    return CompletionRequest.model_validate(body)


def _error_failure(error: Any) -> EngineFailure:
    code = error.code
    return EngineFailure(
        status=int(code) if str(code).isdigit() else 500,
        message=error.message,
        type=error.type,
        param=error.param,
    )


def _validation_failure(exc: ValidationError) -> EngineFailure:
    first = exc.errors()[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    message = first["msg"]
    if param:
        message = f"Invalid value for '{param}': {message}"
    return EngineFailure(status=400, message=message, type="invalid_request_error", param=param)


def _client_failure(exc: Exception) -> EngineFailure:
    """vLLM's verdict on a bad request, without the rejected value (never echo the input)."""
    param = getattr(exc, "parameter", None)
    message = str(exc.args[0]) if exc.args else "The request is invalid."
    return EngineFailure(status=400, message=message[:500], type="invalid_request_error", param=param)


def _sse_payload(line: str) -> str:
    payload = line.strip()
    if payload.startswith("data:"):
        payload = payload[len("data:") :].strip()
    return payload


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return "unknown"
