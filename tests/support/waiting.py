"""Waiting on a condition instead of sleeping and hoping: poll a predicate until it holds, and
fail with what was awaited when it does not in time."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(
    condition: Callable[[], bool], *, timeout_s: float, what: str, interval_s: float = 0.05
) -> float:
    """Seconds until ``condition()`` held; AssertionError naming ``what`` after ``timeout_s``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)
    return time.monotonic() - started
