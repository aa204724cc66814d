"""Every ``x-zumik-*`` header, declared once. /v1 bodies never carry Zumik data; headers do."""

from __future__ import annotations

DECISION_ID = "x-zumik-decision-id"
ROUTE = "x-zumik-route"
RELEASE = "x-zumik-release"
SNAPSHOT = "x-zumik-snapshot"
PROFILE = "x-zumik-profile"
SESSION = "x-zumik-session"
QOS = "x-zumik-qos"
REUSE_OPPORTUNITY_TOKENS = "x-zumik-reuse-opportunity-tokens"
REUSE_CAPTURED_TOKENS = "x-zumik-reuse-captured-tokens"
REUSE_EVIDENCE = "x-zumik-reuse-evidence"
SERVER_TIMING = "server-timing"

# Headers a browser client may read (CORS), and that proxies must not strip.
EXPOSED = (DECISION_ID, ROUTE, RELEASE, SNAPSHOT, REUSE_CAPTURED_TOKENS, REUSE_EVIDENCE)


def route_headers(decision_id: str, route: str) -> dict[str, str]:
    return {DECISION_ID: decision_id, ROUTE: route}


def server_timing(phases_ms: dict[str, float]) -> str:
    """A standard ``Server-Timing`` value: ``name;dur=1.23`` per phase."""
    return ", ".join(f"{name};dur={duration:.2f}" for name, duration in phases_ms.items())
