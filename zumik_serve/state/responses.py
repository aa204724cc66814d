"""The JSON bodies /v2 answers with for state objects, built from the values.

    create artifact, bundle       the object's JSON, keys in field order (``value_json``)
    read artifact                 its stored record (keys sorted), then content or content_b64
    read bundle                   its stored record (keys sorted)
    create/read session, branch   SessionBody (a read adds the numbered turns)
    create/read snapshot          SnapshotBody (a read lists the pinned compilations, as stored)
    append turn                   AppendedTurnBody
    revoke                        RevokedBody
    list (GET /v2/{kind})         ``listed_body`` of each: a read without content, turns or
                                  compilations (read the object for those)

Rule kept here: a body's keys and their order are part of the API; a field that only some
objects have (a branch's ``parent``) is absent, not null, on the others.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from zumik_serve.state.objects import (
    Artifact,
    Bundle,
    Compilation,
    Session,
    Snapshot,
    Turn,
    TurnRole,
    stored_json,
    value_json,
)

TEXT_CONTENT_PREFIXES = ("text/", "application/json")


def _absent_if_none(value: object) -> bool:
    return value is None


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def body(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class TurnBody(Body):
    seq: int
    role: TurnRole
    content: str
    created_at: int


class SessionBody(Body):
    """A session, or a branch (``parent`` and ``at_turn`` only on a branch); ``head`` is the
    number of its last turn (0: none). ``turns`` only on a read, oldest first."""

    id: str
    object: Literal["session", "branch"]
    bundle: str | None
    created_at: int
    head: int
    parent: str | None = Field(default=None, exclude_if=_absent_if_none)
    at_turn: int | None = Field(default=None, exclude_if=_absent_if_none)
    turns: list[TurnBody] | None = Field(default=None, exclude_if=_absent_if_none)

    @classmethod
    def of(cls, session: Session, *, head: int, turns: list[tuple[int, Turn]] | None = None) -> SessionBody:
        """``turns``: (seq, turn) pairs, for a read."""
        return cls(
            id=session.id, object=session.object, bundle=session.bundle, created_at=session.created_at_s,
            head=head, parent=session.parent, at_turn=session.fork_at if session.is_branch else None,
            turns=None if turns is None else [
                TurnBody(seq=seq, role=turn.role, content=turn.content, created_at=turn.created_at_s)
                for seq, turn in turns
            ],
        )  # fmt: skip


class SnapshotBody(Body):
    """``compilations``: the pinned compilations, each as stored (keys sorted)."""

    id: str
    object: Literal["snapshot"]
    bundle: str | None
    artifacts: list[str]
    session: str | None
    upto_turn: int
    created_at: int
    num_turns: int
    compilations: list[dict[str, Any]]

    @classmethod
    def of(cls, snapshot: Snapshot, compilations: list[Compilation]) -> SnapshotBody:
        return cls(
            id=snapshot.id, object=snapshot.object, bundle=snapshot.bundle,
            artifacts=list(snapshot.artifacts), session=snapshot.session, upto_turn=snapshot.upto_turn,
            created_at=snapshot.created_at_s, num_turns=len(snapshot.turns),
            compilations=[stored_json(compilation) for compilation in compilations],
        )  # fmt: skip


class AppendedTurnBody(Body):
    object: Literal["turn"]
    session: str
    seq: int
    role: TurnRole


class RevokedBody(Body):
    id: str
    revoked: Literal[True]


def created_body(value: Artifact | Bundle) -> dict[str, Any]:
    return value_json(value)


def artifact_read_body(artifact: Artifact, content: bytes) -> dict[str, Any]:
    """The stored record, then ``content`` (text of a text or JSON media type that is UTF-8)
    or else ``content_b64``."""
    body = stored_json(artifact)
    if artifact.media_type.startswith(TEXT_CONTENT_PREFIXES):
        try:
            return {**body, "content": content.decode("utf-8")}
        except UnicodeDecodeError:
            pass
    return {**body, "content_b64": base64.b64encode(content).decode()}


def bundle_read_body(bundle: Bundle) -> dict[str, Any]:
    return stored_json(bundle)


def listed_body(record: Artifact | Bundle | Session | Snapshot, head: int) -> dict[str, Any]:
    """One object in a list: what a read returns without its content (an artifact's bytes, a
    session's turns, a snapshot's compilations). ``head``: a session's or branch's last turn."""
    match record:
        case Artifact() | Bundle():
            return stored_json(record)
        case Session():
            return SessionBody.of(record, head=head).body()
        case Snapshot():
            return SnapshotBody.of(record, compilations=[]).model_dump(mode="json", exclude={"compilations"})


@dataclass(frozen=True)
class ObjectPage:
    """A page of a tenant's objects of one kind, newest first (``listed_body`` each)."""

    data: list[dict[str, Any]]
    has_more: bool
