"""A circuit breaker per route candidate, as pure transitions over explicit times (int ms).

::

              failure_threshold consecutive failures
    closed ─────────────────────────────────────────────▶ open (opened_at_ms = now)
      ▲                                                   │
      │ probe succeeds                cooldown has passed │
      │                                                   ▼
      └──────────────────────────────────────────────── half_open ── probe fails ──▶ open
                                                        (admits one probe at a time)

No function here reads a clock: the caller passes ``now_ms`` and stores the returned state, so a
recorded state plus a recorded time gives the same answer on replay. The scheduler keeps one
state per candidate (``routing/scheduler.py``) and the dispatcher calls ``admit`` before each
send, so a half-open route takes one probe at a time on the production path.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum


class BreakerStatus(StrEnum):
    CLOSED = "closed"  # requests flow
    OPEN = "open"  # requests are refused until the cooldown has passed
    HALF_OPEN = "half_open"  # one probe request may go; its outcome closes or re-opens


@dataclass(frozen=True)
class BreakerPolicy:
    """``failure_threshold`` consecutive failures open the breaker; ``cooldown_ms`` later it
    admits a probe. A probe that reports nothing within another cooldown counts as lost, and a
    new probe is admitted (so a crashed caller cannot wedge the breaker half open)."""

    failure_threshold: int = 3
    cooldown_ms: int = 10_000

    def __post_init__(self) -> None:
        if self.failure_threshold < 1 or self.cooldown_ms < 0:
            raise ValueError("failure_threshold must be >= 1 and cooldown_ms >= 0")


@dataclass(frozen=True)
class BreakerState:
    """One candidate's breaker, as recorded. ``opened_at_ms`` is None unless the breaker has
    opened since it last closed; ``probe_started_at_ms`` is None unless a half-open probe is out."""

    state: BreakerStatus = BreakerStatus.CLOSED
    consecutive_failures: int = 0
    opened_at_ms: int | None = None
    probe_started_at_ms: int | None = None


CLOSED = BreakerState()


def current(state: BreakerState, now_ms: int, policy: BreakerPolicy) -> BreakerState:
    """The state as of ``now_ms``: an open breaker whose cooldown has passed is half open, and a
    probe out for longer than a cooldown is forgotten."""
    if state.state is BreakerStatus.OPEN:
        if state.opened_at_ms is None or now_ms >= state.opened_at_ms + policy.cooldown_ms:
            return replace(state, state=BreakerStatus.HALF_OPEN, probe_started_at_ms=None)
        return state
    if (
        state.state is BreakerStatus.HALF_OPEN
        and state.probe_started_at_ms is not None
        and now_ms >= state.probe_started_at_ms + policy.cooldown_ms
    ):
        return replace(state, probe_started_at_ms=None)
    return state


def can_admit(state: BreakerState, now_ms: int, policy: BreakerPolicy) -> bool:
    """Whether a request may go to this candidate now (half open: only when no probe is out)."""
    now = current(state, now_ms, policy)
    if now.state is BreakerStatus.CLOSED:
        return True
    return now.state is BreakerStatus.HALF_OPEN and now.probe_started_at_ms is None


def admit(state: BreakerState, now_ms: int, policy: BreakerPolicy) -> tuple[bool, BreakerState]:
    """Send a request if the breaker lets it through: (admitted, the state to store). Half open,
    the admitted request is the probe, and no other is admitted until it reports."""
    now = current(state, now_ms, policy)
    if now.state is BreakerStatus.CLOSED:
        return True, now
    if now.state is BreakerStatus.HALF_OPEN and now.probe_started_at_ms is None:
        return True, replace(now, probe_started_at_ms=now_ms)
    return False, now


def record_success(state: BreakerState, now_ms: int, policy: BreakerPolicy) -> BreakerState:
    """A success closes the breaker and clears the failure count (from any state: a late success
    from before the breaker opened is still evidence that the candidate answers)."""
    return CLOSED


def record_failure(state: BreakerState, now_ms: int, policy: BreakerPolicy) -> BreakerState:
    """A failure counts toward the threshold when closed, re-opens a half-open breaker at
    ``now_ms``, and leaves an open breaker's cooldown where it is."""
    now = current(state, now_ms, policy)
    failures = now.consecutive_failures + 1
    if now.state is BreakerStatus.HALF_OPEN or (
        now.state is BreakerStatus.CLOSED and failures >= policy.failure_threshold
    ):
        return BreakerState(BreakerStatus.OPEN, failures, opened_at_ms=now_ms)
    return replace(now, consecutive_failures=failures)
