"""Every ``x-zumik-*`` header, declared once. /v1 bodies never carry Zumik data; headers do."""

from __future__ import annotations

from collections.abc import Mapping

from zumik_serve.reuse.evidence import EvidenceLevel
from zumik_serve.reuse.figures import ReuseFigures

DECISION_ID = "x-zumik-decision-id"
ROUTE = "x-zumik-route"
RELEASE = "x-zumik-release"
SNAPSHOT = "x-zumik-snapshot"
PROFILE = "x-zumik-profile"
SESSION = "x-zumik-session"
QOS = "x-zumik-qos"
TIMEOUT = "x-zumik-timeout-s"
REUSE_OPPORTUNITY_TOKENS = "x-zumik-reuse-opportunity-tokens"
REUSE_CAPTURED_TOKENS = "x-zumik-reuse-captured-tokens"
REUSE_EVIDENCE = "x-zumik-reuse-evidence"
SERVER_TIMING = "server-timing"

# Headers a browser client may read (CORS), and that proxies must not strip.
EXPOSED = (DECISION_ID, ROUTE, RELEASE, SNAPSHOT, REUSE_CAPTURED_TOKENS, REUSE_EVIDENCE)


def requested_profile(headers: Mapping[str, str]) -> str | None:
    """The profile a request asks for (``x-zumik-profile``); None (also when empty): the one
    served here. Every generation surface passes it on to ``Pipeline.check_profile``."""
    return headers.get(PROFILE) or None


def route_headers(decision_id: str, route: str) -> dict[str, str]:
    return {DECISION_ID: decision_id, ROUTE: route}


def server_timing(phases_ms: dict[str, float], descriptions: dict[str, str] | None = None) -> str:
    """A standard ``Server-Timing`` value: ``name;dur=1.23`` per phase (``;desc="..."`` when
    ``descriptions`` has one for it)."""
    descriptions = descriptions or {}
    parts = []
    for name, duration in phases_ms.items():
        desc = descriptions.get(name)
        suffix = f';desc="{desc}"' if desc else ""
        parts.append(f"{name};dur={duration:.2f}{suffix}")
    return ", ".join(parts)


def reuse_headers(figures: ReuseFigures) -> dict[str, str]:
    """``x-zumik-reuse-*``: the captured header equals ``usage.prompt_tokens_details.cached_tokens``
    and is absent when the source did not say (unknown is never rendered as 0)."""
    evidence = f"opportunity={figures.opportunity_level.label}; captured={figures.captured_level.label}"
    headers = {REUSE_EVIDENCE: evidence}
    if figures.opportunity_level is not EvidenceLevel.UNKNOWN:
        headers[REUSE_OPPORTUNITY_TOKENS] = str(figures.opportunity_tokens)
    if figures.captured_tokens is not None:
        headers[REUSE_CAPTURED_TOKENS] = str(figures.captured_tokens)
    return headers
