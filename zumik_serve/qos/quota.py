"""Per-tenant quotas: the limits in force for a tenant and the errors that say one is spent.

    limit in force = the tenant's override (``zumik tenant quota set``), else the profile's
                     ``quota`` default; None (or the override "unlimited"): no limit

    storage   stored_bytes, objects, session_turns   counted in the same Lua script that writes
              or deletes (``state/store.py``), so usage is exact and a refused write changes
              nothing: 429 insufficient_quota (waiting does not help; a purge or a higher limit
              does)
    KV        kv_bytes                               per cache scope, in the Redis tier
    rate      requests_per_minute, tokens_per_minute a sliding window in Redis shared by every
              gateway (``qos/store.py``): 429 rate_limit_error with Retry-After

No I/O here: the stores count and compare; this module names the limits and words the refusals.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from profiles.model import QuotaSpec
from zumik_serve.errors import QuotaExceededError, RateLimitExceededError

UNLIMITED = "unlimited"
PURGE_HINT = "purge what you no longer need (POST /v2/purge; DELETE alone keeps the content)"
RAISE_HINT = "or ask your administrator to raise it (zumik tenant quota set)"


class Quota(StrEnum):
    STORED_BYTES = "stored_bytes"
    OBJECTS = "objects"
    SESSION_TURNS = "session_turns"
    KV_BYTES = "kv_bytes"
    REQUESTS_PER_MINUTE = "requests_per_minute"
    TOKENS_PER_MINUTE = "tokens_per_minute"


OverrideValue = Annotated[StrictInt, Field(ge=0)] | Literal["unlimited"] | None


class QuotaOverrides(BaseModel):
    """A tenant's own limits, as stored. None: the profile's default; "unlimited": no limit for
    this tenant; an integer (never a string or a bool): the limit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stored_bytes: OverrideValue = None
    objects: OverrideValue = None
    session_turns: OverrideValue = None
    kv_bytes: OverrideValue = None
    requests_per_minute: OverrideValue = None
    tokens_per_minute: OverrideValue = None

    def stored(self) -> dict[str, str]:
        """The fields that override a default, as the Redis hash holds them."""
        return {name: str(value) for name, value in self.model_dump().items() if value is not None}

    @classmethod
    def from_stored(cls, fields: Mapping[str, str]) -> QuotaOverrides:
        values = {name: value if value == UNLIMITED else int(value) for name, value in fields.items()}
        return cls.model_validate(values)


@dataclass(frozen=True)
class QuotaUsage:
    """What a tenant holds now, as the write scripts counted it."""

    stored_bytes: int
    objects: int


def limits_in_force(spec: QuotaSpec, overrides: QuotaOverrides) -> dict[Quota, int | None]:
    """Each quota's limit for the tenant (None: no limit)."""
    limits: dict[Quota, int | None] = {}
    for quota in Quota:
        override = getattr(overrides, quota.value)
        default: int | None = getattr(spec, quota.value)
        limits[quota] = None if override == UNLIMITED else default if override is None else int(override)
    return limits


def default_text(value: int | None) -> str:
    """A profile default as the Lua scripts take it (``qos/store.py``)."""
    return UNLIMITED if value is None else str(value)


def storage_refusal(
    quota: str, limit: int, used: int, requested: int, *, session: str | None
) -> QuotaExceededError:
    """The error of a write refused by a storage quota (what a write script answered)."""
    code = f"{quota}_quota_exceeded"
    if quota == Quota.SESSION_TURNS:
        return QuotaExceededError(
            f"Session {session} holds {used} turns and this write adds {requested}; your tenant's "
            f"session_turns quota is {limit} turns per session or branch. Start a new session (a "
            f"snapshot of this one can carry its history) {RAISE_HINT}.",
            code=code,
        )
    unit = " bytes" if quota == Quota.STORED_BYTES else ""
    return QuotaExceededError(
        f"This write needs {requested}{unit} more, but your tenant holds {used}{unit} of its "
        f"{quota} quota of {limit}{unit}. Nothing was written; {PURGE_HINT}, {RAISE_HINT}.",
        code=code,
    )


