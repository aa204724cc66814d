"""ProviderEngineClient: a managed or BYOK route behind the gateway's ``EngineClient`` protocol.

The gateway renders every route's output the same way, so a provider's OpenAI JSON is passed on
as engine events (``engines/protocol.py``): a whole body as ``EngineResponse``, a stream as
``EngineChunks``, a failure before output as ``EngineFailure`` carrying the attempt outcome and
``Retry-After`` for the retry policy. A provider's 401/403/407 says the provider refused the key
Zumik sent (the operator's managed key or the tenant's stored BYOK key), never that the caller's
Zumik key is wrong: it becomes a 502 ``provider_auth_failed`` failure of the route (an
``auth_error`` attempt, which falls back to the next route and counts against its breaker), so
no tenant is ever told "invalid API key" because of a provider. The body sent is the checked
/v1 body with the route's model, Zumik's ``prompt_cache_key`` (derived per tenant scope, so it
never links tenants at the provider), the request's provider hints that the route may get
(``providers/hints.py``), on a managed route the client's ``user`` and ``safety_identifier`` as
pseudonyms of the tenant's (``pseudonymous_user``), and no engine-only field.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import AsyncIterator, Mapping
from typing import Any

from zumik_serve.engines.protocol import (
    EngineCall,
    EngineChunks,
    EngineEvent,
    EngineFailure,
    EngineResponse,
    ReplicaAssigned,
)
from zumik_serve.providers.openai_http import OpenAICompatProvider, ProviderFailure, ProviderOutcome

ENGINE_ONLY_FIELDS = frozenset({"cache_salt"})
USER_ID_FIELDS = ("user", "safety_identifier")  # a client's end-user ids: pseudonyms on managed routes
FAILURE_STATUS = {
    ProviderOutcome.RATE_LIMITED: 429,
    ProviderOutcome.SERVER_ERROR: 502,
    ProviderOutcome.TIMEOUT: 504,
    ProviderOutcome.CONNECT_ERROR: 503,
}
PROVIDER_AUTH_STATUSES = frozenset({401, 403, 407})  # the provider refused the credentials sent
AUTH_ERROR_OUTCOME = "auth_error"  # routing.retry.AttemptOutcome.AUTH_ERROR (providers import no routing)


def provider_body(
    engine_body: dict[str, Any],
    *,
    model: str,
    prompt_cache_key: str,
    user_salt: str | None = None,
    hints: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The body a provider gets: the engine body, then ``hints`` (``ProviderHints.for_route``).
    With ``user_salt`` (a managed route: Zumik's own account, every tenant's requests under it),
    the client's ``user`` and ``safety_identifier`` go as ``pseudonymous_user``."""
    body = {key: value for key, value in engine_body.items() if key not in ENGINE_ONLY_FIELDS}
    body.update(hints or {})
    if user_salt is not None:
        for name in USER_ID_FIELDS:
            if isinstance(body.get(name), str):
                body[name] = pseudonymous_user(user_salt, body[name])
    return {**body, "model": model, "prompt_cache_key": prompt_cache_key}


def pseudonymous_user(salt: str, user: str) -> str:
    """A client's end-user id as a managed provider sees it: a keyed hash under the tenant's cache
    salt, stable for that tenant and user (the provider's abuse tracking still tells its users
    apart), never the id itself, and never the same for two tenants' equal ids (one tenant's
    "user-1" is not another's to the provider)."""
    digest = hmac.new(salt.encode(), b"zumik-user/1\x1f" + user.encode(), hashlib.sha256)
    return "zu-" + digest.hexdigest()[:32]


class ProviderEngineClient:
    """One call's view of a provider route (the key is the route's or the tenant's)."""

    def __init__(self, provider: OpenAICompatProvider, *, label: str, model: str, api_key: str,
                 prompt_cache_key: str, user_salt: str | None = None,
                 hints: Mapping[str, Any] | None = None) -> None:  # fmt: skip
        """``user_salt``: the tenant's cache salt on a managed route; ``hints``: the request's
        provider hints this route gets (``provider_body``)."""
        self._user_salt = user_salt
        self._hints = hints
        self._provider = provider
        self._label = label
        self._model = model
        self._api_key = api_key
        self._cache_key = prompt_cache_key

    def __repr__(self) -> str:
        return f"ProviderEngineClient({self._label!r}, api_key=<redacted>)"

    async def generate(self, call: EngineCall, body: dict[str, Any]) -> AsyncIterator[EngineEvent]:
        yield ReplicaAssigned(self._label)
        payloads = self._provider.stream(_path(call), self._body(body), api_key=self._api_key)
        try:
            async for payload in payloads:
                yield EngineChunks((payload,))
        except ProviderFailure as failure:
            yield _failure(failure, self._label)

    async def complete(self, call: EngineCall, body: dict[str, Any]) -> list[EngineEvent]:
        try:
            reply = await self._provider.complete(_path(call), self._body(body), api_key=self._api_key)
        except ProviderFailure as failure:
            return [ReplicaAssigned(self._label), _failure(failure, self._label)]
        return [ReplicaAssigned(self._label), EngineResponse(reply.body)]

    def _body(self, body: dict[str, Any]) -> dict[str, Any]:
        return provider_body(
            body, model=self._model, prompt_cache_key=self._cache_key, user_salt=self._user_salt,
            hints=self._hints,
        )  # fmt: skip


def _path(call: EngineCall) -> Any:
    return "/chat/completions" if call is EngineCall.CHAT else "/completions"


def _failure(failure: ProviderFailure, route: str) -> EngineFailure:
    if failure.status in PROVIDER_AUTH_STATUSES:
        return EngineFailure(
            status=502,
            message=(
                f"the provider of route '{route}' refused the credentials Zumik sent it (HTTP "
                f"{failure.status}); your Zumik API key is valid. A managed route needs its operator "
                f"to fix the route's key; for a BYOK route, store a working key with PUT /v2/byok/{route}"
            ),
            code="provider_auth_failed",
            outcome=AUTH_ERROR_OUTCOME,
        )
    status = failure.status if failure.status is not None else FAILURE_STATUS.get(failure.outcome, 502)
    return EngineFailure(
        status=status,
        message=failure.message,
        type="invalid_request_error" if 400 <= status < 500 and status != 429 else "server_error",
        code=failure.outcome.value,
        outcome=failure.outcome.value,
        retry_after_s=failure.retry_after_s,
    )
