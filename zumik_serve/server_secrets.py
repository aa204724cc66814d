"""The server's own secrets: files in the secrets folder (``secret_files.secrets_dir``), never Redis.

    receipt-signing.pem          the current receipt signing key: Ed25519, PKCS#8 PEM
    receipt-signing-retired.pem  the PUBLIC keys of retired signing keys, PEM blocks, oldest first
    byok-master.key              32 random bytes sealing tenants' BYOK keys (ZUMIK_BYOK_MASTER_KEY,
                                 base64 of 32 bytes, takes its place when set)
    cache-salt.key               32 random bytes every tenant's cache salt derives from

Rules kept here: a gateway only reads these, and a missing or malformed one fails its start with
the file named and what to do. Files are created only by ``generate_missing`` (the embedded
default: ``zumik serve``, ``zumik secrets init``), by a signing key rotation and by the
migration of an older deployment's secrets out of Redis: 0600 files in a 0700 folder. Nothing
here logs or prints a secret's value.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from zumik_serve.secret_files import (
    SecretFileError,
    ensure_private_dir,
    read_secret_file,
    write_private_file,
)

SIGNING_KEY_FILE = "receipt-signing.pem"
RETIRED_KEYS_FILE = "receipt-signing-retired.pem"
BYOK_MASTER_KEY_FILE = "byok-master.key"
CACHE_SALT_FILE = "cache-salt.key"
BYOK_MASTER_KEY_ENV = "ZUMIK_BYOK_MASTER_KEY"
SECRET_BYTES = 32
HOW_TO_FIX = (
    "Create it with `zumik secrets init` (the embedded default; an older deployment moves its "
    "secrets out of Redis with `zumik secrets migrate --redis-url URL`), or mount the Kubernetes "
    "Secret that holds it at this folder (ZUMIK_SECRETS_DIR)."
)
_PUBLIC_KEY_BLOCK = re.compile(rb"-----BEGIN PUBLIC KEY-----\r?\n.*?-----END PUBLIC KEY-----\r?\n?", re.S)


@dataclass(frozen=True)
class ServerSecrets:
    """The two symmetric secrets a gateway serves with (the signing key is ``SigningKeys``'s,
    since it changes while the gateway runs)."""

    byok_master_key: bytes
    cache_salt_secret: bytes

    def __repr__(self) -> str:
        return "ServerSecrets(byok_master_key=<redacted>, cache_salt_secret=<redacted>)"


def load_server_secrets(folder: Path, environ: Mapping[str, str] | None = None) -> ServerSecrets:
    """The BYOK master key and the cache-salt secret; ``SecretFileError`` naming the file (or
    the variable) and the fix when one is missing or not 32 bytes."""
    return ServerSecrets(
        byok_master_key=read_byok_master_key(folder, environ),
        cache_salt_secret=_read_random_secret(
            folder / CACHE_SALT_FILE, "the cache-salt secret", if_replaced="every cached KV block unreachable"
        ),
    )


def read_byok_master_key(folder: Path, environ: Mapping[str, str] | None = None) -> bytes:
    """``ZUMIK_BYOK_MASTER_KEY`` (base64 of 32 bytes) when set, else ``byok-master.key``."""
    env = os.environ if environ is None else environ
    configured = env.get(BYOK_MASTER_KEY_ENV)
    if configured:
        try:
            key = base64.b64decode(configured, validate=True)
        except (binascii.Error, ValueError):
            raise SecretFileError(f"{BYOK_MASTER_KEY_ENV} is not valid base64") from None
        if len(key) != SECRET_BYTES:
            raise SecretFileError(
                f"{BYOK_MASTER_KEY_ENV} must decode to {SECRET_BYTES} bytes, got {len(key)}"
            )
        return key
    return _read_random_secret(
        folder / BYOK_MASTER_KEY_FILE, "the BYOK master key", if_replaced="every stored BYOK key unreadable"
    )


def read_signing_key_pem(folder: Path) -> bytes:
    """The current signing key's PEM bytes (checked by its reader, ``purge/signing_keys.py``)."""
    return read_secret_file(folder / SIGNING_KEY_FILE, what="the receipt signing key", how_to_fix=HOW_TO_FIX)


