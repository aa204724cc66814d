"""Reuse in Redis: the opportunity index and the reuse ledger, scoped by tenant.

    zumik:seen:{scope}:{compat16}       sorted set of prefix block keys seen in one isolation
                                        scope (score: last seen, unix seconds); entries older
                                        than the TTL and beyond ``max_entries`` (oldest first) are
                                        dropped, so its memory is bounded; shared by every
                                        gateway replica
    z:{tenant}:reuse:{minute}           hash: (group, figure) → count (kept 8 days)
    z:{tenant}:reuse-capture:{minute}   hash: (snapshot or null for all, level) → captured tokens
                                        (kept 8 days)
    z:{tenant}:reuse-family:{minute}    hash: (prefix family, figure) → count, figures
                                        ``requests``, ``prompt`` and ``captured:<level>`` (kept 8
                                        days): what escalation evidence reads, per family

A ledger field is the JSON array ``[profile, snapshot, route, figure]`` (snapshot null when the
request pinned none), so no name can be mistaken for a separator. Fields written before, as
``profile|snapshot|route|figure`` with ``-`` for no snapshot, still read back. Figures:
``requests``, ``prompt``, ``opportunity:<level>``, ``captured:<level>``,
``captured_requests:unknown`` and ``captured_source:<source>``; ``LedgerGroup`` and
``LedgerCounts`` are what crosses to the service, and their encoding lives here only.

Looking a prompt up and recording it is one round trip (``SEEN``): the walk counts the leading
keys already present, stops at the first gap (a later block is only reusable after every block
before it), then records every key. Recording a request's figures is one script too (``ADD``):
one reply to read instead of one per field, which is most of its cost on the gateway's CPU.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import redis.asyncio as aioredis
from pydantic import TypeAdapter, ValidationError

from zumik_serve.reuse.evidence import EvidenceLevel
from zumik_serve.reuse.figures import ReuseFigures

LEDGER_TTL_S = 8 * 24 * 3600
BUCKET_S = 60
SEEN_TTL_S = 3600
SEEN_MAX_ENTRIES = 200_000
NO_SNAPSHOT_LEGACY = "-"  # the snapshot part of a legacy field whose request pinned none
K = TypeVar("K")

# KEYS: index. ARGV: now, ttl, max entries, key... Returns the leading keys already present.
SEEN = """
local now, ttl, cap = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
local matched, walking = 0, true
for i = 4, #ARGV do
  if walking and redis.call('ZSCORE', KEYS[1], ARGV[i]) then matched = matched + 1 else walking = false end
end
for i = 4, #ARGV do redis.call('ZADD', KEYS[1], now, ARGV[i]) end
local size = redis.call('ZCARD', KEYS[1])
if size > cap then redis.call('ZREMRANGEBYRANK', KEYS[1], 0, size - cap - 1) end
redis.call('EXPIRE', KEYS[1], ttl)
return matched
"""

# KEYS: the hashes written. ARGV: their ttl, then (key index, field, increment) triples. Every
# increment, then every hash's expiry, in one atomic step.
ADD = """
for i = 2, #ARGV, 3 do redis.call('HINCRBY', KEYS[tonumber(ARGV[i])], ARGV[i + 1], ARGV[i + 2]) end
for k = 1, #KEYS do redis.call('EXPIRE', KEYS[k], ARGV[1]) end
return 0
"""


@dataclass(frozen=True)
class LedgerGroup:
    """What the ledger sums by: the profile, the snapshot the request pinned (None: none) and
    the route that served it. Any string may be a part (a ``|`` included)."""

    profile: str
    snapshot: str | None
    route: str


@dataclass(frozen=True)
class LedgerCounts:
    """A group's figures: one request's, or a sum over time. Each evidence level keeps its own
    count (never blended); a level present with 0 was recorded with 0 tokens, and a level absent
    was never recorded. Mappings keep the order their entries were first recorded in."""

    requests: int = 0
    prompt_tokens: int = 0
    opportunity_tokens: Mapping[EvidenceLevel, int] = field(default_factory=dict)
    captured_tokens: Mapping[EvidenceLevel, int] = field(default_factory=dict)
    captured_unknown_requests: int = 0  # requests whose source did not say what it captured
    captured_by_source: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, figures: ReuseFigures) -> LedgerCounts:
        """One request's counts."""
        captured = figures.captured_tokens
        return cls(
            requests=1,
            prompt_tokens=figures.prompt_tokens,
            opportunity_tokens={figures.opportunity_level: figures.opportunity_tokens},
            captured_tokens={} if captured is None else {figures.captured_level: captured},
            captured_unknown_requests=1 if captured is None else 0,
            captured_by_source=dict(figures.captured_sources),
        )

    def plus(self, other: LedgerCounts) -> LedgerCounts:
        return LedgerCounts(
            requests=self.requests + other.requests,
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            opportunity_tokens=_summed(self.opportunity_tokens, other.opportunity_tokens),
            captured_tokens=_summed(self.captured_tokens, other.captured_tokens),
            captured_unknown_requests=self.captured_unknown_requests + other.captured_unknown_requests,
            captured_by_source=_summed(self.captured_by_source, other.captured_by_source),
        )


