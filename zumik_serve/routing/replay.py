"""Replay: rebuild a recorded decision from its inputs and check it byte for byte.

A record replays equal when the same ``decide`` (the record's own ``decide_version``: a record
written under an earlier policy replays under it) over the recorded inputs, with the recorded
decision id, yields the same canonical JSON. A record naming a policy this build does not know
replays under the current one (and so compares unequal). A mismatch means the policy code
changed under the record or the record was altered; either way the caller learns it as a value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from zumik_serve.routing.decision import (
    DECIDE_VERSION,
    DECIDE_VERSIONS,
    DecisionInputs,
    canonical_bytes,
    decide,
)


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
    version = record_json.get("decide_version")
    version = version if version in DECIDE_VERSIONS else DECIDE_VERSION
    recomputed = decide(record_json["decision_id"], inputs, version=version).to_json()
    return canonical_bytes(recomputed) == canonical_bytes(record_json), recomputed
