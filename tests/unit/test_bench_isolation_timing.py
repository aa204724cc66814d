"""The statistics and the verdict of ``zumik bench isolation-timing``
(``zumik_serve/bench/isolation_timing.py``), on samples built here.

Invariants: the one-sided Mann-Whitney p-value is small when the first sample is clearly
smaller, near 1 when it is clearly larger, about one half for the same values, and matches the
textbook normal approximation; ties are handled. The verdict is "leak" when b-same is faster
than b-fresh while the control sees a hit, or when b-same reported cached tokens even once;
"inconclusive" when the control sees nothing; "isolated" otherwise.
"""

from __future__ import annotations

import math
import random

from zumik_serve.bench.isolation_timing import Sample, TimingResult, mann_whitney_less, median_ratio


def test_mann_whitney_separated_samples_and_direction() -> None:
    small, large = [float(v) for v in range(1, 21)], [float(v) for v in range(21, 41)]
    assert mann_whitney_less(small, large) < 1e-6
    assert mann_whitney_less(large, small) > 1 - 1e-6
    assert 0.4 < mann_whitney_less(small, list(small)) < 0.6


def test_mann_whitney_matches_the_normal_approximation_by_hand() -> None:
    x, y = [1.0, 2.0, 4.0], [3.0, 5.0, 6.0, 7.0]
    u_x = (1 + 2 + 4) - 3 * 4 / 2  # ranks 1, 2, 4
    sigma = math.sqrt(3 * 4 * (3 + 4 + 1) / 12)
    expected = 0.5 * math.erfc(-((u_x - 6 + 0.5) / sigma) / math.sqrt(2))
    assert math.isclose(mann_whitney_less(x, y), expected, rel_tol=1e-12)


def test_mann_whitney_with_ties_and_degenerate_input() -> None:
    assert mann_whitney_less([5.0] * 10, [5.0] * 10) == 1.0  # no variance: no evidence
    assert mann_whitney_less([], [1.0]) == 1.0
    assert mann_whitney_less([1.0, 1.0, 2.0, 2.0] * 5, [2.0, 2.0, 3.0, 3.0] * 5) < 1e-3


def test_median_ratio_interval_holds_the_ratio() -> None:
    rng = random.Random(1)
    x = [rng.gauss(50, 5) for _ in range(100)]
    y = [rng.gauss(100, 10) for _ in range(100)]
    ratio = median_ratio(x, y, seed=1)
    assert ratio["low"] <= ratio["ratio"] <= ratio["high"]
    assert 0.4 < ratio["ratio"] < 0.6


def _result(
    a_repeat: list[float], b_same: list[float], b_fresh: list[float], b_cached: int = 0
) -> TimingResult:
    result = TimingResult(prompt_tokens=100, prefix_tokens=95, rounds=len(b_fresh), warm=1)
    for arm, values in (("a-repeat", a_repeat), ("b-same", b_same), ("b-fresh", b_fresh)):
        for index, value in enumerate(values):
            cached = b_cached if arm == "b-same" and index == 0 else (64 if arm == "a-repeat" else 0)
            result.samples.append(Sample(index, arm, value, cached))
    return result


def test_verdicts() -> None:
    rng = random.Random(7)
    miss = [rng.gauss(100, 5) for _ in range(40)]
    other_miss = [rng.gauss(100, 5) for _ in range(40)]
    hit = [rng.gauss(30, 3) for _ in range(40)]

    def verdict(result: TimingResult) -> str:
        return str(result.summary(leak_alpha=0.01, control_alpha=1e-6)["verdict"])

    assert verdict(_result(hit, other_miss, miss)) == "isolated"
    assert verdict(_result(hit, hit, miss)) == "leak"  # b-same times like A's own hit
    assert verdict(_result(hit, other_miss, miss, b_cached=32)) == "leak"  # one cached token report
    assert verdict(_result(other_miss, other_miss, miss)) == "inconclusive"  # the control saw no hit