@dataclass(frozen=True)
class FamilyCounts:
    """A prefix family's figures over a window: its requests, their prompt tokens, the tokens
    captured at each level (levels never captured are absent), and the start (unix seconds) of
    the newest minute in which it captured anything (None: none in the window)."""

    requests: int = 0
    prompt_tokens: int = 0
    captured_tokens: Mapping[EvidenceLevel, int] = field(default_factory=dict)
    newest_capture_s: int | None = None


@dataclass(frozen=True)
class LedgerBucket:
    """One minute of a tenant's ledger: its start (unix seconds) and each group's counts."""

    start_s: int
    groups: Mapping[LedgerGroup, LedgerCounts]


class RedisReuseStore:
    def __init__(
        self, client: aioredis.Redis, *, seen_ttl_s: int = SEEN_TTL_S, max_entries: int = SEEN_MAX_ENTRIES
    ):
        self._redis = client
        self._ttl_s = seen_ttl_s
        self._max_entries = max_entries
        self._seen = client.register_script(SEEN)
        self._add = client.register_script(ADD)

    async def seen_prefix_blocks(self, scope: str, compat_digest: str, keys: Sequence[str]) -> int:
        """How many leading ``keys`` this scope has seen before; records them all as seen now."""
        if not keys:
            return 0
        now = int(time.time())
        args: list[str | int] = [now, self._ttl_s, self._max_entries, *keys]
        return int(await self._seen(keys=[seen_key(scope, compat_digest)], args=args))

    async def record(
        self, tenant: str, group: LedgerGroup, counts: LedgerCounts, *, now_s: int | None = None,
        family: str | None = None,
    ) -> None:  # fmt: skip
        """Add ``counts`` to the group's figures of this minute, and to the prefix family's when
        ``family`` is given (one round trip)."""
        bucket = (int(time.time()) if now_s is None else now_s) // BUCKET_S
        keys: list[str] = []
        args: list[str | int | bytes] = [LEDGER_TTL_S]

        def add(key: str, field: bytes, value: int) -> None:
            if key not in keys:
                keys.append(key)
            args.extend((keys.index(key) + 1, field, value))

        if family is not None:
            by_family = _family_key(tenant, bucket)
            family_figures = [("requests", counts.requests), ("prompt", counts.prompt_tokens)]
            by_level = counts.captured_tokens.items()
            family_figures += [(f"captured:{level.label}", n) for level, n in by_level if n > 0]
            for figure, value in family_figures:
                add(by_family, _family_field(family, figure), value)
        ledger = _ledger_key(tenant, bucket)
        for figure, value in _figures_of(counts):
            add(ledger, _ledger_field(group, figure), value)
        captured = [(level, tokens) for level, tokens in counts.captured_tokens.items() if tokens > 0]
        for level, tokens in captured:
            for snapshot in {None, group.snapshot}:  # the tenant's traffic, and the snapshot's
                add(_capture_key(tenant, bucket), _capture_field(snapshot, level.label), tokens)
        await self._add(keys=keys, args=args)

    async def window(
        self, tenant: str, window_s: int, *, now_s: int | None = None
    ) -> dict[LedgerGroup, LedgerCounts]:
        """Each group's figures summed over the last ``window_s`` seconds (whole minutes)."""
        totals: dict[LedgerGroup, LedgerCounts] = {}
        for bucket in await self.buckets(tenant, window_s, now_s=now_s):
            for group, counts in bucket.groups.items():
                totals[group] = totals[group].plus(counts) if group in totals else counts
        return totals

    async def buckets(self, tenant: str, window_s: int, *, now_s: int | None = None) -> list[LedgerBucket]:
        """The ledger minute by minute over the last ``window_s`` seconds, oldest first."""
        minutes = _minutes(window_s, now_s)
        async with self._redis.pipeline(transaction=False) as pipe:
            for bucket in minutes:
                pipe.hgetall(_ledger_key(tenant, bucket))
            replies = await pipe.execute()
        return [
            LedgerBucket(start_s=bucket * BUCKET_S, groups=_decode_bucket(fields))
            for bucket, fields in zip(minutes, replies, strict=True)
        ]

    async def captured_tokens(
        self, tenant: str, *, snapshot: str | None, window_s: int, now_s: int | None = None
    ) -> dict[EvidenceLevel, int]:
        """Captured tokens by level over the last ``window_s`` seconds (whole minutes), of the
        tenant's requests that pinned ``snapshot`` (None: of all its requests); one round trip.
        Levels with no capture are absent."""
        levels = [level for level in EvidenceLevel if level is not EvidenceLevel.UNKNOWN]
        fields = [_CAPTURE_FIELD.dump_json((snapshot, level.label)) for level in levels]
        async with self._redis.pipeline(transaction=False) as pipe:
            for bucket in _minutes(window_s, now_s):
                pipe.hmget(_capture_key(tenant, bucket), fields)
            replies = await pipe.execute()
        totals: dict[EvidenceLevel, int] = {}
        for values in replies:
            for level, value in zip(levels, values, strict=True):
                if value is not None:
                    totals[level] = totals.get(level, 0) + int(value)
        return totals

    async def family_counts(
        self, tenant: str, family: str, *, window_s: int, now_s: int | None = None
    ) -> FamilyCounts:
        """The family's figures over the last ``window_s`` seconds (whole minutes); one round
        trip."""
        levels = [level for level in EvidenceLevel if level is not EvidenceLevel.UNKNOWN]
        figures = ["requests", "prompt", *(f"captured:{level.label}" for level in levels)]
        fields = [_FAMILY_FIELD.dump_json((family, figure)) for figure in figures]
        minutes = _minutes(window_s, now_s)
        async with self._redis.pipeline(transaction=False) as pipe:
            for bucket in minutes:
                pipe.hmget(_family_key(tenant, bucket), fields)
            replies = await pipe.execute()
        requests = prompt = 0
        captured: dict[EvidenceLevel, int] = {}
        newest: int | None = None
        for bucket, values in zip(minutes, replies, strict=True):
            counts = [int(value) if value is not None else None for value in values]
            requests += counts[0] or 0
            prompt += counts[1] or 0
            for level, tokens in zip(levels, counts[2:], strict=True):
                if tokens:
                    captured[level] = captured.get(level, 0) + tokens
                    newest = bucket * BUCKET_S
        return FamilyCounts(requests, prompt, captured, newest)

    async def forget_scopes(self, scopes: Sequence[str]) -> int:
        """Remove the opportunity index of purged scopes: one ``SCAN`` for all of them (a
        purge names every salt epoch the tenant has had), keys unlinked a batch at a time."""
        wanted = {scope.encode() for scope in scopes}
        if not wanted:
            return 0
        match = f"zumik:seen:{scopes[0]}:*" if len(wanted) == 1 else "zumik:seen:*"
        removed = 0
        batch: list[bytes] = []
        async for key in self._redis.scan_iter(match=match, count=1000):
            parts = key.split(b":", 3)  # zumik:seen:{scope}:{compat}
            if len(parts) == 4 and parts[2] in wanted:
                batch.append(key)
            if len(batch) >= 1000:
                removed += int(await self._redis.unlink(*batch))
                batch = []
        if batch:
            removed += int(await self._redis.unlink(*batch))
        return removed


