"""Provider hints: the chat request fields that only a hosted provider acts on, and which route
gets which.

A self-hosted engine has no use for them (``api/v1/wire.py`` keeps them off an engine's body). A
provider route gets them as the table says, per route kind (``ProviderHints.for_route``):

    field                    managed route (the operator's account)     BYOK route (the tenant's)
    verbosity                sent                                       sent
    prompt_cache_retention   sent; "24h" not to a route whose           sent; the same rule
                             retention_days is 0 (that route's account
                             has zero data retention, whose default on
                             the models that offer both is "in_memory";
                             "24h" would keep the prompt's cache for up
                             to a day, which the receipts could not say)
    prompt_cache_options     sent (``ttl`` "30m", ``mode``)              sent
    safety_identifier        a pseudonym under the tenant's salt, as    sent as is
                             ``user`` (``engine_client.pseudonymous_user``)
    service_tier             not sent: a managed route is billed to     sent
                             the operator at the profile's prices
    metadata                 not sent: it would mix tenants' labels     sent
                             in the operator's account
    store                    never sent: a stored completion stays until deleted at the provider,
                             past the route's retention_days that deletion receipts state
    prompt_cache_key         never sent as is: Zumik's own key goes, the client's namespaced in
                             its tenant (``routing/family.py``)

``reasoning_effort`` is not a hint: vLLM implements it, so it is an engine field and goes to
every route with the rest of the body (``api/v1/wire.py`` checks it against
``REASONING_EFFORTS``). Hint values are checked against the OpenAI spec here, so a provider
never gets one it would refuse after an engine has accepted the request.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, field_validator

from zumik_serve.validation import FieldRuleError, parse_model

MAX_CLIENT_CACHE_KEY_CHARS = 512  # a client's prompt_cache_key (it is hashed, never sent as is)
MAX_SAFETY_IDENTIFIER_CHARS = 64
MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512

# ReasoningEffort in the spec: the values of ``reasoning_effort`` (chat) and ``reasoning.effort``.
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]
REASONING_EFFORTS: frozenset[str] = frozenset(get_args(ReasoningEffort))

# Where each forwarded hint goes: every provider route, or the tenant's own (BYOK) only.
_EVERY_PROVIDER = ("verbosity", "prompt_cache_retention", "prompt_cache_options", "safety_identifier")
_BYOK_ONLY = ("service_tier", "metadata")


class PromptCacheOptions(BaseModel):
    """``prompt_cache_options`` as the spec defines it (``PromptCacheOptionsParam``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ttl: Literal["30m"] | None = None
    mode: Literal["implicit", "explicit"] | None = None


class ProviderHints(BaseModel):
    """The hint fields of one request, checked (absent and null are the same: not sent)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    FIELDS: ClassVar[frozenset[str]] = frozenset({"prompt_cache_key", "store", *_EVERY_PROVIDER, *_BYOK_ONLY})
    HINTS: ClassVar[Mapping[str, str]] = {
        "prompt_cache_key": (
            f"prompt_cache_key must be a string of at most {MAX_CLIENT_CACHE_KEY_CHARS} characters."
        ),
        "safety_identifier": (
            f"safety_identifier must be a string of at most {MAX_SAFETY_IDENTIFIER_CHARS} characters."
        ),
        "metadata": (
            f"metadata must be an object of at most {MAX_METADATA_PAIRS} string values, keys of at "
            f"most {MAX_METADATA_KEY_CHARS} characters and values of at most "
            f"{MAX_METADATA_VALUE_CHARS}."
        ),
        "verbosity": "verbosity must be 'low', 'medium' or 'high'.",
        "service_tier": "service_tier must be 'auto', 'default', 'flex', 'scale', 'priority' or 'fast'.",
        "prompt_cache_retention": "prompt_cache_retention must be 'in_memory' or '24h'.",
        "prompt_cache_options": (
            "prompt_cache_options must be an object with 'ttl' (\"30m\") and/or 'mode' (\"implicit\" "
            'or "explicit").'
        ),
        "store": "store must be true or false.",
    }

    prompt_cache_key: Annotated[StrictStr, Field(max_length=MAX_CLIENT_CACHE_KEY_CHARS)] | None = None
    store: StrictBool | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    prompt_cache_options: PromptCacheOptions | None = None
    safety_identifier: Annotated[StrictStr, Field(max_length=MAX_SAFETY_IDENTIFIER_CHARS)] | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority", "fast"] | None = None
    metadata: dict[StrictStr, StrictStr] | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        check_metadata(value)
        return value

    def for_route(self, *, managed: bool, retention_days: int) -> dict[str, Any]:
        """The hints a provider route gets (the module's table); none of them null."""
        names = _EVERY_PROVIDER if managed else (*_EVERY_PROVIDER, *_BYOK_ONLY)
        sent = self.model_dump(mode="json", include=set(names), exclude_none=True)
        if retention_days == 0 and sent.get("prompt_cache_retention") == "24h":
            del sent["prompt_cache_retention"]
        return sent


NO_HINTS = ProviderHints()


def parse_hints(body: Mapping[str, Any]) -> ProviderHints:
    """The hint fields of a request body, checked (a 400 naming the field), or ``NO_HINTS``."""
    fields = {name: body[name] for name in ProviderHints.FIELDS if name in body}
    return parse_model(ProviderHints, fields) if fields else NO_HINTS


def check_metadata(value: Mapping[str, str] | None) -> None:
    """The spec's bounds on ``metadata``: at most 16 pairs, keys of 64 characters, values of 512."""
    if value is None:
        return
    if len(value) > MAX_METADATA_PAIRS:
        raise FieldRuleError("metadata", f"'metadata' holds at most {MAX_METADATA_PAIRS} pairs.")
    if any(len(key) > MAX_METADATA_KEY_CHARS for key in value):
        raise FieldRuleError("metadata", f"'metadata' keys are at most {MAX_METADATA_KEY_CHARS} characters.")
    if any(len(text) > MAX_METADATA_VALUE_CHARS for text in value.values()):
        raise FieldRuleError(
            "metadata", f"'metadata' values are at most {MAX_METADATA_VALUE_CHARS} characters."
        )
