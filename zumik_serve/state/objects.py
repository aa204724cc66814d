"""The state objects as frozen values, and their JSON records.

Ordering rules, drawn:

    bundle   = (art_1, art_2, ..., art_n)                  order is part of identity
    session  = turn 1, turn 2, ..., turn head              seq gap-free from 1, append-only
    branch   = parent turns 1..at_turn | own turns at_turn+1, at_turn+2, ...
    snapshot = bundle artifacts (in bundle order), then session turns 1..upto_turn (frozen copy)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


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


def content_digest(content: bytes, media_type: str) -> str:
    """sha256 over the media type and the bytes: the artifact's content address."""
    return hashlib.sha256(media_type.encode() + b"\0" + content).hexdigest()


@dataclass(frozen=True)
class Artifact:
    id: str
    role: ArtifactRole
    media_type: str
    digest: str
    size_bytes: int
    created_at_s: int

    def record(self) -> dict[str, Any]:
        return {
            "id": self.id, "object": "artifact", "role": self.role.value,
            "media_type": self.media_type, "digest": self.digest,
            "size_bytes": self.size_bytes, "created_at": self.created_at_s,
        }  # fmt: skip


@dataclass(frozen=True)
class Bundle:
    id: str
    artifacts: tuple[str, ...]
    created_at_s: int

    def record(self) -> dict[str, Any]:
        return {
            "id": self.id, "object": "bundle", "artifacts": list(self.artifacts),
            "created_at": self.created_at_s,
        }  # fmt: skip


@dataclass(frozen=True)
class Turn:
    seq: int
    role: TurnRole
    content: str
    created_at_s: int

    def record(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "role": self.role.value,
            "content": self.content,
            "created_at": self.created_at_s,
        }


@dataclass(frozen=True)
class Session:
    """A session or a branch: both are append-only turn sequences.

    A branch has ``parent`` (the session or branch it forked from) and ``fork_at`` (the parent
    turn it forked after); its own turns are numbered from ``fork_at + 1``.
    """

    id: str
    bundle: str | None
    created_at_s: int
    parent: str | None = None
    fork_at: int = 0

    @property
    def is_branch(self) -> bool:
        return self.parent is not None

    def record(self, head: int) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id, "object": "branch" if self.is_branch else "session",
            "bundle": self.bundle, "head": head, "created_at": self.created_at_s,
        }  # fmt: skip
        if self.is_branch:
            data["parent"] = self.parent
            data["at_turn"] = self.fork_at
        return data


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
        return {
            "compiler_version": self.compiler_version,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "chat_template_digest": self.chat_template_digest,
            "num_tokens": self.num_tokens,
            "token_ids_digest": self.token_ids_digest,
        }


@dataclass(frozen=True)
class FrozenTurn:
    role: TurnRole
    content: str


@dataclass(frozen=True)
class Snapshot:
    id: str
    bundle: str | None
    artifacts: tuple[str, ...]
    session: str | None
    upto_turn: int
    turns: tuple[FrozenTurn, ...]
    created_at_s: int
    compilations: tuple[Compilation, ...] = field(default=())

    def record(self) -> dict[str, Any]:
        return {
            "id": self.id, "object": "snapshot", "bundle": self.bundle,
            "artifacts": list(self.artifacts), "session": self.session,
            "upto_turn": self.upto_turn, "created_at": self.created_at_s,
            "compilations": [c.record() for c in self.compilations],
        }  # fmt: skip
