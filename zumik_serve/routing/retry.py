"""Retries as values: what to do after an attempt (``classify``) and whether the profile can
afford another attempt (``RetryBudget``).

A retry budget caps retries (and fallbacks, which are also extra attempts) at ``ratio`` of the
requests seen in a sliding window, plus a small floor, so that a provider outage cannot turn
into a retry storm that multiplies load (Finagle's and Envoy's retry budgets keep the same
rule). Both are pure: times come in as ``now_ms`` and the budget is a frozen value whose
methods return the next value.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from decimal import Decimal
from enum import StrEnum

from pydantic import TypeAdapter


class AttemptOutcome(StrEnum):
    """What one attempt at a route came back with."""

    OK = "ok"
    RATE_LIMITED = "rate_limited"  # HTTP 429, maybe with Retry-After
    SERVER_ERROR = "server_error"  # HTTP 5xx
    TIMEOUT = "timeout"  # no complete answer within the route's timeout_s
    CONNECT_ERROR = "connect_error"  # the request never reached the provider
    CLIENT_ERROR = "client_error"  # HTTP 4xx other than 429: the request itself is wrong
    AUTH_ERROR = "auth_error"  # HTTP 401/403/407 from a provider: it refused the route's key


@dataclass(frozen=True)
class Attempt:
    """One attempt at carrying a decision out, as recorded with it (``GET /v2/decisions/{id}``):
    the route (and replica) tried, its outcome (an ``AttemptOutcome`` value, or ``saturated`` /
    ``skipped`` when nothing was sent), the HTTP status if any, what followed and why, and the
    route's breaker state after it."""

    route: str
    replica: str | None
    attempt: int
    outcome: str
    status: int | None
    action: str
    reason: str
    breaker_after: str | None = None


ATTEMPTS: TypeAdapter[tuple[Attempt, ...]] = TypeAdapter(tuple[Attempt, ...])


class RetryAction(StrEnum):
    DONE = "done"  # the attempt succeeded
    RETRY = "retry"  # the same route again, after delay_ms
    FALLBACK = "fallback"  # the next route of the decision's fallbacks
    FAIL = "fail"  # give the client the error; another route would fail the same way


@dataclass(frozen=True)
class RetryVerdict:
    """``counts_as_failure``: whether the outcome feeds the route's circuit breaker (a rate limit
    or a bad request says nothing about the route's health)."""

    action: RetryAction
    delay_ms: int
    counts_as_failure: bool
    reason: str


def classify(
    outcome: AttemptOutcome,
    *,
    attempt: int,
    max_retries: int,
    retry_after_s: int | None = None,
    max_retry_after_s: int = 5,
) -> RetryVerdict:
    """What to do after attempt number ``attempt`` (1 for the first) at a route that allows
    ``max_retries`` retries. A rate limit is retried on the same route only when it says when
    (``retry_after_s``) and that is soon (at most ``max_retry_after_s``); otherwise the next
    route is cheaper than waiting. A server error is retried while retries remain; timeouts and
    connect errors move on at once (the route is slow or down, and the timeout was spent)."""
    retries_left = attempt <= max_retries
    if outcome is AttemptOutcome.OK:
        return RetryVerdict(RetryAction.DONE, 0, False, "ok")
    if outcome is AttemptOutcome.CLIENT_ERROR:
        return RetryVerdict(RetryAction.FAIL, 0, False, "client error: the request itself is refused")
    if outcome is AttemptOutcome.RATE_LIMITED:
        if retry_after_s is not None and retry_after_s <= max_retry_after_s and retries_left:
            return RetryVerdict(RetryAction.RETRY, retry_after_s * 1000, False, "rate limited; retry after")
        return RetryVerdict(RetryAction.FALLBACK, 0, False, "rate limited; no short retry-after")
    if outcome is AttemptOutcome.SERVER_ERROR and retries_left:
        return RetryVerdict(RetryAction.RETRY, 0, True, "server error; retries left")
    return RetryVerdict(RetryAction.FALLBACK, 0, True, f"{outcome.value}; next route")


@dataclass(frozen=True)
class RetryBudget:
    """Counts of requests and retries in ``num_buckets`` time buckets covering ``window_ms``.

    ``allow(now_ms)``: one more retry is allowed while retries in the window, plus one, stay
    within ``ratio`` * requests in the window + ``min_retries``. Buckets older than the window
    drop out as time moves; a clock that moves backwards counts into the newest bucket."""

    ratio: Decimal = Decimal("0.2")
    window_ms: int = 10_000
    min_retries: int = 3
    num_buckets: int = 10
    buckets: tuple[tuple[int, int, int], ...] = ()  # (bucket index, requests, retries), oldest first

    def __post_init__(self) -> None:
        if self.ratio < 0 or self.window_ms < 1 or self.min_retries < 0 or self.num_buckets < 1:
            raise ValueError("ratio, min_retries must be >= 0; window_ms, num_buckets >= 1")

    def record_request(self, now_ms: int) -> RetryBudget:
        return self._add(now_ms, requests=1, retries=0)

    def record_retry(self, now_ms: int) -> RetryBudget:
        return self._add(now_ms, requests=0, retries=1)

    def allow(self, now_ms: int) -> bool:
        requests, retries = self.counts(now_ms)
        return retries + 1 <= self.ratio * requests + self.min_retries

    def counts(self, now_ms: int) -> tuple[int, int]:
        """(requests, retries) in the window ending at ``now_ms``."""
        live = self._live(self._bucket(now_ms))
        return sum(b[1] for b in live), sum(b[2] for b in live)

    def _bucket(self, now_ms: int) -> int:
        index = now_ms * self.num_buckets // self.window_ms
        return max(index, self.buckets[-1][0]) if self.buckets else index

    def _live(self, newest: int) -> tuple[tuple[int, int, int], ...]:
        return tuple(b for b in self.buckets if b[0] > newest - self.num_buckets)

    def _add(self, now_ms: int, *, requests: int, retries: int) -> RetryBudget:
        index = self._bucket(now_ms)
        live = list(self._live(index))
        if live and live[-1][0] == index:
            _, old_requests, old_retries = live[-1]
            live[-1] = (index, old_requests + requests, old_retries + retries)
        else:
            live.append((index, requests, retries))
        return replace(self, buckets=tuple(live))
