"""Recorded JSON is pinned: decision records, releases and reuse figures, byte for byte as the
hand-written serializers wrote them before the TypeAdapters took over (the golden values below
were computed with that code).

Invariants held here:
- a decision record's JSON, in record order (what the dispatcher stores) and in canonical form
  (what replay compares), is byte for byte the pinned one;
- a record stored by the version before reads back equal to the record decided now, renders the
  same bytes again, and replays equal (``routing/replay.py``, ``POST /v2/decisions/{id}/replay``);
- evidence levels are written as their labels and read back as ``EvidenceLevel``;
- a release (stored canonical, shown in record order) and a request's reuse figures render as
  before; a release read back from its stored bytes equals the one written.
"""

from __future__ import annotations

import json
from typing import Any

from profiles.model import RouteKind
from zumik_serve.reuse.evidence import EvidenceLevel
from zumik_serve.reuse.figures import ReuseFigures
from zumik_serve.routing.breaker import BreakerPolicy, BreakerState, BreakerStatus
from zumik_serve.routing.decision import (
    NO_EVIDENCE,
    DecisionInputs,
    DecisionRecord,
    Escalation,
    Evidence,
    RouteCandidate,
    canonical_bytes,
    decide,
)
from zumik_serve.routing.release import Release, RouteEntry
from zumik_serve.routing.replay import replay


def make_candidates() -> tuple[RouteCandidate, ...]:
    """Every candidate shape: a provider with predicted caching, an open breaker, a loaded
    replica holding the prefix, a half-open replica whose probe is out."""
    return (
        RouteCandidate("managed", RouteKind.MANAGED, 150_000, 75_000, 600_000, predicted_cached_tokens=4096),
        RouteCandidate(
            "byok", RouteKind.BYOK, 150_000, 75_000, 600_000,
            breaker=BreakerState(BreakerStatus.OPEN, 3, opened_at_ms=900),
        ),
        RouteCandidate(
            "local", RouteKind.BYOC, 250_000, 0, 250_000,
            replica="r0", matched_prefix_blocks=200, queue_depth=1, running=16, max_num_seqs=16,
        ),
        RouteCandidate(
            "local", RouteKind.BYOC, 250_000, 0, 250_000,
            replica="r1", matched_prefix_blocks=3, running=2, max_num_seqs=16,
            breaker=BreakerState(BreakerStatus.HALF_OPEN, 4, opened_at_ms=100, probe_started_at_ms=1_500),
        ),
    )  # fmt: skip


def make_inputs(evidence: Evidence, **changes: Any) -> DecisionInputs:
    fields: dict[str, Any] = {
        "request_digest": "0123456789abcdef" * 2,
        "tenant": "ten_acme",
        "prompt_num_tokens": 8192,
        "num_prompt_blocks": 256,
        "block_size": 32,
        "profile_name": "golden",
        "profile_fingerprint": "f" * 64,
        "release_id": "rel_aaaaaaaaaaaaaaaaaaaaaaaaaa",
        "snapshot_id": "snp_aaaaaaaaaaaaaaaaaaaaaaaaaa",
        "policy_version": "v1",
        "now_ms": 2_000,
        "seed": 7,
        "candidates": make_candidates(),
        "evidence": evidence,
        "escalation": Escalation("byoc", EvidenceLevel.REPORTED, 10_000, 3600),
        "fallback_order": ("managed", "byok", "local"),
        "default_route": "managed",
        "breaker_policy": BreakerPolicy(3, 10_000),
        "expected_output_tokens": 64,
        "qos": "interactive",
        "prefer_cheapest": False,
    }
    return DecisionInputs(**{**fields, **changes})


# The pinned records are decide-1's (stored before the priced escalation of decide-2): decided
# under that policy they stay byte for byte what was stored, and replay under it.
def escalated_record() -> DecisionRecord:
    inputs = make_inputs(Evidence(EvidenceLevel.OBSERVED, 20_000))
    return decide("dec_aaaaaaaaaaaaaaaaaaaaaaaaaa", inputs, version="decide-1")


