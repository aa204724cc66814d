"""ReuseService: per request, what could have been reused and what was; the tenant's report; the
evidence escalation reads.

Per request: the opportunity (prefix blocks of the prompt this scope has seen before, from the
shared index in ``reuse/store.py``: ``estimated``) and the capture (the route's
``cached_tokens``: ``observed`` from Zumik's engines, ``reported`` from a provider, ``unknown``
when a provider leaves it out). Each request adds both to the tenant's ledger and to the Ray
metrics. The report sums the ledger over a window, grouped by tenant, profile, snapshot or
route, with each capture level kept apart (never one blended hit rate), and the money the
capture saved at each route's prices, labelled with the same level. ``escalation_evidence`` is
what the ledger says of a tenant's (or one snapshot's) capture in the escalation window;
``family_evidence`` says it of one prefix family (``routing/family.py``), with its request and
prompt counts and the age of its newest capture: what the scheduler's escalation reads.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from decimal import Decimal
from typing import Any, Protocol

from profiles import Profile
from zumik_serve.errors import InvalidRequestError
from zumik_serve.reuse.evidence import EvidenceLevel
from zumik_serve.reuse.figures import ReuseFigures
from zumik_serve.reuse.store import LedgerCounts, LedgerGroup, RedisReuseStore
from zumik_serve.routing.decision import NO_EVIDENCE, Evidence
from zumik_serve.routing.prompt_keys import PromptKeys

GROUPS = ("tenant", "profile", "snapshot", "route")
MAX_WINDOW_S = 7 * 24 * 3600  # the ledger keeps 8 days (``reuse/store.py`` LEDGER_TTL_S)
NO_SNAPSHOT = "-"  # a report's snapshot group of requests that pinned none
REPORTED_CAPTURE = (EvidenceLevel.OBSERVED, EvidenceLevel.REPORTED)  # a report's capture columns


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

    async def seen_blocks(self, scope: str, prefix_keys: Sequence[str]) -> int:
        """How many of the prompt's leading blocks ``scope`` has seen before."""
        return await self._store.seen_prefix_blocks(scope, self._scope_digest, prefix_keys)

    def opportunity_tokens(self, prefix_keys: Sequence[str], blocks: int, prompt_tokens: int) -> int:
        """The tokens of the prompt's first ``blocks`` blocks, given the ``prompt_tokens`` the
        engine counted (0: not known yet): a text-keyed prompt's chunks are so many bytes, and
        their share of the prompt's bytes is taken of its counted tokens (``PromptKeys``)."""
        if isinstance(prefix_keys, PromptKeys):
            return prefix_keys.prefix_tokens(blocks, prompt_tokens)
        return blocks * self.profile.engine.block_size

    async def record(
        self, tenant: str, figures: ReuseFigures, *, snapshot: str | None, route: str,
        family: str | None = None,
    ) -> None:  # fmt: skip
        group = LedgerGroup(profile=self.profile.name, snapshot=snapshot, route=route)
        await self._store.record(tenant, group, LedgerCounts.of(figures), family=family)
        if self._metrics is not None:
            self._metrics.observe(tenant=tenant, profile=self.profile.name, route=route, figures=figures)

    async def escalation_evidence(self, tenant: str, *, snapshot: str | None, window_s: int) -> Evidence:
        """What the ledger recorded of the tenant's capture in the last ``window_s`` seconds
        (whole minutes), for requests that pinned ``snapshot`` (None: all of its requests): the
        strongest capture level with captured tokens > 0 (observed > reported > estimated;
        ``NO_EVIDENCE`` when none), and the tokens captured at that level or stronger. One Redis
        round trip. Captures recorded before this version kept the roll-up it reads are not
        counted (they age out of the window)."""
        captured = await self._store.captured_tokens(tenant, snapshot=snapshot, window_s=window_s)
        for level in sorted(captured, reverse=True):
            if level is not EvidenceLevel.UNKNOWN and captured[level] > 0:
                reused = sum(tokens for other, tokens in captured.items() if other >= level)
                return Evidence(level, reused)
        return NO_EVIDENCE

    async def family_evidence(
        self, tenant: str, family: str, *, window_s: int, min_level: EvidenceLevel = EvidenceLevel.REPORTED,
        now_s: int | None = None,
    ) -> Evidence:  # fmt: skip
        """What the ledger recorded of one prefix family of the tenant in the last ``window_s``
        seconds (whole minutes): the strongest capture level with captured tokens > 0 and the
        tokens captured at ``min_level`` (the profile's ``min_evidence``) or stronger, every
        such level summed (a family that moved from a provider to Zumik's engines keeps its
        reported capture next to its observed one); when the strongest level is below
        ``min_level``, the tokens at that level (``NO_EVIDENCE``'s level and 0 when none). With
        the family's requests and prompt tokens in the window and the age of its newest capture
        (from the start of that minute). One Redis round trip."""
        now = int(time.time()) if now_s is None else now_s
        counts = await self._store.family_counts(tenant, family, window_s=window_s, now_s=now)
        level = max(counts.captured_tokens, default=EvidenceLevel.UNKNOWN)
        floor = min_level if level >= min_level else level
        reused = sum(tokens for other, tokens in counts.captured_tokens.items() if other >= floor)
        age = None if counts.newest_capture_s is None else max(0, now - counts.newest_capture_s)
        return Evidence(level, reused, family, counts.requests, counts.prompt_tokens, age)

    async def series(self, tenant: str, *, group_by: str, window_s: int) -> list[dict[str, Any]]:
        """Minute by minute, per group: opportunity and capture by level (for plots)."""
        _check(group_by, window_s)
        points = []
        for bucket in await self._store.buckets(tenant, window_s):
            groups: dict[str, LedgerCounts] = {}
            for group, counts in bucket.groups.items():
                key = _key_of(group, group_by, tenant)
                groups[key] = groups[key].plus(counts) if key in groups else counts
            for key, counts in sorted(groups.items()):
                points.append({
                    "t": bucket.start_s, group_by: key,
                    "opportunity_estimated": counts.opportunity_tokens.get(EvidenceLevel.ESTIMATED, 0),
                    "captured_observed": counts.captured_tokens.get(EvidenceLevel.OBSERVED, 0),
                    "captured_reported": counts.captured_tokens.get(EvidenceLevel.REPORTED, 0),
                    "captured_unknown_requests": counts.captured_unknown_requests,
                })  # fmt: skip
        return points

    async def report(self, tenant: str, *, group_by: str, window_s: int) -> dict[str, Any]:
        _check(group_by, window_s)
        groups: dict[str, LedgerCounts] = {}
        savings: dict[str, dict[EvidenceLevel, int]] = {}  # pico-USD by level, in first-seen order
        for group, counts in (await self._store.window(tenant, window_s)).items():
            key = _key_of(group, group_by, tenant)
            groups[key] = groups[key].plus(counts) if key in groups else counts
            saved = savings.setdefault(key, {})
            per_token = self._saving_pusd_per_token(group.route)
            for level, tokens in counts.captured_tokens.items():
                saved[level] = saved.get(level, 0) + tokens * per_token
        return {
            "object": "reuse_report",
            "group_by": group_by,
            "window_s": window_s,
            "groups": [
                self._group(key, counts, savings[key], group_by) for key, counts in sorted(groups.items())
            ],
        }

    def _group(
        self, key: str, counts: LedgerCounts, saved: dict[EvidenceLevel, int], group_by: str
    ) -> dict[str, Any]:
        captured = {level: counts.captured_tokens.get(level, 0) for level in REPORTED_CAPTURE}
        if group_by == "route":  # one route: every capture column, at its prices
            saved = {level: tokens * self._saving_pusd_per_token(key) for level, tokens in captured.items()}
        return {
            group_by: key,
            "requests": counts.requests,
            "prompt_tokens": counts.prompt_tokens,
            "opportunity": {
                "tokens": counts.opportunity_tokens.get(EvidenceLevel.ESTIMATED, 0),
                "evidence": EvidenceLevel.ESTIMATED.label,
            },
            "captured": [{"tokens": tokens, "evidence": level.label} for level, tokens in captured.items()]
            + [
                {
                    "requests": counts.captured_unknown_requests,
                    "tokens": None,
                    "evidence": EvidenceLevel.UNKNOWN.label,
                }
            ],
            "captured_by_source": dict(sorted(counts.captured_by_source.items())),
            "savings_usd": [
                {"usd": str(Decimal(value) / Decimal(10**12)), "evidence": level.label}
                for level, value in saved.items()
            ],
        }

    def _saving_pusd_per_token(self, route: str) -> int:
        """What one captured token saved at ``route``'s prices (input minus cached input)."""
        for spec in self.profile.effective_routes():
            if spec.name == route:
                full, cached, _ = spec.token_prices_pusd()
                return max(0, full - cached)
        return 0


def _key_of(group: LedgerGroup, group_by: str, tenant: str) -> str:
    """The report's name of the group ``group`` falls in."""
    if group_by == "profile":
        return group.profile
    if group_by == "snapshot":
        return NO_SNAPSHOT if group.snapshot is None else group.snapshot
    if group_by == "route":
        return group.route
    return tenant


def _check(group_by: str, window_s: int) -> None:
    if group_by not in GROUPS:
        raise InvalidRequestError(f"group_by must be one of: {', '.join(GROUPS)}.", param="group_by")
    if not 1 <= window_s <= MAX_WINDOW_S:
        raise InvalidRequestError(f"window_s must be 1 to {MAX_WINDOW_S} seconds.", param="window_s")
