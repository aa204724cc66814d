"""Tenants and API keys: who is calling, decided from a bearer key.

Rules kept here: a key is shown once, at creation, and only its sha256 digest is stored; a key
belongs to exactly one tenant and has a key id (``key_`` + the first 16 hex digits of its
digest) and a hint (its last 4 characters) by which it is listed and revoked; the development
key (``ZUMIK_DEV_KEY``) maps to the fixed tenant ``dev`` and is meant for the embedded default
only. Lookups go through the ``TenantDirectory`` protocol; the Redis implementation is
``tenancy/store.py``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NewType, Protocol

TenantId = NewType("TenantId", str)
KeyId = NewType("KeyId", str)  # ``key_`` + 16 hex digits of the key's sha256

API_KEY_PREFIX = "zk-"
TENANT_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
DEV_TENANT = TenantId("ten_dev")
KEY_ID_PATTERN = re.compile(r"^key_[0-9a-f]{16}$")
KEY_HINT_CHARS = 4
# A development key opens the whole API as tenant dev on every port the app listens on (with the
# HAProxy ingress, replica ports on all interfaces): it must not be guessable.
DEV_KEY_MIN_CHARS = 32
DEV_KEY_MIN_DISTINCT = 12
# How long a gateway may still accept a key after it was revoked (or its tenant deleted): the
# Authenticator's positive cache lives this long, counted from before the lookup it caches.
REVOCATION_BOUND_S = 1.0


def check_dev_key(key: str | None) -> None:
    """``ValueError`` (why, and how to make a good one) when ``key`` is too weak to be the
    development key, which anyone who reaches a port of the app could then guess: it needs at
    least ``DEV_KEY_MIN_CHARS`` characters, of at least ``DEV_KEY_MIN_DISTINCT`` different ones
    (a random hex or base64 string passes; a word repeated does not). None passes (no dev key)."""
    if key is None:
        return
    weak = None
    if len(key) < DEV_KEY_MIN_CHARS:
        weak = f"it has {len(key)} characters, fewer than {DEV_KEY_MIN_CHARS}"
    elif len(set(key)) < DEV_KEY_MIN_DISTINCT:
        weak = f"it has {len(set(key))} different characters, fewer than {DEV_KEY_MIN_DISTINCT}"
    if weak is not None:
        raise ValueError(
            f"ZUMIK_DEV_KEY is too weak to open the API ({weak}): anyone who reaches a port of the "
            "app could guess it. Use a random one, e.g. export ZUMIK_DEV_KEY=zk-dev-$(python3 -c "
            "'import secrets; print(secrets.token_hex(16))'), or leave it unset and create tenant "
            "keys (zumik tenant create NAME)."
        )


@dataclass(frozen=True)
class Tenant:
    id: TenantId
    name: str
    created_at_s: int
    qos_classes: frozenset[str] | None = None  # the QoS classes it may use; None: every class
    reuse_accounting: bool = True  # False: no opportunity index of its prompts, no reuse ledger
    profiles: frozenset[str] | None = None  # the profiles it may use (x-zumik-profile); None: any


def new_api_key() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def key_id_of(key_hash: str) -> KeyId:
    """The id of the key whose sha256 hex digest is ``key_hash``: the same for keys made before
    key ids existed, so every key can be listed and revoked."""
    return KeyId("key_" + key_hash[:16])


def key_hint(api_key: str) -> str:
    """What a listing shows of a key: its last characters (never enough to use it)."""
    return api_key[-KEY_HINT_CHARS:]


def validate_key_id(key_id: str) -> KeyId:
    if not KEY_ID_PATTERN.match(key_id):
        raise ValueError(
            f"invalid key id {key_id!r}: key ids look like key_0123456789abcdef; "
            "`zumik tenant key list TENANT` shows them"
        )
    return KeyId(key_id)


@dataclass(frozen=True)
class ApiKeyInfo:
    """One API key of a tenant, without the key. ``hint`` (its last 4 characters) and
    ``created_at_s`` are None for a key created before keys were indexed (``legacy``): it still
    authenticates and can be revoked by its id."""

    id: KeyId
    hint: str | None
    created_at_s: int | None
    legacy: bool = False


def new_tenant_id() -> TenantId:
    return TenantId("ten_" + secrets.token_hex(8))


def validate_tenant_name(name: str) -> str:
    if not TENANT_NAME_PATTERN.match(name):
        raise ValueError(
            f"invalid tenant name {name!r}: use 1-63 lower-case letters, digits, '-' or '_', "
            "starting with a letter or digit"
        )
    return name


class TenantDirectory(Protocol):
    """Resolves API keys to tenants. ``None`` means the key is unknown (a 401, not an error)."""

    async def tenant_for_key_hash(self, key_hash: str) -> Tenant | None: ...


class Authenticator:
    """Bearer key → tenant, with the dev key and a short positive cache in front of the store.

    The cache holds a resolved key for ``cache_ttl_s`` seconds (``REVOCATION_BOUND_S``), so a
    busy gateway does one store round trip per key per window instead of one per request. The
    window is counted from ``clock()`` read *before* the lookup, so a key revoked while (or after)
    it was looked up is refused by every gateway at most ``cache_ttl_s`` after the revocation,
    however slow the lookup was. An unknown key is remembered as unknown for ``negative_ttl_s``
    (a client retrying a revoked or mistyped key in a loop costs one lookup a second, not one a
    request). That cannot refuse a good key: a key is random, shown once when it is made, and
    nobody sends it before.
    """

    def __init__(
        self,
        directory: TenantDirectory,
        *,
        dev_key: str | None = None,
        cache_ttl_s: float = REVOCATION_BOUND_S,
        max_cached_keys: int = 10_000,
        negative_ttl_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._directory = directory
        self._negative_ttl_s = negative_ttl_s
        self._unknown: dict[str, float] = {}  # key hash -> until when it is answered unknown
        self._dev_key = dev_key or None
        self._cache_ttl_s = cache_ttl_s
        self._max_cached_keys = max_cached_keys
        self._clock = clock
        self._cache: dict[str, tuple[Tenant, float]] = {}

    async def authenticate(self, authorization: str | None) -> Tenant | None:
        api_key = parse_bearer(authorization)
        if api_key is None:
            return None
        if self._dev_key is not None and hmac.compare_digest(api_key, self._dev_key):
            return Tenant(id=DEV_TENANT, name="dev", created_at_s=0)
        key_hash = hash_api_key(api_key)
        now = self._clock()
        cached = self._cache.get(key_hash)
        if cached is not None and cached[1] > now:
            return cached[0]
        if self._unknown.get(key_hash, now) > now:
            return None
        tenant = await self._directory.tenant_for_key_hash(key_hash)
        if tenant is None:
            if len(self._unknown) >= self._max_cached_keys:
                self._unknown.clear()
            self._unknown[key_hash] = now + self._negative_ttl_s
            return None
        if len(self._cache) >= self._max_cached_keys:
            self._cache.clear()
        self._cache[key_hash] = (tenant, now + self._cache_ttl_s)
        return tenant


def cache_salt(secret: bytes, tenant: TenantId, epoch: int = 0) -> str:
    """The cache salt of a tenant's isolation scope, derived on the server, never from a client.

    vLLM mixes it into every KV block hash of a request, so one tenant's requests can never hit
    (or time) another tenant's cached blocks. ``epoch`` moves when a scope's cache must become
    unreachable (purge); without the secret nobody can compute another tenant's salt.
    """
    return hmac.new(secret, f"{tenant}\x1f{epoch}".encode(), hashlib.sha256).hexdigest()


def parse_bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token