def batch_record() -> DecisionRecord:
    inputs = make_inputs(NO_EVIDENCE, release_id=None, snapshot_id=None, qos="batch", prefer_cheapest=True)
    return decide("dec_bbbbbbbbbbbbbbbbbbbbbbbbbb", inputs, version="decide-1")


def stored_bytes(data: dict[str, Any]) -> bytes:
    """How the dispatcher's record reaches the store: record order, no spaces."""
    return json.dumps(data, separators=(",", ":")).encode()


def test_record_json_is_byte_identical_to_the_pinned_one() -> None:
    for record, golden in ((escalated_record(), ESCALATED_RECORD), (batch_record(), BATCH_RECORD)):
        assert stored_bytes(record.to_json()) == stored_bytes(golden)
        assert canonical_bytes(record) == canonical_bytes(golden)


def test_a_record_stored_before_reads_back_equal_and_replays_equal() -> None:
    for record, golden in ((escalated_record(), ESCALATED_RECORD), (batch_record(), BATCH_RECORD)):
        stored = json.loads(stored_bytes(golden))
        assert DecisionRecord.from_json(stored) == record
        assert stored_bytes(DecisionRecord.from_json(stored).to_json()) == stored_bytes(golden)
        equal, recomputed = replay(stored)
        assert equal and stored_bytes(recomputed) == stored_bytes(golden)


def test_evidence_levels_are_written_as_labels_and_read_as_levels() -> None:
    record = escalated_record()
    data = record.to_json()
    assert data["inputs"]["evidence"] == {"level": "observed", "reused_tokens_in_window": 20000}
    assert data["inputs"]["escalation"]["min_evidence"] == "reported"
    inputs = DecisionInputs.from_json(data["inputs"])
    assert inputs.evidence.level is EvidenceLevel.OBSERVED
    assert inputs.escalation.min_evidence is EvidenceLevel.REPORTED
    assert record.escalation_met and record.escalation_reason.startswith("met: evidence observed >= reported")


def test_release_and_reuse_figures_render_as_before() -> None:
    release = Release(
        "rel_aaaaaaaaaaaaaaaaaaaaaaaaaa", "prod", "zumik-tiny",
        (
            RouteEntry("local", RouteKind.BYOC, replica_hour_usd="0.50", tokens_per_replica_hour=2_000_000),
            RouteEntry("managed", RouteKind.MANAGED, "0.15", "0.075", "0.60"),
        ),
        "v1", "golden", "f" * 64, 1_700_000_000, "rel_bbbbbbbbbbbbbbbbbbbbbbbbbb",
    )  # fmt: skip
    assert json.dumps(release.to_json()) == json.dumps(RELEASE)
    assert release.canonical_json() == canonical_bytes(RELEASE)
    assert Release.from_json(json.loads(release.canonical_json())) == release
    split = ReuseFigures.of(
        prompt_tokens=256, opportunity_tokens=128, route_kind="byoc", cached_tokens=128,
        kv_report={"tiers": {"redis": 64, "host": 32}},
    )  # fmt: skip
    unknown = ReuseFigures.of(
        prompt_tokens=256, opportunity_tokens=None, route_kind="managed", cached_tokens=None
    )
    assert json.dumps(split.to_json()) == json.dumps(SPLIT_FIGURES)
    assert json.dumps(unknown.to_json()) == json.dumps(UNKNOWN_FIGURES)


# --- the golden values, computed with the serializers before this version ----------------------

