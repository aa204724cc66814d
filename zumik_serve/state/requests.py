"""The bodies of the /v2 requests that create state objects: one pydantic model each.

    POST /v2/artifacts                          CreateArtifact
    POST /v2/bundles                            CreateBundle
    POST /v2/sessions                           CreateSession
    POST /v2/{sessions|branches}/{id}/turns     AppendTurn
    POST /v2/{sessions|branches}/{id}/branches  CreateBranch
    POST /v2/snapshots                          CreateSnapshot

Rule kept here: a body that does not validate is a 400 ``InvalidRequestError`` (``parse_request``)
whose ``param`` names the field to fix (its location joined with ".": ``artifacts.1`` for an entry
of a list; an unknown field is named before any other problem) and whose message says what to
send; the message never repeats the value that was sent. Limits on content size are not checked
here: they are the service's, and they are 413s.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, model_validator

from zumik_serve.state.objects import ArtifactRole, TurnRole
from zumik_serve.validation import FieldRuleError, parse_model

TEXT_MEDIA_TYPE = "text/plain; charset=utf-8"
MAX_MEDIA_TYPE_CHARS = 255


class StateRequest(BaseModel):
    """A request body. ``HINTS`` says, per field, what to send when the field is missing or of
    the wrong type."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    HINTS: ClassVar[dict[str, str]] = {}

    def sent(self) -> dict[str, Any]:
        """The body as the client sent it (the fields it set, as JSON): what the request hash
        of an Idempotency-Key covers."""
        return self.model_dump(mode="json", exclude_unset=True)


def _one_of(field: str, values: type[StrEnum]) -> str:
    return f"'{field}' must be one of: {', '.join(member.value for member in values)}."


class CreateArtifact(StateRequest):
    """Exactly one of ``content`` (text, stored as UTF-8; ``media_type`` defaults to plain text)
    or ``content_b64`` (bytes, base64; ``media_type`` required)."""

    HINTS: ClassVar[dict[str, str]] = {
        "role": _one_of("role", ArtifactRole),
        "content": "'content' must be a string.",
        "content_b64": "'content_b64' is not valid base64.",
        "media_type": "'media_type' must be a short string.",
    }

    role: ArtifactRole
    content: StrictStr | None = None
    content_b64: StrictStr | None = None
    media_type: Annotated[StrictStr, Field(max_length=MAX_MEDIA_TYPE_CHARS)] | None = None

    @model_validator(mode="after")
    def _one_content(self) -> CreateArtifact:
        sent = {"content", "content_b64"} & self.model_fields_set
        if len(sent) != 1:
            raise FieldRuleError("content", "send exactly one of 'content' (text) or 'content_b64'.")
        if "content" in sent and self.content is None:
            raise FieldRuleError("content", self.HINTS["content"])
        if "content_b64" in sent:
            if self.content_b64 is None:
                raise FieldRuleError("content_b64", self.HINTS["content_b64"])
            _decode_b64(self.content_b64)
            if not self.media_type:
                raise FieldRuleError("media_type", "'media_type' is required with 'content_b64'.")
        return self

    @property
    def content_bytes(self) -> bytes:
        if self.content is not None:
            return self.content.encode()
        return _decode_b64(self.content_b64 or "")

    @property
    def content_media_type(self) -> str:
        """``media_type``, or plain text for ``content`` sent without one."""
        return self.media_type or TEXT_MEDIA_TYPE


class CreateBundle(StateRequest):
    HINTS: ClassVar[dict[str, str]] = {"artifacts": "'artifacts' must be a non-empty array of artifact ids."}

    artifacts: Annotated[tuple[StrictStr, ...], Field(min_length=1)]


class CreateSession(StateRequest):
    """``bundle``: the bundle the session is about, if any."""

    HINTS: ClassVar[dict[str, str]] = {"bundle": "'bundle' must be a bundle id, or null."}

    bundle: StrictStr | None = None


def message_text(message: Mapping[str, Any]) -> str:
    """A chat message as a session turn's text: its content (a string, or the text of its
    parts joined, as agent frameworks send it), then its tool calls as their JSON, so that the
    session reads as the conversation did."""
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(str(part.get("text") or "") for part in content if isinstance(part, Mapping))
    text = content if isinstance(content, str) else ""
    calls = message.get("tool_calls")
    if calls:
        text = (text + "\n" if text else "") + json.dumps(calls, separators=(",", ":"), ensure_ascii=False)
    return text


class AppendTurn(StateRequest):
    HINTS: ClassVar[dict[str, str]] = {
        "role": _one_of("role", TurnRole),
        "content": "'content' must be a string.",
    }

    role: TurnRole
    content: StrictStr


class CreateBranch(StateRequest):
    """``at_turn``: the turn of the parent to fork after (0: before its first turn)."""

    HINTS: ClassVar[dict[str, str]] = {"at_turn": "'at_turn' must be an integer turn number."}

    at_turn: StrictInt


class CreateSnapshot(StateRequest):
    """A ``bundle``, a ``session``, or both; ``upto_turn`` (with a session) stops at that turn,
    else the snapshot takes all the session's turns."""

    HINTS: ClassVar[dict[str, str]] = {
        "bundle": "'bundle' must be a bundle id, or null.",
        "session": "'session' must be a session or branch id, or null.",
        "upto_turn": "'upto_turn' must be an integer, with a 'session'.",
    }

    bundle: StrictStr | None = None
    session: StrictStr | None = None
    upto_turn: StrictInt | None = None

    @model_validator(mode="after")
    def _something_to_freeze(self) -> CreateSnapshot:
        if self.bundle is None and self.session is None:
            raise FieldRuleError("bundle", "a snapshot needs a 'bundle', a 'session', or both.")
        if self.upto_turn is not None and self.session is None:
            raise FieldRuleError("upto_turn", self.HINTS["upto_turn"])
        return self


R = TypeVar("R", bound=StateRequest)


def parse_request(model: type[R], body: Mapping[str, Any]) -> R:
    """``body`` (a parsed JSON object) as a ``model``; a 400 naming the field when it is not one
    (``zumik_serve/validation.py``)."""
    return parse_model(model, body)


def _decode_b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise FieldRuleError("content_b64", CreateArtifact.HINTS["content_b64"]) from None
