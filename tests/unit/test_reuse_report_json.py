"""The /v2/reuse report is pinned: for a fixed mix of requests, every grouping's report and
series is byte for byte what the ledger code before typed ledger keys rendered (the golden value
below was computed with that code over the same requests).

Invariants held here:
- report and series bodies keep their fields, their order and their values for every
  ``group_by``, savings levels in the order their captures were first recorded (a series is
  compared when the requests fell in one minute).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from profiles import load_builtin
from zumik_serve.reuse.figures import ReuseFigures
from zumik_serve.reuse.service import GROUPS, ReuseService
from zumik_serve.reuse.store import RedisReuseStore
from zumik_serve.store.local_redis import LocalRedis

pytestmark = pytest.mark.redis

# (route, route kind, snapshot, opportunity tokens, cached tokens, the engine's KV report)
REQUESTS: list[tuple[str, str, str | None, int | None, int | None, dict[str, object] | None]] = [
    ("managed", "managed", None, 64, 32, None),
    ("local", "byoc", "snp_x", 64, 64, {"tiers": {"redis": 32}}),
    ("managed", "managed", None, 0, None, None),
    ("byok", "byok", "snp_x", 32, 0, None),
    ("local", "byoc", None, None, 16, None),
    ("local", "byoc", "snp_y", 128, 96, {"tiers": {"host": 64, "disk": 16}}),
]


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    server = LocalRedis(data_dir=tmp_path / "redis").start()
    yield server.url
    server.stop()


async def test_reports_and_series_are_byte_identical_to_the_pinned_ones(redis_url: str) -> None:
    service = ReuseService(
        RedisReuseStore(aioredis.from_url(redis_url)), load_builtin("local-cpu-2x"), scope_digest="d"
    )
    for route, kind, snapshot, opportunity, cached, kv_report in REQUESTS:
        figures = ReuseFigures.of(
            prompt_tokens=200, opportunity_tokens=opportunity, route_kind=kind, cached_tokens=cached,
            kv_report=kv_report,
        )  # fmt: skip
        await service.record("ten_a", figures, snapshot=snapshot, route=route)
    rendered: dict[str, Any] = {}
    for group_by in GROUPS:
        rendered[group_by] = await service.report("ten_a", group_by=group_by, window_s=600)
        points = await service.series("ten_a", group_by=group_by, window_s=600)
        rendered[f"{group_by}-series"] = [{k: v for k, v in p.items() if k != "t"} for p in points]
    compact = {"separators": (",", ":"), "ensure_ascii": False}  # what a JSONResponse writes
    for name, golden in REPORTS.items():
        if name.endswith("-series") and len(rendered[name]) > len(golden):  # a minute turned over
            continue
        assert json.dumps(rendered[name], **compact) == json.dumps(golden, **compact), name


# --- the golden value, computed with the ledger code before this version ------------------------

REPORTS: dict[str, Any] = {
    "tenant": {
        "object": "reuse_report",
        "group_by": "tenant",
        "window_s": 600,
        "groups": [
            {
                "tenant": "ten_a",
                "requests": 6,
                "prompt_tokens": 1200,
                "opportunity": {"tokens": 288, "evidence": "estimated"},
                "captured": [
                    {"tokens": 176, "evidence": "observed"},
                    {"tokens": 32, "evidence": "reported"},
                    {"requests": 1, "tokens": None, "evidence": "unknown"},
                ],
                "captured_by_source": {"disk": 16, "engine": 48, "host": 64, "redis": 32},
                "savings_usd": [
                    {"usd": "0.0000024", "evidence": "reported"},
                    {"usd": "0.000044", "evidence": "observed"},
                ],
            }
        ],
    },
    "tenant-series": [
        {
            "tenant": "ten_a",
            "opportunity_estimated": 288,
            "captured_observed": 176,
            "captured_reported": 32,
            "captured_unknown_requests": 1,
        }
    ],
    "profile": {
        "object": "reuse_report",
        "group_by": "profile",
        "window_s": 600,
        "groups": [
            {
                "profile": "local-cpu-2x",
                "requests": 6,
                "prompt_tokens": 1200,
                "opportunity": {"tokens": 288, "evidence": "estimated"},
                "captured": [
                    {"tokens": 176, "evidence": "observed"},
                    {"tokens": 32, "evidence": "reported"},
                    {"requests": 1, "tokens": None, "evidence": "unknown"},
                ],
                "captured_by_source": {"disk": 16, "engine": 48, "host": 64, "redis": 32},
                "savings_usd": [
                    {"usd": "0.0000024", "evidence": "reported"},
                    {"usd": "0.000044", "evidence": "observed"},
                ],
            }
        ],
    },
    "profile-series": [
        {
            "profile": "local-cpu-2x",
            "opportunity_estimated": 288,
            "captured_observed": 176,
            "captured_reported": 32,
            "captured_unknown_requests": 1,
        }
    ],
    "snapshot": {
        "object": "reuse_report",
        "group_by": "snapshot",
        "window_s": 600,
        "groups": [
            {
                "snapshot": "-",
                "requests": 3,
                "prompt_tokens": 600,
                "opportunity": {"tokens": 64, "evidence": "estimated"},
                "captured": [
                    {"tokens": 16, "evidence": "observed"},
                    {"tokens": 32, "evidence": "reported"},
                    {"requests": 1, "tokens": None, "evidence": "unknown"},
                ],
                "captured_by_source": {},
                "savings_usd": [
                    {"usd": "0.0000024", "evidence": "reported"},
                    {"usd": "0.000004", "evidence": "observed"},
                ],
            },
            {
                "snapshot": "snp_x",
                "requests": 2,
                "prompt_tokens": 400,
                "opportunity": {"tokens": 96, "evidence": "estimated"},
                "captured": [
                    {"tokens": 64, "evidence": "observed"},
                    {"tokens": 0, "evidence": "reported"},
                    {"requests": 0, "tokens": None, "evidence": "unknown"},
                ],
                "captured_by_source": {"engine": 32, "redis": 32},
                "savings_usd": [
                    {"usd": "0.000016", "evidence": "observed"},
                    {"usd": "0", "evidence": "reported"},
                ],
            },
            {
                "snapshot": "snp_y",
                "requests": 1,
                "prompt_tokens": 200,
                "opportunity": {"tokens": 128, "evidence": "estimated"},
                "captured": [
                    {"tokens": 96, "evidence": "observed"},
                    {"tokens": 0, "evidence": "reported"},
                    {"requests": 0, "tokens": None, "evidence": "unknown"},
                ],
                "captured_by_source": {"disk": 16, "engine": 16, "host": 64},
                "savings_usd": [{"usd": "0.000024", "evidence": "observed"}],
            },
        ],
    },
    "snapshot-series": [
        {
            "snapshot": "-",
            "opportunity_estimated": 64,
            "captured_observed": 16,
            "captured_reported": 32,
            "captured_unknown_requests": 1,
        },
        {
            "snapshot": "snp_x",
            "opportunity_estimated": 96,
            "captured_observed": 64,
            "captured_reported": 0,
            "captured_unknown_requests": 0,
        },
        {
            "snapshot": "snp_y",
            "opportunity_estimated": 128,
            "captured_observed": 96,
            "captured_reported": 0,
            "captured_unknown_requests": 0,
        },
    ],
    "route": {
        "object": "reuse_report",
        "group_by": "route",
        "window_s": 600,
        "groups": [
            {
                "route": "byok",
                "requests": 1,
                "prompt_tokens": 200,
                "opportunity": {"tokens": 32, "evidence": "estimated"},
                "captured": [
                    {"tokens": 0, "evidence": "observed"},
                    {"tokens": 0, "evidence": "reported"},
                    {"requests": 0, "tokens": None, "evidence": "unknown"},
                ],
                "captured_by_source": {},
                "savings_usd": [{"usd": "0", "evidence": "observed"}, {"usd": "0", "evidence": "reported"}],
            },
            {
                "route": "local",
                "requests": 3,
                "prompt_tokens": 600,
                "opportunity": {"tokens": 192, "evidence": "estimated"},
                "captured": [
                    {"tokens": 176, "evidence": "observed"},
                    {"tokens": 0, "evidence": "reported"},
                    {"requests": 0, "tokens": None, "evidence": "unknown"},
                ],
                "captured_by_source": {"disk": 16, "engine": 48, "host": 64, "redis": 32},
                "savings_usd": [
                    {"usd": "0.000044", "evidence": "observed"},
                    {"usd": "0", "evidence": "reported"},
                ],
            },
            {
                "route": "managed",
                "requests": 2,
                "prompt_tokens": 400,
                "opportunity": {"tokens": 64, "evidence": "estimated"},
                "captured": [
                    {"tokens": 0, "evidence": "observed"},
                    {"tokens": 32, "evidence": "reported"},
                    {"requests": 1, "tokens": None, "evidence": "unknown"},
                ],
                "captured_by_source": {},
                "savings_usd": [
                    {"usd": "0", "evidence": "observed"},
                    {"usd": "0.0000024", "evidence": "reported"},
                ],
            },
        ],
    },
    "route-series": [
        {
            "route": "byok",
            "opportunity_estimated": 32,
            "captured_observed": 0,
            "captured_reported": 0,
            "captured_unknown_requests": 0,
        },
        {
            "route": "local",
            "opportunity_estimated": 192,
            "captured_observed": 176,
            "captured_reported": 0,
            "captured_unknown_requests": 0,
        },
        {
            "route": "managed",
            "opportunity_estimated": 64,
            "captured_observed": 0,
            "captured_reported": 32,
            "captured_unknown_requests": 1,
        },
    ],
}