ESCALATED_RECORD: dict[str, Any] = {
    "decision_id": "dec_aaaaaaaaaaaaaaaaaaaaaaaaaa",
    "decide_version": "decide-1",
    "policy_version": "v1",
    "seed": 7,
    "inputs": {
        "request_digest": "0123456789abcdef0123456789abcdef",
        "tenant": "ten_acme",
        "prompt_num_tokens": 8192,
        "num_prompt_blocks": 256,
        "block_size": 32,
        "profile_name": "golden",
        "profile_fingerprint": "ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
        "release_id": "rel_aaaaaaaaaaaaaaaaaaaaaaaaaa",
        "snapshot_id": "snp_aaaaaaaaaaaaaaaaaaaaaaaaaa",
        "policy_version": "v1",
        "now_ms": 2000,
        "seed": 7,
        "candidates": [
            {
                "route": "managed",
                "kind": "managed",
                "input_pusd_per_token": 150000,
                "cached_input_pusd_per_token": 75000,
                "output_pusd_per_token": 600000,
                "breaker": {
                    "state": "closed",
                    "consecutive_failures": 0,
                    "opened_at_ms": None,
                    "probe_started_at_ms": None,
                },
                "replica": None,
                "matched_prefix_blocks": 0,
                "queue_depth": 0,
                "running": 0,
                "max_num_seqs": 1,
                "predicted_cached_tokens": 4096,
            },
            {
                "route": "byok",
                "kind": "byok",
                "input_pusd_per_token": 150000,
                "cached_input_pusd_per_token": 75000,
                "output_pusd_per_token": 600000,
                "breaker": {
                    "state": "open",
                    "consecutive_failures": 3,
                    "opened_at_ms": 900,
                    "probe_started_at_ms": None,
                },
                "replica": None,
                "matched_prefix_blocks": 0,
                "queue_depth": 0,
                "running": 0,
                "max_num_seqs": 1,
                "predicted_cached_tokens": None,
            },
            {
                "route": "local",
                "kind": "byoc",
                "input_pusd_per_token": 250000,
                "cached_input_pusd_per_token": 0,
                "output_pusd_per_token": 250000,
                "breaker": {
                    "state": "closed",
                    "consecutive_failures": 0,
                    "opened_at_ms": None,
                    "probe_started_at_ms": None,
                },
                "replica": "r0",
                "matched_prefix_blocks": 200,
                "queue_depth": 1,
                "running": 16,
                "max_num_seqs": 16,
                "predicted_cached_tokens": None,
            },
            {
                "route": "local",
                "kind": "byoc",
                "input_pusd_per_token": 250000,
                "cached_input_pusd_per_token": 0,
                "output_pusd_per_token": 250000,
                "breaker": {
                    "state": "half_open",
                    "consecutive_failures": 4,
                    "opened_at_ms": 100,
                    "probe_started_at_ms": 1500,
                },
                "replica": "r1",
                "matched_prefix_blocks": 3,
                "queue_depth": 0,
                "running": 2,
                "max_num_seqs": 16,
                "predicted_cached_tokens": None,
            },
        ],
        "evidence": {"level": "observed", "reused_tokens_in_window": 20000},
        "escalation": {
            "to": "byoc",
            "min_evidence": "reported",
            "min_reused_tokens_in_window": 10000,
            "window_s": 3600,
        },
        "fallback_order": ["managed", "byok", "local"],
        "default_route": "managed",
        "breaker_policy": {"failure_threshold": 3, "cooldown_ms": 10000},
        "expected_output_tokens": 64,
        "qos": "interactive",
        "prefer_cheapest": False,
    },
    "escalation": {
        "met": True,
        "reason": "met: evidence observed >= reported, reused 20000 >= 10000 in 3600s",
    },
    "candidates": [
        {
            "route": "managed",
            "replica": None,
            "kind": "managed",
            "breaker": {
                "state": "closed",
                "consecutive_failures": 0,
                "opened_at_ms": None,
                "probe_started_at_ms": None,
            },
            "filters": {"breaker": "pass", "escalation": "pass:default"},
            "scores": {
                "expected_cost_pusd": 960000000,
                "predicted_cached_tokens": 4096,
                "tiebreak": 211995147017657,
            },
        },
        {
            "route": "byok",
            "replica": None,
            "kind": "byok",
            "breaker": {
                "state": "open",
                "consecutive_failures": 3,
                "opened_at_ms": 900,
                "probe_started_at_ms": None,
            },
            "filters": {"breaker": "open", "escalation": "neither the default nor the escalation kind"},
            "scores": {
                "expected_cost_pusd": 1267200000,
                "predicted_cached_tokens": 0,
                "tiebreak": 120033370682552,
            },
        },
        {
            "route": "local",
            "replica": "r0",
            "kind": "byoc",
            "breaker": {
                "state": "closed",
                "consecutive_failures": 0,
                "opened_at_ms": None,
                "probe_started_at_ms": None,
            },
            "filters": {"breaker": "pass", "escalation": "pass:escalated"},
            "scores": {
                "expected_cost_pusd": 464000000,
                "load_penalty_tokens": 16384,
                "matched_tokens": 6400,
                "score_tokens": -9984,
                "tiebreak": 35988036094119,
            },
        },
        {
            "route": "local",
            "replica": "r1",
            "kind": "byoc",
            "breaker": {
                "state": "half_open",
                "consecutive_failures": 4,
                "opened_at_ms": 100,
                "probe_started_at_ms": 1500,
            },
            "filters": {"breaker": "probe in flight", "escalation": "pass:escalated"},
            "scores": {
                "expected_cost_pusd": 2040000000,
                "load_penalty_tokens": 1024,
                "matched_tokens": 96,
                "score_tokens": -928,
                "tiebreak": 138866539081168,
            },
        },
    ],
    "pick": {"route": "local", "replica": "r0"},
    "pick_reason": "escalated",
    "fallbacks": [{"route": "managed", "replica": None}],
}

