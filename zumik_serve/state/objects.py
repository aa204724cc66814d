"""The state objects as frozen values; their stored JSON is what ``TypeAdapter`` makes of them.

Ordering rules, drawn:

    bundle   = (art_1, art_2, ..., art_n)                  order is part of identity
    session  = turn 1, turn 2, ..., turn head              seq gap-free from 1, append-only
    branch   = parent turns 1..at_turn | own turns at_turn+1, at_turn+2, ...
    snapshot = bundle artifacts (in bundle order), then session turns 1..upto_turn (frozen copy)

Rule kept here: a value's JSON (``value_json``) is its stored record, field for field (a
session's has no ``parent`` and no ``fork_at``; a branch's has both). The JSON name of
``created_at_s`` is ``created_at``; keys the values do not know (``revoked_at``, set by the
store's revoke script) are ignored when a record is read, so records written by any earlier
version still load.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import Field, SerializerFunctionWrapHandler, TypeAdapter, WrapSerializer


class ArtifactRole(StrEnum):
    SYSTEM = "system"
    TOOLS = "tools"
    SCHEMA = "schema"
    DOCUMENT = "document"
    MESSAGE = "message"


class TurnRole(StrEnum):
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"
    SYSTEM = "system"


class ObjectKind(StrEnum):
    """URL segment of each kind on /v2 (``GET /v2/{kind}/{id}``)."""

    ARTIFACTS = "artifacts"
    BUNDLES = "bundles"
    SESSIONS = "sessions"
    BRANCHES = "branches"
    SNAPSHOTS = "snapshots"


# Unix time in seconds; ``created_at`` in JSON.
CreatedAt = Annotated[int, Field(alias="created_at")]


def content_digest(content: bytes, media_type: str) -> str:
    """sha256 over the media type and the bytes: the artifact's content address."""
    return hashlib.sha256(media_type.encode() + b"\0" + content).hexdigest()


def artifact_address(digest: str, role: ArtifactRole) -> str:
    """What a content-addressed artifact handle is derived from (with the tenant and a
    generation that revoking the artifact moves on)."""
    return f"{digest}|{role.value}"


@dataclass(frozen=True, kw_only=True)
class Artifact:
    """Immutable content with a role. The bytes are stored apart, once per ``digest``."""

    id: str
    object: Literal["artifact"] = "artifact"
    role: ArtifactRole
    media_type: str
    digest: str
    size_bytes: int
    created_at_s: CreatedAt

    @property
    def address(self) -> str:
        return artifact_address(self.digest, self.role)


@dataclass(frozen=True, kw_only=True)
class Bundle:
    """An ordered tuple of artifacts; never changes."""

    id: str
    object: Literal["bundle"] = "bundle"
    artifacts: tuple[str, ...]
    created_at_s: CreatedAt


@dataclass(frozen=True, kw_only=True)
class Session:
    """A session or a branch: both are append-only turn sequences (the turns are stored apart).

    A branch (``object == "branch"``) has ``parent`` (the session or branch it forked from) and
    ``fork_at`` (the parent turn it forked after); its own turns are numbered from
    ``fork_at + 1``. A session has neither (``parent`` None, ``fork_at`` 0).
    """

    id: str
    object: Literal["session", "branch"]
    bundle: str | None
    created_at_s: CreatedAt
    parent: str | None = None
    fork_at: int = 0

    def __post_init__(self) -> None:
        if self.is_branch != (self.parent is not None):
            raise ValueError(f"{self.id}: a branch, and only a branch, has a parent")

    @property
    def is_branch(self) -> bool:
        return self.object == "branch"


@dataclass(frozen=True, kw_only=True)
class Turn:
    """One turn as appended to a session or branch. Its number (seq) is its position: the
    store keeps a session's own turns in a list, and turn ``i`` of it (from 0) is
    ``fork_at + i + 1``."""

    role: TurnRole
    content: str
    created_at_s: CreatedAt


@dataclass(frozen=True)
class FrozenTurn:
    """A turn as copied into a snapshot."""

    role: TurnRole
    content: str


@dataclass(frozen=True, kw_only=True)
class Snapshot:
    """A frozen view: the bundle's artifacts (in bundle order) and a copy of the session's
    turns 1..``upto_turn``. Later appends to the session do not change it."""

    id: str
    object: Literal["snapshot"] = "snapshot"
    bundle: str | None
    artifacts: tuple[str, ...]
    session: str | None
    upto_turn: int
    turns: tuple[FrozenTurn, ...]
    created_at_s: CreatedAt


@dataclass(frozen=True)
class Compilation:
    """One compilation of a snapshot for one tokenizer and chat template, pinned for good."""

    compiler_version: str
    tokenizer_fingerprint: str
    chat_template_digest: str
    num_tokens: int
    token_ids_digest: str

    @property
    def key(self) -> str:
        return f"{self.compiler_version}|{self.tokenizer_fingerprint}|{self.chat_template_digest}"

    def record(self) -> dict[str, Any]:
        """Its JSON, in field order (the body of ``POST /v2/snapshots/{id}/compile``)."""
        return value_json(self)


def _session_json(session: Session, to_json: SerializerFunctionWrapHandler) -> dict[str, Any]:
    data: dict[str, Any] = to_json(session)
    if not session.is_branch:  # a session's record has no parent and no fork_at, as ever
        del data["parent"], data["fork_at"]
    return data


# A stored object record; its "object" field says which value it is.
StateObject = Annotated[
    Artifact | Bundle | Annotated[Session, WrapSerializer(_session_json)] | Snapshot,
    Field(discriminator="object"),
]

STATE_OBJECT: TypeAdapter[Artifact | Bundle | Session | Snapshot] = TypeAdapter(StateObject)
TURN = TypeAdapter(Turn)
COMPILATION = TypeAdapter(Compilation)


def value_json(value: Artifact | Bundle | Session | Snapshot | Turn | Compilation) -> dict[str, Any]:
    """The value's JSON, keys in field order (what a create answers with)."""
    adapter: TypeAdapter[Any] = (
        TURN if isinstance(value, Turn) else COMPILATION if isinstance(value, Compilation) else STATE_OBJECT
    )
    dumped: dict[str, Any] = adapter.dump_python(value, mode="json", by_alias=True)
    return dumped


def stored_json(value: Artifact | Bundle | Session | Snapshot | Turn | Compilation) -> dict[str, Any]:
    """The value's JSON with its keys sorted: its stored record, which reads serve as it is."""
    return dict(sorted(value_json(value).items()))
