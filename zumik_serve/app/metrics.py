"""Zumik's Ray metrics (``ray.util.metrics``): exported on Ray's metrics port as ``ray_zumik_*``,
so they show in the Ray dashboard, Prometheus and the Grafana dashboard in ``deploy/grafana``.

    zumik_reuse_opportunity_tokens   counter  tenant, profile, route, evidence (estimated)
    zumik_reuse_captured_tokens      counter  tenant, profile, route, evidence (observed|reported)
    zumik_reuse_requests             counter  tenant, profile, route, evidence of the capture
    zumik_reuse_captured_source_tokens counter tenant, profile, route, source (engine|host|redis|disk)
    zumik_decisions                  counter  profile, route, reason (the pick's reason)
    zumik_decision_time_us           histogram profile (prefix keys + decide, microseconds)
    zumik_chat_prompt_keys           counter  profile, keys (engine, or why text: no_events, tools, ...)
"""

from __future__ import annotations

from zumik_serve.reuse.figures import ReuseFigures

DECISION_TIME_BOUNDARIES_US: list[float] = [25, 50, 100, 200, 300, 500, 1000, 2000, 5000]


class RayReuseMetrics:
    """``ray.util.metrics`` counters (exported on Ray's metrics port as ``ray_zumik_*``)."""

    def __init__(self) -> None:
        from ray.util.metrics import Counter

        tags = ("tenant", "profile", "route", "evidence")
        self._opportunity = Counter(
            "zumik_reuse_opportunity_tokens",
            "Prompt tokens in prefixes seen before (estimated)",
            tag_keys=tags,
        )
        self._captured = Counter(
            "zumik_reuse_captured_tokens",
            "Prompt tokens served from a cache, by evidence level",
            tag_keys=tags,
        )
        self._requests = Counter(
            "zumik_reuse_requests", "Requests accounted, by capture evidence", tag_keys=tags
        )
        self._by_source = Counter(
            "zumik_reuse_captured_source_tokens",
            "Observed captured tokens by source: the engine's own cache or a KV tier",
            tag_keys=("tenant", "profile", "route", "source"),
        )

    def observe(self, *, tenant: str, profile: str, route: str, figures: ReuseFigures) -> None:
        base = {"tenant": tenant, "profile": profile, "route": route}
        if figures.opportunity_tokens:  # Ray counters take positive increments only
            opportunity = {**base, "evidence": figures.opportunity_level.label}
            self._opportunity.inc(figures.opportunity_tokens, tags=opportunity)
        captured = {**base, "evidence": figures.captured_level.label}
        if figures.captured_tokens:
            self._captured.inc(figures.captured_tokens, tags=captured)
        self._requests.inc(1, tags=captured)
        for source, tokens in figures.captured_sources:
            if tokens:
                self._by_source.inc(tokens, tags={**base, "source": source})


class RayDecisionMetrics:
    def __init__(self, profile: str) -> None:
        from ray.util.metrics import Counter, Histogram

        self._profile = profile
        self._decisions = Counter("zumik_decisions", "Routing decisions by picked route",
                                  tag_keys=("profile", "route", "reason"))  # fmt: skip
        self._time = Histogram(
            "zumik_decision_time_us", "Scheduler decision time (prefix keys + decide), microseconds",
            boundaries=DECISION_TIME_BOUNDARIES_US, tag_keys=("profile",),
        )  # fmt: skip
        self._chat_keys = Counter(
            "zumik_chat_prompt_keys",
            "Chat prompts by how they were keyed: the engine's block hashes, or why text keys "
            "(no_events, tools, content, ...)",
            tag_keys=("profile", "keys"),
        )

    def observe(self, *, route: str, reason: str, decide_us: float) -> None:
        self._decisions.inc(1, tags={"profile": self._profile, "route": route, "reason": reason})
        self._time.observe(decide_us, tags={"profile": self._profile})

    def chat_keys(self, kind: str) -> None:
        self._chat_keys.inc(1, tags={"profile": self._profile, "keys": kind})