BATCH_RECORD: dict[str, Any] = {
    "decision_id": "dec_bbbbbbbbbbbbbbbbbbbbbbbbbb",
    "decide_version": "decide-1",
    "policy_version": "v1",
    "seed": 7,
    "inputs": {
        "request_digest": "0123456789abcdef0123456789abcdef",
        "tenant": "ten_acme",
        "prompt_num_tokens": 8192,
        "num_prompt_blocks": 256,
        "block_size": 32,
        "profile_name": "golden",
        "profile_fingerprint": "ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
        "release_id": None,
        "snapshot_id": None,
        "policy_version": "v1",
        "now_ms": 2000,
        "seed": 7,
        "candidates": [
            {
                "route": "managed",
                "kind": "managed",
                "input_pusd_per_token": 150000,
                "cached_input_pusd_per_token": 75000,
                "output_pusd_per_token": 600000,
                "breaker": {
                    "state": "closed",
                    "consecutive_failures": 0,
                    "opened_at_ms": None,
                    "probe_started_at_ms": None,
                },
                "replica": None,
                "matched_prefix_blocks": 0,
                "queue_depth": 0,
                "running": 0,
                "max_num_seqs": 1,
                "predicted_cached_tokens": 4096,
            },
            {
                "route": "byok",
                "kind": "byok",
                "input_pusd_per_token": 150000,
                "cached_input_pusd_per_token": 75000,
                "output_pusd_per_token": 600000,
                "breaker": {
                    "state": "open",
                    "consecutive_failures": 3,
                    "opened_at_ms": 900,
                    "probe_started_at_ms": None,
                },
                "replica": None,
                "matched_prefix_blocks": 0,
                "queue_depth": 0,
                "running": 0,
                "max_num_seqs": 1,
                "predicted_cached_tokens": None,
            },
            {
                "route": "local",
                "kind": "byoc",
                "input_pusd_per_token": 250000,
                "cached_input_pusd_per_token": 0,
                "output_pusd_per_token": 250000,
                "breaker": {
                    "state": "closed",
                    "consecutive_failures": 0,
                    "opened_at_ms": None,
                    "probe_started_at_ms": None,
                },
                "replica": "r0",
                "matched_prefix_blocks": 200,
                "queue_depth": 1,
                "running": 16,
                "max_num_seqs": 16,
                "predicted_cached_tokens": None,
            },
            {
                "route": "local",
                "kind": "byoc",
                "input_pusd_per_token": 250000,
                "cached_input_pusd_per_token": 0,
                "output_pusd_per_token": 250000,
                "breaker": {
                    "state": "half_open",
                    "consecutive_failures": 4,
                    "opened_at_ms": 100,
                    "probe_started_at_ms": 1500,
                },
                "replica": "r1",
                "matched_prefix_blocks": 3,
                "queue_depth": 0,
                "running": 2,
                "max_num_seqs": 16,
                "predicted_cached_tokens": None,
            },
        ],
        "evidence": {"level": "unknown", "reused_tokens_in_window": 0},
        "escalation": {
            "to": "byoc",
            "min_evidence": "reported",
            "min_reused_tokens_in_window": 10000,
            "window_s": 3600,
        },
        "fallback_order": ["managed", "byok", "local"],
        "default_route": "managed",
        "breaker_policy": {"failure_threshold": 3, "cooldown_ms": 10000},
        "expected_output_tokens": 64,
        "qos": "batch",
        "prefer_cheapest": True,
    },
    "escalation": {"met": False, "reason": "not met: evidence unknown < reported, reused 0 < 10000 in 3600s"},
    "candidates": [
        {
            "route": "managed",
            "replica": None,
            "kind": "managed",
            "breaker": {
                "state": "closed",
                "consecutive_failures": 0,
                "opened_at_ms": None,
                "probe_started_at_ms": None,
            },
            "filters": {"breaker": "pass", "escalation": "pass:default"},
            "scores": {
                "expected_cost_pusd": 960000000,
                "predicted_cached_tokens": 4096,
                "tiebreak": 211995147017657,
            },
        },
        {
            "route": "byok",
            "replica": None,
            "kind": "byok",
            "breaker": {
                "state": "open",
                "consecutive_failures": 3,
                "opened_at_ms": 900,
                "probe_started_at_ms": None,
            },
            "filters": {"breaker": "open", "escalation": "neither the default nor the escalation kind"},
            "scores": {
                "expected_cost_pusd": 1267200000,
                "predicted_cached_tokens": 0,
                "tiebreak": 120033370682552,
            },
        },
        {
            "route": "local",
            "replica": "r0",
            "kind": "byoc",
            "breaker": {
                "state": "closed",
                "consecutive_failures": 0,
                "opened_at_ms": None,
                "probe_started_at_ms": None,
            },
            "filters": {"breaker": "pass", "escalation": "escalation not met"},
            "scores": {
                "expected_cost_pusd": 464000000,
                "load_penalty_tokens": 16384,
                "matched_tokens": 6400,
                "score_tokens": -9984,
                "tiebreak": 35988036094119,
            },
        },
        {
            "route": "local",
            "replica": "r1",
            "kind": "byoc",
            "breaker": {
                "state": "half_open",
                "consecutive_failures": 4,
                "opened_at_ms": 100,
                "probe_started_at_ms": 1500,
            },
            "filters": {"breaker": "probe in flight", "escalation": "escalation not met"},
            "scores": {
                "expected_cost_pusd": 2040000000,
                "load_penalty_tokens": 1024,
                "matched_tokens": 96,
                "score_tokens": -928,
                "tiebreak": 138866539081168,
            },
        },
    ],
    "pick": {"route": "local", "replica": "r0"},
    "pick_reason": "cheapest: qos batch",
    "fallbacks": [{"route": "managed", "replica": None}],
}

