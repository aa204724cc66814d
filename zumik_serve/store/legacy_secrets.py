"""Moving the secrets an earlier version kept in Redis into the secrets folder, then out of Redis.

    zumik:receipt-signing-key    Ed25519 private key (PEM)         → receipt-signing.pem
    zumik:receipt-public-keys    hash key_id → public key PEM      → receipt-signing-retired.pem
                                                                      (all but the current key)
    zumik:byok-master-key        32 bytes                          → byok-master.key
    zumik:secret:cache-salt      32 bytes                          → cache-salt.key

Rules kept here: a file is written only where it is missing; a file that holds a different
value stops the whole migration before anything changes (``MigrationConflictError`` names the
file and the Redis key); the Redis keys are deleted only after every file is written (fsynced),
so a run cut short loses nothing and can be run again. No value is logged or returned in text.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import redis.asyncio as aioredis

from zumik_serve.secret_files import write_private_file
from zumik_serve.server_secrets import (
    BYOK_MASTER_KEY_FILE,
    CACHE_SALT_FILE,
    SIGNING_KEY_FILE,
    public_key_blocks,
    public_pem_of,
    raw_public_key,
    retire_public_keys,
)

LEGACY_SIGNING_KEY = "zumik:receipt-signing-key"
LEGACY_PUBLIC_KEYS = "zumik:receipt-public-keys"
LEGACY_BYOK_MASTER_KEY = "zumik:byok-master-key"
LEGACY_CACHE_SALT = "zumik:secret:cache-salt"
# Each secret's Redis key and the file it moves to.
LEGACY_FILES = {
    LEGACY_SIGNING_KEY: SIGNING_KEY_FILE,
    LEGACY_BYOK_MASTER_KEY: BYOK_MASTER_KEY_FILE,
    LEGACY_CACHE_SALT: CACHE_SALT_FILE,
}


class MigrationConflictError(RuntimeError):
    """A secret file holds another value than the Redis key it would be copied from."""


class Moved(StrEnum):
    """What the migration did with one secret."""

    COPIED = "copied"  # the file was missing; it now holds Redis' value
    ALREADY_IN_PLACE = "already_in_place"  # the file already held the same value
    NOT_IN_REDIS = "not_in_redis"  # nothing to move


@dataclass(frozen=True)
class SecretMove:
    redis_key: str
    file: Path
    outcome: Moved


@dataclass(frozen=True)
class Migration:
    """The outcome of ``migrate_legacy_secrets``: per secret, the retired public keys added, and
    the Redis keys deleted."""

    moves: tuple[SecretMove, ...]
    retired_keys_added: int
    deleted: tuple[str, ...]


async def migrate_legacy_secrets(client: aioredis.Redis, folder: Path) -> Migration:
    """Copy the old Redis secrets into ``folder`` where a file is missing, add every old public
    key but the current one to the retired keys, then delete the old keys from Redis."""
    async with client.pipeline(transaction=False) as pipe:
        for redis_key in LEGACY_FILES:
            pipe.get(redis_key)
        pipe.hvals(LEGACY_PUBLIC_KEYS)
        *values, public_pems = await pipe.execute()
    planned: list[tuple[str, Path, bytes | None]] = []
    for (redis_key, name), value in zip(LEGACY_FILES.items(), values, strict=True):
        path = folder / name
        if value is not None and path.exists() and path.read_bytes() != value:
            raise MigrationConflictError(
                f"{path} holds another value than the Redis key {redis_key}; nothing was changed. "
                f"If this deployment's data was made with the Redis value, move {path} aside and run "
                f"the migration again; if the file is the one in use, delete the Redis key (DEL {redis_key})."
            )
        planned.append((redis_key, path, value))

    moves: list[SecretMove] = []
    for redis_key, path, value in planned:
        if value is None:
            moves.append(SecretMove(redis_key, path, Moved.NOT_IN_REDIS))
        elif write_private_file(path, value):
            moves.append(SecretMove(redis_key, path, Moved.COPIED))
        elif path.read_bytes() == value:  # written meanwhile by another writer, with this value
            moves.append(SecretMove(redis_key, path, Moved.ALREADY_IN_PLACE))
        else:
            raise MigrationConflictError(f"{path} was written with another value during the migration")
    current = folder / SIGNING_KEY_FILE
    current_raw = raw_public_key(public_pem_of(current.read_bytes())) if current.exists() else b""
    old_public = [block for pem in public_pems for block in public_key_blocks(pem)]
    added = retire_public_keys(folder, [pem for pem in old_public if raw_public_key(pem) != current_raw])

    names = [*LEGACY_FILES, LEGACY_PUBLIC_KEYS]
    present = [name for name, flag in zip(names, await _exists_each(client, names), strict=True) if flag]
    if present:
        await client.delete(*present)
    return Migration(tuple(moves), len(added), tuple(present))


async def legacy_secrets_present(client: aioredis.Redis) -> bool:
    """Whether Redis still holds a secret an earlier version kept there."""
    return bool(await client.exists(*LEGACY_FILES, LEGACY_PUBLIC_KEYS))


async def _exists_each(client: aioredis.Redis, names: list[str]) -> list[bool]:
    async with client.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.exists(name)
        return [bool(flag) for flag in await pipe.execute()]
