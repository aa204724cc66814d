"""Replay: rebuild a recorded decision from its inputs and check it byte for byte.

A record replays equal when the same ``decide`` (``decide_version``) over the recorded inputs,
with the recorded decision id, yields the same canonical JSON. A mismatch means the policy code
changed under the record or the record was altered; either way the caller learns it as a value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from zumik_serve.routing.decision import DecisionInputs, canonical_bytes, decide


@dataclass(frozen=True)
class Replayed:
    """One stored decision replayed: whether it came out equal, and the record its recorded
    inputs give now (``DecisionRecord.to_json``)."""

    decision_id: str
    equal: bool
    record: dict[str, Any]


def replay(record_json: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    """(equal, the recomputed record's JSON) for a record as stored (``DecisionRecord.to_json``)."""
    inputs = DecisionInputs.from_json(record_json["inputs"])
    recomputed = decide(record_json["decision_id"], inputs).to_json()
    return canonical_bytes(recomputed) == canonical_bytes(record_json), recomputed