RELEASE: dict[str, Any] = {
    "id": "rel_aaaaaaaaaaaaaaaaaaaaaaaaaa",
    "alias": "prod",
    "model": "zumik-tiny",
    "route_table": [
        {
            "name": "local",
            "kind": "byoc",
            "input_usd_per_mtok": None,
            "cached_input_usd_per_mtok": None,
            "output_usd_per_mtok": None,
            "replica_hour_usd": "0.50",
            "tokens_per_replica_hour": 2000000,
        },
        {
            "name": "managed",
            "kind": "managed",
            "input_usd_per_mtok": "0.15",
            "cached_input_usd_per_mtok": "0.075",
            "output_usd_per_mtok": "0.60",
            "replica_hour_usd": None,
            "tokens_per_replica_hour": None,
        },
    ],
    "policy_version": "v1",
    "profile_name": "golden",
    "profile_fingerprint": "ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
    "created_at": 1700000000,
    "previous": "rel_bbbbbbbbbbbbbbbbbbbbbbbbbb",
}

SPLIT_FIGURES: dict[str, Any] = {
    "opportunity_tokens": 128,
    "opportunity_evidence": "estimated",
    "captured_tokens": 128,
    "captured_evidence": "observed",
    "captured_by_source": {"engine": 32, "host": 32, "redis": 64},
}

UNKNOWN_FIGURES: dict[str, Any] = {
    "opportunity_tokens": 0,
    "opportunity_evidence": "unknown",
    "captured_tokens": None,
    "captured_evidence": "unknown",
}