def new_signing_key_pem() -> bytes:
    """A new Ed25519 private key, unencrypted PKCS#8 PEM (the form ``ReceiptSigner.from_pem`` reads)."""
    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def generate_missing(folder: Path, environ: Mapping[str, str] | None = None) -> list[Path]:
    """Create every secret file that is missing (0600, in a 0700 ``folder``); returns the files
    this call created, none when all exist. The BYOK master key file is skipped when
    ``ZUMIK_BYOK_MASTER_KEY`` provides the key. Existing files are never changed."""
    env = os.environ if environ is None else environ
    ensure_private_dir(folder)
    wanted = {
        folder / SIGNING_KEY_FILE: new_signing_key_pem,
        folder / CACHE_SALT_FILE: lambda: secrets.token_bytes(SECRET_BYTES),
    }
    if not env.get(BYOK_MASTER_KEY_ENV):
        wanted[folder / BYOK_MASTER_KEY_FILE] = lambda: secrets.token_bytes(SECRET_BYTES)
    return sorted(path for path, generate in wanted.items() if write_private_file(path, generate()))


def public_pem_of(private_pem: bytes) -> bytes:
    """The public key (SubjectPublicKeyInfo PEM) of an Ed25519 private key's PEM; ValueError
    when it is not one."""
    key = serialization.load_pem_private_key(private_pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("the receipt signing key is not an Ed25519 key")
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def public_key_blocks(data: bytes) -> list[bytes]:
    """Each ``PUBLIC KEY`` PEM block in ``data``, in order (the retired keys file's format)."""
    return [match.group(0) for match in _PUBLIC_KEY_BLOCK.finditer(data)]


def read_retired_public_keys(folder: Path) -> list[bytes]:
    """The retired public keys' PEM blocks, oldest first; none when the file does not exist."""
    path = folder / RETIRED_KEYS_FILE
    try:
        return public_key_blocks(path.read_bytes())
    except FileNotFoundError:
        return []
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise SecretFileError(f"the retired signing keys cannot be read from {path}: {reason}") from None


def retire_public_keys(folder: Path, public_pems: list[bytes]) -> list[bytes]:
    """Append each public key not listed yet to ``receipt-signing-retired.pem`` (rewritten
    atomically, 0600); returns those added. A block that is not an Ed25519 public key is a
    ValueError and nothing is written."""
    listed = read_retired_public_keys(folder)
    known = {raw_public_key(pem) for pem in listed}
    added: list[bytes] = []
    for pem in public_pems:
        raw = raw_public_key(pem)
        if raw not in known:
            known.add(raw)
            added.append(_normalized_public_pem(pem))
    if added:
        blocks = [block if block.endswith(b"\n") else block + b"\n" for block in listed + added]
        write_private_file(folder / RETIRED_KEYS_FILE, b"".join(blocks), overwrite=True)
    return added


def _read_random_secret(path: Path, what: str, *, if_replaced: str) -> bytes:
    value = read_secret_file(path, what=what, how_to_fix=HOW_TO_FIX)
    if len(value) != SECRET_BYTES:
        raise SecretFileError(
            f"{what} in {path} must be exactly {SECRET_BYTES} raw bytes, found {len(value)}. Restore "
            f"the file this deployment was made with (a new one makes {if_replaced})."
        )
    return value


def _public_key(pem: bytes) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("a retired signing key must be an Ed25519 public key")
    return key


def raw_public_key(pem: bytes) -> bytes:
    """The 32 raw bytes of an Ed25519 public key's PEM (what tells two PEMs of one key apart from
    two keys); ValueError when it is not one."""
    return _public_key(pem).public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _normalized_public_pem(pem: bytes) -> bytes:
    return _public_key(pem).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
