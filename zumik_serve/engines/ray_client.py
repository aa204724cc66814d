"""EngineClient over a Ray Serve handle to the EngineReplica deployment."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from zumik_serve.engines.protocol import EngineCall, EngineEvent


class RayEngineClient:
    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self._stream_handle = handle.options(stream=True)

    async def generate(self, call: EngineCall, body: dict[str, Any]) -> AsyncIterator[EngineEvent]:
        async for event in self._stream_handle.generate.remote(call.value, body):
            yield event

    async def complete(self, call: EngineCall, body: dict[str, Any]) -> list[EngineEvent]:
        return list(await self._handle.complete.remote(call.value, body))