def seen_key(scope: str, compat_digest: str) -> str:
    return f"zumik:seen:{scope}:{compat_digest[:16]}"


# [profile, snapshot or null, route, figure] and [snapshot or null, level label]
_LEDGER_FIELD: TypeAdapter[tuple[str, str | None, str, str]] = TypeAdapter(tuple[str, str | None, str, str])
_CAPTURE_FIELD: TypeAdapter[tuple[str | None, str]] = TypeAdapter(tuple[str | None, str])
_FAMILY_FIELD: TypeAdapter[tuple[str, str]] = TypeAdapter(tuple[str, str])  # [family, figure]


def _ledger_key(tenant: str, bucket: int) -> str:
    return f"z:{{{tenant}}}:reuse:{bucket}"


def _capture_key(tenant: str, bucket: int) -> str:
    return f"z:{{{tenant}}}:reuse-capture:{bucket}"


def _family_key(tenant: str, bucket: int) -> str:
    return f"z:{{{tenant}}}:reuse-family:{bucket}"


# The fields' JSON, cached: a request writes about ten, nearly all of them seen before (their
# parts are profile, snapshot, route, figure and family names, none of them a tenant's id).
@functools.lru_cache(maxsize=4096)
def _ledger_field(group: LedgerGroup, figure: str) -> bytes:
    return _LEDGER_FIELD.dump_json((group.profile, group.snapshot, group.route, figure))