def rate_refusal(
    quota: str, limit: int, used: int, requested: int, retry_after_s: int | None
) -> RateLimitExceededError:
    """The error of a request refused by a per-minute rate (``retry_after_s`` None: the request
    alone exceeds the limit, so no wait helps)."""
    what = "requests" if quota == Quota.REQUESTS_PER_MINUTE else "tokens"
    head = f"Rate limit reached for {what} per minute: limit {limit}, used {used}, requested {requested}."
    if retry_after_s is None:
        error = RateLimitExceededError(
            f"{head} This request alone is over the limit: lower max_tokens (or n) or shorten the "
            f"prompt, {RAISE_HINT}.",
            code="rate_limit_exceeded",
        )
        error.should_retry = False
        return error
    return RateLimitExceededError(
        f"{head} Retry after {retry_after_s} s, or send fewer {what} per minute.",
        retry_after_s=retry_after_s,
    )


@dataclass(frozen=True)
class RateReservation:
    """Tokens counted for a request at admission, in the rate window that began at
    ``window_start`` (Redis time, s); corrected to the tokens used once the engine reports them."""

    window_start: int
    tokens: int


@dataclass(frozen=True)
class RateSettlement:
    """A reservation replaced by the tokens its request used: ``correction`` tokens (used minus
    reserved, never 0) move the count of the window that began at ``window_start``."""

    window_start: int
    correction: int

    @staticmethod
    def of(reservation: RateReservation | None, used: int | None) -> RateSettlement | None:
        """None when there is nothing to settle: no reservation, no usage reported (the
        reservation stands), or exactly the tokens reserved."""
        if reservation is None or used is None or used == reservation.tokens:
            return None
        return RateSettlement(reservation.window_start, used - reservation.tokens)


CHARS_PER_TOKEN = 4  # before tokenization, a prompt's tokens are estimated from its UTF-8 bytes


def reserved_tokens(body: Mapping[str, Any], max_output_tokens: int) -> int:
    """What a generation body may cost in tokens, before the engine has tokenized it: its prompt
    (token ids counted, text estimated at ``CHARS_PER_TOKEN`` bytes a token) plus ``n`` times its
    ``max_tokens`` (``max_output_tokens``, the model's context, when it gives none)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        prompt_tokens = len(prompt)
    else:
        text_bytes = _text_bytes(prompt) + _text_bytes(body.get("messages"))
        prompt_tokens = -(-text_bytes // CHARS_PER_TOKEN)
    output = body.get("max_completion_tokens") or body.get("max_tokens") or max_output_tokens
    n = body.get("n") or 1
    return prompt_tokens + int(output) * int(n)


def used_tokens(usage: Mapping[str, Any] | None) -> int | None:
    """The tokens a finished request used, from the engine's usage (None: not reported)."""
    if not usage:
        return None
    total = usage.get("total_tokens")
    if isinstance(total, int) and not isinstance(total, bool):
        return total
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if isinstance(prompt, int) and isinstance(completion, int):
        return prompt + completion
    return None


def _text_bytes(value: Any) -> int:
    """UTF-8 bytes of the strings in a prompt or a message list (contents and their text parts)."""
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, list):
        return sum(_text_bytes(item) for item in value)
    if isinstance(value, Mapping):
        return _text_bytes(value.get("content")) + _text_bytes(value.get("text"))
    return 0


def parse_override(text: str) -> int | Literal["unlimited"] | None:
    """A limit as an operator writes it: a whole number (``1_000`` allowed), "unlimited", or
    "default" (None: back to the profile's default). ValueError says what is accepted."""
    value = text.strip().lower()
    if value == "default":
        return None
    if value == UNLIMITED:
        return "unlimited"
    if not value.replace("_", "").isdigit() or len(value) > 20:
        raise ValueError(f"{text!r} is not a limit: give a whole number >= 0, 'unlimited' or 'default'")
    return int(value)
