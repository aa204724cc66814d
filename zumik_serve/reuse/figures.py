"""One request's reuse figures: opportunity and capture, kept apart, each with its level.

    opportunity  prompt tokens in block-aligned prefixes already seen in the same isolation
                 scope (tenant salt, compat key), from Zumik's own index      → estimated
    capture      prompt tokens actually served from a cache:
                   BYOC engine (usage.cached_tokens of vLLM)                   → observed
                   managed / BYOK provider with usage.cached_tokens            → reported
                   provider without the field                                  → unknown (None)

They are never added together or blended into one hit rate. ``api/zumik_headers.py`` renders
them as API.md's ``x-zumik-reuse-*`` headers.
"""

from __future__ import annotations

from dataclasses import dataclass

from zumik_serve.reuse.evidence import EvidenceLevel


@dataclass(frozen=True)
class ReuseFigures:
    prompt_tokens: int
    opportunity_tokens: int
    opportunity_level: EvidenceLevel
    captured_tokens: int | None  # None: the source did not say (unknown), never zero
    captured_level: EvidenceLevel

    @classmethod
    def of(
        cls, *, prompt_tokens: int, opportunity_tokens: int, route_kind: str, cached_tokens: int | None
    ) -> ReuseFigures:
        if cached_tokens is None:
            level = EvidenceLevel.UNKNOWN
        elif route_kind == "byoc":
            level = EvidenceLevel.OBSERVED
        else:
            level = EvidenceLevel.REPORTED
        return cls(
            prompt_tokens=prompt_tokens,
            opportunity_tokens=min(opportunity_tokens, prompt_tokens),
            opportunity_level=EvidenceLevel.ESTIMATED,
            captured_tokens=cached_tokens,
            captured_level=level,
        )

    def to_json(self) -> dict[str, object]:
        return {
            "opportunity_tokens": self.opportunity_tokens,
            "opportunity_evidence": self.opportunity_level.label,
            "captured_tokens": self.captured_tokens,
            "captured_evidence": self.captured_level.label,
        }
