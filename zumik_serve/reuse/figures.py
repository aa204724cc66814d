"""One request's reuse figures: opportunity and capture, kept apart, each with its level.

    opportunity  prompt tokens in block-aligned prefixes already seen in the same isolation
                 scope (tenant salt, compat key), from Zumik's own index      → estimated
    capture      prompt tokens actually served from a cache:
                   BYOC engine (usage.cached_tokens of vLLM)                   → observed
                   managed / BYOK provider with usage.cached_tokens            → reported
                   provider without the field                                  → unknown (None)

An engine's capture is split by source when the engine's KV connector reported it
(``kvstore/connector.py``, non-streamed answers): ``engine`` (its own prefix cache) and each
tier it restored from (``host``, ``redis``, ``disk``).

They are never added together or blended into one hit rate. ``api/headers.py`` renders them
as API.md's ``x-zumik-reuse-*`` headers; ``to_json`` is the ``reuse`` object of a /v2 answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import Field, PlainSerializer, TypeAdapter

from zumik_serve.reuse.evidence import EvidenceLevel


def _object_of_pairs(pairs: tuple[tuple[str, int], ...]) -> dict[str, int]:
    return dict(pairs)


@dataclass(frozen=True)
class ReuseFigures:
    """One request's figures. In JSON (``to_json``): ``opportunity_tokens``,
    ``opportunity_evidence``, ``captured_tokens`` (null: unknown), ``captured_evidence`` and,
    only when the capture was split by source, ``captured_by_source``; the prompt size is not
    part of it (``usage`` says it)."""

    prompt_tokens: Annotated[int, Field(exclude=True)]
    opportunity_tokens: int
    opportunity_level: Annotated[EvidenceLevel, Field(serialization_alias="opportunity_evidence")]
    captured_tokens: int | None  # None: the source did not say (unknown), never zero
    captured_level: Annotated[EvidenceLevel, Field(serialization_alias="captured_evidence")]
    # (source, tokens); empty: not split
    captured_sources: Annotated[
        tuple[tuple[str, int], ...],
        Field(serialization_alias="captured_by_source", exclude_if=lambda sources: not sources),
        PlainSerializer(_object_of_pairs, return_type=dict[str, int]),
    ] = ()

    @classmethod
    def of(
        cls,
        *,
        prompt_tokens: int,
        opportunity_tokens: int | None,
        route_kind: str,
        cached_tokens: int | None,
        kv_report: dict[str, object] | None = None,
    ) -> ReuseFigures:
        """``opportunity_tokens`` None: not looked up (the tenant keeps no index): ``unknown``."""
        if cached_tokens is None:
            level = EvidenceLevel.UNKNOWN
        elif route_kind == "byoc":
            level = EvidenceLevel.OBSERVED
        else:
            level = EvidenceLevel.REPORTED
        sources: tuple[tuple[str, int], ...] = ()
        if level is EvidenceLevel.OBSERVED and kv_report is not None:
            sources = capture_sources(kv_report, cached_tokens or 0)
        return cls(
            prompt_tokens=prompt_tokens,
            opportunity_tokens=min(opportunity_tokens or 0, prompt_tokens),
            opportunity_level=EvidenceLevel.UNKNOWN
            if opportunity_tokens is None
            else EvidenceLevel.ESTIMATED,
            captured_tokens=cached_tokens,
            captured_level=level,
            captured_sources=sources,
        )

    def to_json(self) -> dict[str, Any]:
        return _FIGURES.dump_python(self, mode="json", by_alias=True)


_FIGURES: TypeAdapter[ReuseFigures] = TypeAdapter(ReuseFigures)


def capture_sources(kv_report: dict[str, object], cached_tokens: int) -> tuple[tuple[str, int], ...]:
    """Split an engine's ``cached_tokens`` into its own prefix cache and each tier's restores.

    The tiers' tokens are what the connector restored; the engine's own share is the rest of
    ``cached_tokens`` (vLLM counts both), bounded by what the connector saw the engine hold. The
    parts always add up to ``cached_tokens``.
    """
    tiers = kv_report.get("tiers")
    restored: list[tuple[str, int]] = []
    if isinstance(tiers, dict):
        for tier, tokens in sorted(tiers.items()):
            if isinstance(tokens, int) and tokens > 0:
                restored.append((str(tier), tokens))
    left = cached_tokens
    parts: list[tuple[str, int]] = []
    for tier, tokens in restored:  # never claim more than vLLM counted
        take = min(tokens, left)
        parts.append((tier, take))
        left -= take
    return (("engine", left), *parts)
