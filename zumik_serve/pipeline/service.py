"""The gateway's service: authenticate, start a call, turn engine failures into errors.

API handlers call only this. It knows nothing of HTTP or Ray: a call is decided and carried out
by a ``Dispatch`` (``dispatch.py``), which reaches engines through the ``EngineClient`` protocol
(a Ray Serve handle in production, see ``engines/ray_client.py``) and providers over HTTP;
tenants come through ``tenancy.Authenticator``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from zumik_serve.engines.protocol import (
    EngineCall,
    EngineChunks,
    EngineEvent,
    EngineFailure,
    EngineResponse,
)
from zumik_serve.errors import (
    AuthenticationError,
    ContextLengthExceededError,
    EngineError,
    InvalidRequestError,
    ZumikError,
)
from zumik_serve.ids import DecisionId
from zumik_serve.state.compiler import ChatTokenizer
from zumik_serve.tenancy.tenant import Authenticator, Tenant, TenantId, cache_salt


class EngineClient(Protocol):
    """Starts one call on some engine replica and streams its events (``engines/protocol.py``).

    Raises ``EngineError`` when no replica can take the call.
    """

    def generate(self, call: EngineCall, body: dict[str, Any]) -> AsyncIterator[EngineEvent]: ...

    async def complete(self, call: EngineCall, body: dict[str, Any]) -> list[EngineEvent]:
        """A non-streaming call: all of its events at once (one round trip)."""
        ...


@dataclass(frozen=True)
class ModelCard:
    id: str
    created_s: int
    owned_by: str = "zumik"


@dataclass
class EngineRun:
    """A started call whose first output is known to be good (errors were raised before)."""

    decision_id: DecisionId
    replica_id: str
    first: EngineResponse | EngineChunks
    rest: AsyncIterator[EngineEvent]
    route_label: str | None = None  # x-zumik-route: byoc:<replica>, managed:<route>, byok:<route>
    route_name: str = "local"  # the profile's route that served it
    route_kind: str = "byoc"
    scope: str = ""  # the isolation scope of the request's cache salt (``kvstore.keys.scope_id``)
    prefix_keys: tuple[str, ...] = ()  # the scheduler's prefix keys of the prompt
    timing_ms: dict[str, float] | None = None  # where the time went before the first output

    @property
    def route(self) -> str:
        return self.route_label or f"byoc:{self.replica_id}"

    def kv_report(self) -> dict[str, Any] | None:
        """What the engine's KV connector says this request got from caches (``zumik_kv`` of
        ``kvstore/connector.py``): BYOC, non-streamed answers only; None otherwise."""
        if self.route_kind != "byoc" or not isinstance(self.first, EngineResponse):
            return None
        params = self.first.body.get("kv_transfer_params")
        report = params.get("zumik_kv") if isinstance(params, dict) else None
        return report if isinstance(report, dict) else None

    def restore_timing(self) -> tuple[float, str] | None:
        """The tier restore of this request for ``Server-Timing``: (ms, description)."""
        report = self.kv_report()
        tiers = report.get("tiers") if report is not None else None
        if not isinstance(tiers, dict) or not any(tiers.values()):
            return None
        assert report is not None
        parts = [f"{tier} {tokens} tokens" for tier, tokens in sorted(tiers.items()) if tokens]
        if isinstance(report.get("bytes"), int):
            parts.append(f"{report['bytes']} bytes")
        ms = report.get("ms")
        return (float(ms) if isinstance(ms, int | float) else 0.0), ", ".join(parts)


class Dispatch(Protocol):
    """Decides a request's route and starts it there (``dispatch.Dispatcher``)."""

    async def start(
        self,
        call: EngineCall,
        engine_body: dict[str, Any],
        *,
        stream: bool,
        tenant: str,
        salt: str,
        context: Any,
    ) -> EngineRun: ...


class GatewayService:
    def __init__(
        self,
        *,
        models: list[ModelCard],
        authenticator: Authenticator,
        dispatcher: Dispatch,
        tokenizer_factory: Callable[[], ChatTokenizer] | None = None,
        salt_secret: Callable[[], Awaitable[bytes]] | None = None,
        salt_epoch: Callable[[TenantId], Awaitable[int]] | None = None,
    ) -> None:
        self.models = models
        self.served_model_ids = {model.id for model in models}
        self._authenticator = authenticator
        self.dispatcher = dispatcher
        self._tokenizer_factory = tokenizer_factory
        self._tokenizer: ChatTokenizer | None = None
        self._salt_secret_source = salt_secret
        self._salt_secret: bytes | None = None
        self._salt_epoch = salt_epoch

    async def cache_salt_for(self, tenant: Tenant) -> str:
        """The tenant's cache salt (what the engines mix into block hashes), at the tenant's
        current salt epoch: read on every call, because a purge on any gateway moves it on and
        the cache made before must be unreachable from then on."""
        epoch = 0 if self._salt_epoch is None else await self._salt_epoch(tenant.id)
        return cache_salt(await self.salt_secret(), tenant.id, epoch)

    async def salt_secret(self) -> bytes:
        if self._salt_secret is None:
            if self._salt_secret_source is None:
                raise EngineError("this gateway has no cache-salt secret configured", status=500)
            self._salt_secret = await self._salt_secret_source()
        return self._salt_secret

    def tokenizer(self) -> ChatTokenizer:
        """The served model's tokenizer and chat template (loaded on first use)."""
        if self._tokenizer is None:
            if self._tokenizer_factory is None:
                raise EngineError("this gateway has no tokenizer for the served model", status=501)
            self._tokenizer = self._tokenizer_factory()
        return self._tokenizer

    async def authenticate(self, authorization: str | None) -> Tenant:
        tenant = await self._authenticator.authenticate(authorization)
        if tenant is None:
            raise AuthenticationError(
                "Missing or invalid API key. Send 'Authorization: Bearer <key>'; create a key "
                "with `zumik tenant create NAME`."
            )
        return tenant

    async def start(
        self,
        call: EngineCall,
        engine_body: dict[str, Any],
        *,
        stream: bool,
        tenant: Tenant,
        context: Any = None,
    ) -> EngineRun:
        """Decide the route of the call for ``tenant`` and start it; failures before the first
        output are raised. Engine requests carry the tenant's server-side cache salt."""
        from zumik_serve.routing.dispatch import RouteContext

        salt = await self.cache_salt_for(tenant)
        engine_body = {**engine_body, "cache_salt": salt}
        return await self.dispatcher.start(
            call, engine_body, stream=stream, tenant=tenant.id, salt=salt, context=context or RouteContext()
        )


def error_for_failure(failure: EngineFailure, call: EngineCall) -> ZumikError:
    """Map an engine failure (before any output) to the error a client sees."""
    message = failure.message
    lowered = message.lower()
    if failure.status == 400 and (
        "context length" in lowered or "maximum model length" in lowered or "max_model_len" in lowered
    ):
        param = "messages" if call is EngineCall.CHAT else "prompt"
        return ContextLengthExceededError(f"{message} Shorten the {param} or lower max_tokens.", param=param)
    if 400 <= failure.status < 500:
        return InvalidRequestError(message, param=failure.param, status=failure.status)
    return EngineError(
        f"The engine failed before producing output ({message}). Retry the request; if it "
        "keeps failing, check the server logs.",
        status=failure.status if failure.status >= 500 else 500,
    )


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
