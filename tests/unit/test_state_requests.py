"""The request models of /v2 state bodies (``state/requests.py``).

Invariants held here:
- a body that does not validate is a 400 ``InvalidRequestError`` whose ``param`` names the field
  to fix (an entry of a list by its location joined with "."), and whose message says what to
  send and never repeats the value sent;
- an unknown field is named before any other problem, with the allowed fields;
- rules across fields (exactly one content, a snapshot of something) name the field to fix;
- ``sent()`` is the body as the client sent it, so an Idempotency-Key's request hash is the same
  as before the models existed (a retry across an upgrade still replays).
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import pytest

from zumik_serve.errors import InvalidRequestError
from zumik_serve.state.objects import ArtifactRole, TurnRole
from zumik_serve.state.requests import (
    AppendTurn,
    CreateArtifact,
    CreateBranch,
    CreateBundle,
    CreateSession,
    CreateSnapshot,
    StateRequest,
    parse_request,
)
from zumik_serve.state.service import request_hash

SECRET = "s3cr3t-value-never-echoed"


def _error(model: type[StateRequest], body: dict[str, Any]) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as caught:
        parse_request(model, body)
    error = caught.value
    assert error.status == 400 and error.type == "invalid_request_error"
    assert SECRET not in error.message
    return error


@pytest.mark.parametrize(
    ("model", "body", "param", "says"),
    [
        (CreateArtifact, {"role": SECRET, "content": "x"}, "role", "must be one of: system, tools"),
        (CreateArtifact, {"content": "x"}, "role", "must be one of"),
        (CreateArtifact, {"role": "document", "content": 5}, "content", "'content' must be a string"),
        (CreateArtifact, {"role": "document", "content": None}, "content", "'content' must be a string"),
        (CreateArtifact, {"role": "document"}, "content", "exactly one of 'content'"),
        (CreateArtifact, {"role": "document", "content": "x", "content_b64": "eA=="}, "content",
         "exactly one"),
        (CreateArtifact, {"role": "document", "content_b64": SECRET + "!", "media_type": "a/b"},
         "content_b64", "not valid base64"),
        (CreateArtifact, {"role": "document", "content_b64": None, "media_type": "a/b"}, "content_b64",
         "not valid base64"),
        (CreateArtifact, {"role": "document", "content_b64": "eA=="}, "media_type", "required with"),
        (CreateArtifact, {"role": "document", "content": "x", "media_type": "m" * 256}, "media_type",
         "short string"),
        (CreateArtifact, {"role": "document", "content": "x", "media_type": 7}, "media_type", "short string"),
        (CreateBundle, {"artifacts": []}, "artifacts", "non-empty array of artifact ids"),
        (CreateBundle, {"artifacts": SECRET}, "artifacts", "non-empty array of artifact ids"),
        (CreateBundle, {"artifacts": ["art_a", 5]}, "artifacts.1", "non-empty array of artifact ids"),
        (CreateBundle, {}, "artifacts", "non-empty array"),
        (CreateSession, {"bundle": 5}, "bundle", "bundle id"),
        (AppendTurn, {"role": "robot", "content": SECRET}, "role", "user, assistant, tool, system"),
        (AppendTurn, {"role": "user"}, "content", "'content' must be a string"),
        (AppendTurn, {"role": "user", "content": ["x"]}, "content", "'content' must be a string"),
        (CreateBranch, {"at_turn": "2"}, "at_turn", "integer turn number"),
        (CreateBranch, {"at_turn": True}, "at_turn", "integer turn number"),
        (CreateBranch, {"at_turn": 2.0}, "at_turn", "integer turn number"),
        (CreateBranch, {}, "at_turn", "integer turn number"),
        (CreateSnapshot, {}, "bundle", "needs a 'bundle', a 'session', or both"),
        (CreateSnapshot, {"bundle": None, "session": None}, "bundle", "or both"),
        (CreateSnapshot, {"bundle": "bnd_x", "upto_turn": 1}, "upto_turn", "with a 'session'"),
        (CreateSnapshot, {"session": "ses_x", "upto_turn": "1"}, "upto_turn", "must be an integer"),
        (CreateSnapshot, {"session": 5}, "session", "session or branch id"),
    ],
)  # fmt: skip
def test_invalid_body_is_a_400_naming_the_field(
    model: type[StateRequest], body: dict[str, Any], param: str, says: str
) -> None:
    error = _error(model, body)
    assert error.param == param
    assert says in error.message


@pytest.mark.parametrize(
    ("model", "body"),
    [
        (CreateArtifact, {"role": "document", "content": "x", "extra": 1}),
        (CreateBundle, {"artifacts": ["art_a"], "extra": 1}),
        (CreateSession, {"extra": 1}),
        (AppendTurn, {"role": "user", "content": "x", "extra": 1}),
        (CreateBranch, {"at_turn": 1, "extra": 1}),
        (CreateSnapshot, {"session": "ses_x", "extra": 1}),
    ],
)
def test_unknown_field_is_named_with_the_allowed_ones(
    model: type[StateRequest], body: dict[str, Any]
) -> None:
    error = _error(model, body)
    assert error.param == "extra"
    assert error.message == f"unknown field 'extra'; allowed fields: {', '.join(sorted(model.model_fields))}"


def test_unknown_field_is_named_before_a_missing_one() -> None:
    error = _error(AppendTurn, {"rol": "user", "content": "x"})  # a typo of 'role'
    assert error.param == "rol" and "allowed fields: content, role" in error.message


def test_a_long_unknown_field_name_is_cut_in_param() -> None:
    error = _error(CreateSession, {"k" * 5000: 1})
    assert error.param is not None and len(error.param) <= 64


def test_artifact_content_and_media_type() -> None:
    text = parse_request(CreateArtifact, {"role": "system", "content": "é", "media_type": ""})
    assert text.role is ArtifactRole.SYSTEM
    assert text.content_bytes == "é".encode() and text.content_media_type == "text/plain; charset=utf-8"
    raw = parse_request(
        CreateArtifact, {"role": "document", "content_b64": "AAECAwT/", "media_type": "application/x"}
    )
    assert raw.content_bytes == base64.b64decode("AAECAwT/") and raw.content_media_type == "application/x"


def test_models_are_frozen_values() -> None:
    turn = AppendTurn(role=TurnRole.USER, content="hi")
    with pytest.raises(ValueError, match="frozen"):
        turn.content = "other"


def _hash_before_models(operation: str, body: dict[str, Any]) -> str:
    """The request hash as the service computed it from the raw body, before the models."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{operation}\n{canonical}".encode()).hexdigest()


@pytest.mark.parametrize(
    ("model", "body"),
    [
        (CreateArtifact, {"role": "document", "content": "ünï", "media_type": None}),
        (CreateArtifact, {"role": "document", "content_b64": "AAEC", "media_type": "application/x"}),
        (CreateBundle, {"artifacts": ["art_b", "art_a"]}),
        (CreateSession, {}),
        (CreateSession, {"bundle": None}),
        (AppendTurn, {"content": "hi", "role": "tool"}),
        (CreateBranch, {"at_turn": 0}),
        (CreateSnapshot, {"session": "ses_x", "upto_turn": 3}),
    ],
)
def test_sent_body_hashes_as_the_raw_body_did(model: type[StateRequest], body: dict[str, Any]) -> None:
    assert parse_request(model, body).sent() == body
    assert request_hash("op", parse_request(model, body).sent()) == _hash_before_models("op", body)