@functools.lru_cache(maxsize=4096)
def _family_field(family: str, figure: str) -> bytes:
    return _FAMILY_FIELD.dump_json((family, figure))


@functools.lru_cache(maxsize=1024)
def _capture_field(snapshot: str | None, level: str) -> bytes:
    return _CAPTURE_FIELD.dump_json((snapshot, level))


def _minutes(window_s: int, now_s: int | None) -> range:
    if window_s < 1:
        raise ValueError("window_s must be >= 1")
    newest = (int(time.time()) if now_s is None else now_s) // BUCKET_S
    return range(newest - -(-window_s // BUCKET_S) + 1, newest + 1)


def _figures_of(counts: LedgerCounts) -> list[tuple[str, int]]:
    figures = [("requests", counts.requests), ("prompt", counts.prompt_tokens)]
    figures += [(f"opportunity:{level.label}", tokens) for level, tokens in counts.opportunity_tokens.items()]
    if counts.captured_unknown_requests:
        figures.append(("captured_requests:unknown", counts.captured_unknown_requests))
    figures += [(f"captured:{level.label}", tokens) for level, tokens in counts.captured_tokens.items()]
    figures += [(f"captured_source:{source}", tokens) for source, tokens in counts.captured_by_source.items()]
    return figures


def _decode_field(raw: bytes | str) -> tuple[LedgerGroup, str] | None:
    """A ledger field's group and figure; None for a field that is neither format."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    if text.startswith("["):
        try:
            profile, snapshot, route, figure = _LEDGER_FIELD.validate_json(text)
        except ValidationError:
            return None
        return LedgerGroup(profile, snapshot, route), figure
    parts = text.split("|", 3)  # the format before: profile|snapshot|route|figure
    if len(parts) != 4:
        return None
    profile, legacy_snapshot, route, figure = parts
    snapshot = None if legacy_snapshot == NO_SNAPSHOT_LEGACY else legacy_snapshot
    return LedgerGroup(profile, snapshot, route), figure


def _decode_bucket(fields: Mapping[bytes | str, bytes | str]) -> dict[LedgerGroup, LedgerCounts]:
    sums: dict[LedgerGroup, _Sums] = {}
    for raw, value in fields.items():
        decoded = _decode_field(raw)
        if decoded is not None:
            group, figure = decoded
            sums.setdefault(group, _Sums()).add(figure, int(value))
    return {group: item.counts() for group, item in sums.items()}


class _Sums:
    """A group's figures while a bucket's fields are read."""

    def __init__(self) -> None:
        self.requests = self.prompt_tokens = self.captured_unknown_requests = 0
        self.opportunity: dict[EvidenceLevel, int] = {}
        self.captured: dict[EvidenceLevel, int] = {}
        self.sources: dict[str, int] = {}

    def add(self, figure: str, value: int) -> None:
        name, _, qualifier = figure.partition(":")
        if figure == "requests":
            self.requests += value
        elif figure == "prompt":
            self.prompt_tokens += value
        elif figure == "captured_requests:unknown":
            self.captured_unknown_requests += value
        elif name == "captured_source":
            self.sources[qualifier] = self.sources.get(qualifier, 0) + value
        elif name in ("opportunity", "captured") and qualifier.upper() in EvidenceLevel.__members__:
            by_level = self.opportunity if name == "opportunity" else self.captured
            level = EvidenceLevel.parse(qualifier)
            by_level[level] = by_level.get(level, 0) + value
        # any other figure is one this version does not know: skipped

    def counts(self) -> LedgerCounts:
        return LedgerCounts(
            requests=self.requests,
            prompt_tokens=self.prompt_tokens,
            opportunity_tokens=self.opportunity,
            captured_tokens=self.captured,
            captured_unknown_requests=self.captured_unknown_requests,
            captured_by_source=self.sources,
        )


def _summed(first: Mapping[K, int], second: Mapping[K, int]) -> dict[K, int]:
    summed = dict(first)
    for key, value in second.items():
        summed[key] = summed.get(key, 0) + value
    return summed
