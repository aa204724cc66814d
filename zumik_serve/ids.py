"""Opaque, typed handles: the only module that formats or parses them.

A handle is ``<prefix>_<26 chars of base32>`` (128 random bits): typed by its prefix so it cannot
be mixed up with another kind, unguessable, and meaningless outside the tenant that owns it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from enum import StrEnum
from typing import NewType

DecisionId = NewType("DecisionId", str)


class HandleKind(StrEnum):
    ARTIFACT = "art"
    BUNDLE = "bnd"
    SESSION = "ses"
    BRANCH = "brn"
    SNAPSHOT = "snp"
    RELEASE = "rel"
    DECISION = "dec"
    RECEIPT = "prg"
    RESPONSE = "resp"  # a stored /v1/responses response (zumik_serve/responses)


def new_handle(kind: HandleKind) -> str:
    token = base64.b32encode(secrets.token_bytes(16)).decode().rstrip("=").lower()
    return f"{kind.value}_{token}"


def derive_handle(kind: HandleKind, secret: bytes, *parts: str) -> str:
    """A deterministic handle: the same parts give the same handle, and without ``secret``
    nobody can compute or guess it (HMAC-SHA256, 128 bits kept)."""
    message = "\x1f".join((kind.value, *parts)).encode()
    digest = hmac.new(secret, message, hashlib.sha256).digest()[:16]
    return f"{kind.value}_{base64.b32encode(digest).decode().rstrip('=').lower()}"


def new_decision_id() -> DecisionId:
    return DecisionId(new_handle(HandleKind.DECISION))


def handle_kind(handle: str) -> HandleKind | None:
    """The kind a handle names, or None when it is not a well-formed Zumik handle."""
    prefix, sep, token = handle.partition("_")
    if not sep or len(token) != 26 or not token.isalnum():
        return None
    try:
        return HandleKind(prefix)
    except ValueError:
        return None
