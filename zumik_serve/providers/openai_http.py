"""A thin httpx adapter to one OpenAI-compatible provider: send a body, get a reply or a failure.

Rule kept here: every way a call can go wrong ends as one ``ProviderFailure`` with an outcome the
router can act on (retry elsewhere, back off, give up), and no failure message carries the API
key. Bodies pass through unchanged: the caller has already built a clean OpenAI body.

    outcome         when
    rate_limited    HTTP 429 (``retry_after_s`` from Retry-After when the provider sent one)
    server_error    HTTP 5xx, a non-JSON 2xx body, a connection dropped mid-response, a stream
                    that ends before ``[DONE]``
    timeout         no answer (or no next stream chunk) within ``timeout_s``; HTTP 408
    connect_error   no connection (refused, DNS, connect timeout): the request never arrived
    client_error    any other 4xx (bad key, bad body): retrying the same request will not help
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import Any, Literal, get_args

import httpx

from zumik_serve.providers.sse import sse_lines

ProviderPath = Literal["/chat/completions", "/completions"]
PROVIDER_PATHS: frozenset[str] = frozenset(get_args(ProviderPath))
MAX_MESSAGE_CHARS = 500


class ProviderOutcome(StrEnum):
    OK = "ok"
    RATE_LIMITED = "rate_limited"
    SERVER_ERROR = "server_error"
    TIMEOUT = "timeout"
    CONNECT_ERROR = "connect_error"
    CLIENT_ERROR = "client_error"


class ProviderFailure(Exception):
    """A call that did not produce a usable reply. Read-only after construction.

    ``status`` is the provider's HTTP status, None when no response arrived (timeout, connect
    error, a stream broken mid-body). ``retry_after_s`` is the provider's Retry-After in whole
    seconds, None when it sent none. ``message`` says what happened, never with the API key.
    """

    __slots__ = ("_outcome", "_status", "_retry_after_s", "_message")

    def __init__(
        self, outcome: ProviderOutcome, status: int | None, retry_after_s: int | None, message: str
    ) -> None:
        super().__init__(message)
        self._outcome = outcome
        self._status = status
        self._retry_after_s = retry_after_s
        self._message = message

    @property
    def outcome(self) -> ProviderOutcome:
        return self._outcome

    @property
    def status(self) -> int | None:
        return self._status

    @property
    def retry_after_s(self) -> int | None:
        return self._retry_after_s

    @property
    def message(self) -> str:
        return self._message

    def __repr__(self) -> str:
        return (
            f"ProviderFailure(outcome={self._outcome.value!r}, status={self._status!r}, "
            f"retry_after_s={self._retry_after_s!r}, message={self._message!r})"
        )


@dataclass(frozen=True)
class ProviderReply:
    """A 2xx reply. ``cached_tokens`` is ``usage.prompt_tokens_details.cached_tokens`` as the
    provider reported it: None means the provider did not say (unknown), never "nothing cached";
    0 means it said nothing was cached."""

    status: int
    body: dict[str, Any]
    cached_tokens: int | None


def reported_cached_tokens(body: dict[str, Any]) -> int | None:
    """``usage.prompt_tokens_details.cached_tokens`` of an OpenAI body, None when absent."""
    usage = body.get("usage")
    details = usage.get("prompt_tokens_details") if isinstance(usage, dict) else None
    value = details.get("cached_tokens") if isinstance(details, dict) else None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def prompt_cache_key_for(tenant_scope: str, prefix_digest: str) -> str:
    """A short, stable ``prompt_cache_key`` for one tenant scope and one prefix digest.

    Same scope and digest → same key, so the provider routes repeats of a prefix to the same
    cache. The key is a one-way hash over both, so the same prefix under two scopes gets
    unrelated keys and a key says nothing about its scope, its prefix or another tenant's key.
    """
    material = f"zumik-prompt-cache-key/1\0{tenant_scope}\0{prefix_digest}".encode()
    return "zk-" + hashlib.sha256(material).hexdigest()[:32]


class OpenAICompatProvider:
    """One provider endpoint (``base_url`` ends where ``/chat/completions`` is appended, e.g.
    ``https://api.openai.com/v1``). The API key comes with each call (it depends on the route:
    Zumik's managed key or a tenant's own) and is never stored on the object.

    ``client``: share a pooled ``httpx.AsyncClient``; the adapter then leaves closing it to its
    owner. ``timeout_s`` bounds connecting, each read (each stream chunk) and each write.
    """

    def __init__(
        self, name: str, base_url: str, *, timeout_s: float, client: httpx.AsyncClient | None = None
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"provider {name}: timeout_s must be positive, got {timeout_s}")
        self.name = name
        self.base_url = base_url.rstrip("/")
        self._timeout = httpx.Timeout(timeout_s)
        self._owns_client = client is None
        self._client = client if client is not None else httpx.AsyncClient(timeout=self._timeout)

    def __repr__(self) -> str:
        return f"OpenAICompatProvider(name={self.name!r}, base_url={self.base_url!r})"

    async def complete(self, path: ProviderPath, body: dict[str, Any], *, api_key: str) -> ProviderReply:
        """POST ``body`` to ``path``; the parsed 2xx reply, or ``ProviderFailure``."""
        request = self._request(path, body, api_key)
        try:
            response = await self._client.send(request)
        except httpx.HTTPError as exc:
            raise self._transport_failure(exc, api_key, started=False) from None
        if not response.is_success:
            raise self._status_failure(response, api_key)
        try:
            parsed = response.json()
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise ProviderFailure(
                ProviderOutcome.SERVER_ERROR,
                response.status_code,
                None,
                f"{self.name}: HTTP {response.status_code} with a body that is not a JSON object",
            )
        return ProviderReply(response.status_code, parsed, reported_cached_tokens(parsed))

    async def stream(
        self, path: ProviderPath, body: dict[str, Any], *, api_key: str
    ) -> AsyncGenerator[str, None]:
        """POST a streaming ``body``; yield each SSE event's ``data`` payload, ``"[DONE]"`` last.

        Before the first payload every failure is a ``ProviderFailure`` (the caller may still
        answer with an HTTP error); after it, a dropped connection, a timeout between chunks or
        a stream ending without ``[DONE]`` is a ``ProviderFailure`` too, which the caller turns
        into an SSE error event. Closing the generator early (``aclose()``) closes the response.
        """
        request = self._request(path, body, api_key)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise self._transport_failure(exc, api_key, started=False) from None
        started = False
        try:
            if not response.is_success:
                await response.aread()
                raise self._status_failure(response, api_key)
            data_lines: list[str] = []
            async for line in sse_lines(response.aiter_bytes()):  # CR/LF only: not aiter_lines
                if line == "":
                    if not data_lines:
                        continue
                    payload = "\n".join(data_lines)
                    data_lines = []
                    started = True
                    yield payload
                    if payload == "[DONE]":
                        return
                elif line.startswith("data:"):
                    value = line[5:]
                    data_lines.append(value[1:] if value.startswith(" ") else value)
                # Other fields (event:, id:, retry:) and comments (":") carry nothing we use.
            if data_lines:  # the last event lacked its blank line: deliver it anyway
                payload = "\n".join(data_lines)
                started = True
                yield payload
                if payload == "[DONE]":
                    return
            raise ProviderFailure(
                ProviderOutcome.SERVER_ERROR,
                None,
                None,
                f"{self.name}: the stream ended before [DONE]",
            )
        except httpx.HTTPError as exc:
            raise self._transport_failure(exc, api_key, started=started) from None
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    def _request(self, path: str, body: dict[str, Any], api_key: str) -> httpx.Request:
        if path not in PROVIDER_PATHS:
            raise ValueError(
                f"provider {self.name}: unsupported path {path!r}; use one of {sorted(PROVIDER_PATHS)}"
            )
        headers = {"Authorization": f"Bearer {api_key}", "Accept": "application/json"}
        headers["Content-Type"] = "application/json"
        if body.get("stream"):
            headers["Accept"] = "text/event-stream"
        try:  # as httpx's json= would, but only the body's own fault is caught here
            content = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
        except ValueError as exc:  # a float JSON cannot carry (NaN, Infinity): the request's own fault
            message = f"{self.name}: the request cannot be sent as JSON ({exc})"
            raise ProviderFailure(ProviderOutcome.CLIENT_ERROR, 400, None, message) from None
        return self._client.build_request(
            "POST", self.base_url + path, content=content, headers=headers, timeout=self._timeout
        )

    def _status_failure(self, response: httpx.Response, api_key: str) -> ProviderFailure:
        status = response.status_code
        if status == 429:
            outcome = ProviderOutcome.RATE_LIMITED
        elif status == 408:
            outcome = ProviderOutcome.TIMEOUT
        elif status >= 500:
            outcome = ProviderOutcome.SERVER_ERROR
        else:
            outcome = ProviderOutcome.CLIENT_ERROR
        detail = _error_message(response)
        message = f"{self.name}: HTTP {status}" + (f": {detail}" if detail else "")
        return ProviderFailure(
            outcome, status, parse_retry_after(response.headers.get("retry-after")), _redact(message, api_key)
        )

    def _transport_failure(self, exc: httpx.HTTPError, api_key: str, *, started: bool) -> ProviderFailure:
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            outcome, what = ProviderOutcome.CONNECT_ERROR, "could not connect"
        elif isinstance(exc, httpx.TimeoutException):
            what = "no stream chunk" if started else "no answer"
            outcome, what = ProviderOutcome.TIMEOUT, f"{what} within {self._timeout.read:g} s"
        else:
            outcome = ProviderOutcome.SERVER_ERROR
            what = "the connection broke mid-stream" if started else "the connection broke"
        detail = str(exc) or type(exc).__name__
        message = f"{self.name}: {what} ({type(exc).__name__}: {detail})"
        return ProviderFailure(outcome, None, None, _redact(message, api_key))


def parse_retry_after(value: str | None, *, now_s: float | None = None) -> int | None:
    """Retry-After as whole seconds (rounded up): delta-seconds or an HTTP date; None if absent
    or unreadable."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now_s is None else now_s)
    if math.isnan(seconds) or math.isinf(seconds):
        return None
    return max(0, math.ceil(seconds))


def _error_message(response: httpx.Response) -> str:
    """The OpenAI error object's message (``{"error": {"message"}}``, or a top-level
    ``message``), else the start of the body text."""
    try:
        data = response.json()
    except (ValueError, json.JSONDecodeError):
        data = None
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"][:MAX_MESSAGE_CHARS]
        if isinstance(error, str):
            return error[:MAX_MESSAGE_CHARS]
        if isinstance(data.get("message"), str):
            return str(data["message"])[:MAX_MESSAGE_CHARS]
    try:
        return response.text.strip()[:MAX_MESSAGE_CHARS]
    except (UnicodeDecodeError, httpx.ResponseNotRead):
        return ""


def _redact(message: str, api_key: str) -> str:
    # Providers echo keys in some errors ("Incorrect API key provided: ..."): never pass one on.
    if api_key:
        message = message.replace(api_key, "[redacted]")
    return message
