"""ReuseService: per request, what could have been reused and what was, and the tenant's report.

Per request: the opportunity (prefix blocks of the prompt this scope has seen before, from the
shared index in ``store/reuse_store.py``: ``estimated``) and the capture (the route's
``cached_tokens``: ``observed`` from Zumik's engines, ``reported`` from a provider, ``unknown``
when a provider leaves it out). Each request adds both to the tenant's ledger and to the Ray
metrics. The report sums the ledger over a window, grouped by tenant, profile, snapshot or
route, with each capture level kept apart (never one blended hit rate), and the money the
capture saved at each route's prices, labelled with the same level.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Any, Protocol

from profiles import Profile
from zumik_serve.errors import InvalidRequestError
from zumik_serve.reuse.evidence import EvidenceLevel
from zumik_serve.reuse.figures import ReuseFigures
from zumik_serve.reuse.store import RedisReuseStore

GROUPS = ("tenant", "profile", "snapshot", "route")
MAX_WINDOW_S = 24 * 3600


class ReuseMetrics(Protocol):
    def observe(self, *, tenant: str, profile: str, route: str, figures: ReuseFigures) -> None: ...


class ReuseService:
    def __init__(
        self,
        store: RedisReuseStore,
        profile: Profile,
        *,
        scope_digest: str,
        metrics: ReuseMetrics | None = None,
    ) -> None:
        self._store = store
        self.profile = profile
        self._scope_digest = scope_digest  # the compat key digest (or the profile's fingerprint)
        self._metrics = metrics

    async def opportunity_tokens(self, scope: str, prefix_keys: Sequence[str]) -> int:
        blocks = await self._store.seen_prefix_blocks(scope, self._scope_digest, prefix_keys)
        return blocks * self.profile.engine.block_size

    async def record(self, tenant: str, figures: ReuseFigures, *, snapshot: str | None, route: str) -> None:
        counts = {
            "requests": 1,
            "prompt": figures.prompt_tokens,
            f"opportunity:{figures.opportunity_level.label}": figures.opportunity_tokens,
        }
        if figures.captured_tokens is None:
            counts["captured_requests:unknown"] = 1
        else:
            counts[f"captured:{figures.captured_level.label}"] = figures.captured_tokens
        for source, tokens in figures.captured_sources:
            counts[f"captured_source:{source}"] = tokens
        group = f"{self.profile.name}|{snapshot or '-'}|{route}"
        await self._store.record(tenant, group, counts)
        if self._metrics is not None:
            self._metrics.observe(tenant=tenant, profile=self.profile.name, route=route, figures=figures)

    async def series(self, tenant: str, *, group_by: str, window_s: int) -> list[dict[str, Any]]:
        """Minute by minute, per group: opportunity and capture by level (for plots)."""
        _check(group_by, window_s)
        points = []
        for start, fields in await self._store.buckets(tenant, window_s):
            groups: dict[str, dict[str, int]] = {}
            for field, value in fields.items():
                profile, snapshot, route, figure = field.split("|", 3)
                key = {"tenant": tenant, "profile": profile, "snapshot": snapshot, "route": route}[group_by]
                point = groups.setdefault(key, {})
                point[figure] = point.get(figure, 0) + value
            for key, figures in sorted(groups.items()):
                points.append({
                    "t": start, group_by: key,
                    "opportunity_estimated": figures.get("opportunity:estimated", 0),
                    "captured_observed": figures.get("captured:observed", 0),
                    "captured_reported": figures.get("captured:reported", 0),
                    "captured_unknown_requests": figures.get("captured_requests:unknown", 0),
                })  # fmt: skip
        return points

    async def report(self, tenant: str, *, group_by: str, window_s: int) -> dict[str, Any]:
        _check(group_by, window_s)
        totals = await self._store.window(tenant, window_s)
        groups: dict[str, dict[str, int]] = {}
        for field, value in totals.items():
            profile, snapshot, route, figure = field.split("|", 3)
            key = {"tenant": tenant, "profile": profile, "snapshot": snapshot, "route": route}[group_by]
            bucket = groups.setdefault(key, {})
            bucket[figure] = bucket.get(figure, 0) + value
            if group_by != "route" and figure.startswith("captured:"):
                saved = f"saved_pusd:{route}:{figure.split(':', 1)[1]}"
                bucket[saved] = bucket.get(saved, 0) + value * self._saving_pusd_per_token(route)
        return {
            "object": "reuse_report",
            "group_by": group_by,
            "window_s": window_s,
            "groups": [self._group(key, figures, group_by) for key, figures in sorted(groups.items())],
        }

    def _group(self, key: str, figures: dict[str, int], group_by: str) -> dict[str, Any]:
        captured = {
            level.label: figures.get(f"captured:{level.label}", 0)
            for level in (EvidenceLevel.OBSERVED, EvidenceLevel.REPORTED)
        }
        savings: dict[str, int] = {}
        if group_by == "route":
            for level, tokens in captured.items():
                savings[level] = tokens * self._saving_pusd_per_token(key)
        else:
            for name, value in figures.items():
                if name.startswith("saved_pusd:"):
                    level = name.rsplit(":", 1)[1]
                    savings[level] = savings.get(level, 0) + value
        return {
            group_by: key,
            "requests": figures.get("requests", 0),
            "prompt_tokens": figures.get("prompt", 0),
            "opportunity": {"tokens": figures.get("opportunity:estimated", 0), "evidence": "estimated"},
            "captured": [{"tokens": tokens, "evidence": level} for level, tokens in captured.items()]
            + [
                {
                    "requests": figures.get("captured_requests:unknown", 0),
                    "tokens": None,
                    "evidence": "unknown",
                }
            ],
            "captured_by_source": {
                name.split(":", 1)[1]: value
                for name, value in sorted(figures.items())
                if name.startswith("captured_source:")
            },
            "savings_usd": [
                {"usd": str(Decimal(value) / Decimal(10**12)), "evidence": level}
                for level, value in savings.items()
            ],
        }

    def _saving_pusd_per_token(self, route: str) -> int:
        """What one captured token saved at ``route``'s prices (input minus cached input)."""
        for spec in self.profile.effective_routes():
            if spec.name == route:
                full, cached, _ = spec.token_prices_pusd()
                return max(0, full - cached)
        return 0


def _check(group_by: str, window_s: int) -> None:
    if group_by not in GROUPS:
        raise InvalidRequestError(f"group_by must be one of: {', '.join(GROUPS)}.", param="group_by")
    if not 1 <= window_s <= MAX_WINDOW_S:
        raise InvalidRequestError(f"window_s must be 1 to {MAX_WINDOW_S} seconds.", param="window_s")
