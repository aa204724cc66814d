"""The secrets folder made ready: before Ray starts (the embedded default), and ``zumik secrets``.

    zumik secrets init                  create the missing secret files (0600), print which
    zumik secrets migrate --redis-url   an older deployment's secrets: out of Redis into files;
                                        its BYOK keys under their {tenant} hash-tagged names
    zumik secrets rotate-signing-key    a new receipt signing key; the old one's public key retired

The work is done where its rule lives (``server_secrets.py``, ``store/legacy_secrets.py``,
``providers/store.py``, ``purge/signing_keys.py``); this module runs it and says what it did,
never a secret's value.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from zumik_serve.errors import StoreUnavailableError
from zumik_serve.home import ZumikHome
from zumik_serve.providers.store import tag_untagged_keys
from zumik_serve.purge.signing_keys import rotate_signing_key
from zumik_serve.secret_files import SecretFileError, secrets_dir
from zumik_serve.server_secrets import generate_missing
from zumik_serve.store.client import guard, plain_client
from zumik_serve.store.legacy_secrets import (
    Migration,
    MigrationConflictError,
    legacy_secrets_present,
    migrate_legacy_secrets,
)


@dataclass(frozen=True)
class Prepared:
    """What ``prepare_secrets`` did: the files it created, and the migration when Redis still
    held an earlier version's secrets (None otherwise)."""

    created: tuple[Path, ...]
    migration: Migration | None
    byok_keys_tagged: int


def prepare_secrets(folder: Path, redis_url: str) -> Prepared:
    """The embedded default's secrets, before any gateway starts: an earlier version's secrets
    still in Redis are moved into ``folder`` first (so its BYOK keys stay readable and its
    receipts verifiable), then every file still missing is generated."""
    migration, tagged = asyncio.run(_migrate_if_present(redis_url, folder))
    return Prepared(tuple(generate_missing(folder)), migration, tagged)


def folder_of(args: argparse.Namespace) -> Path:
    given: Path | None = args.secrets_dir
    return given.expanduser() if given is not None else secrets_dir(ZumikHome.from_env())


def run_secrets_init(args: argparse.Namespace, console: Console) -> int:
    folder = folder_of(args)
    try:
        created = generate_missing(folder)
    except OSError as exc:
        console.print(f"[red]error:[/red] cannot write secrets into {folder}: {exc.strerror}")
        return 1
    if args.json:
        print(json.dumps({"folder": str(folder), "created": [path.name for path in created]}))
    elif created:
        console.print(f"created in {folder} (0600): {', '.join(path.name for path in created)}")
    else:
        console.print(f"every secret file already exists in {folder}; nothing changed")
    return 0


def run_secrets_migrate(args: argparse.Namespace, console: Console) -> int:
    folder = folder_of(args)
    try:
        migration, tagged = asyncio.run(_migrate(args.redis_url, folder))
    except (MigrationConflictError, SecretFileError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 1
    except StoreUnavailableError:
        console.print(
            "[red]error:[/red] Redis did not answer (or refused the URL's user). The migration keeps "
            "what it wrote; run the same command again once Redis answers: it goes on from there."
        )
        return 1
    if args.json:
        print(json.dumps({
            "folder": str(folder),
            "secrets": {move.file.name: move.outcome.value for move in migration.moves},
            "retired_keys_added": migration.retired_keys_added,
            "redis_keys_deleted": list(migration.deleted),
            "byok_keys_tagged": tagged,
        }))  # fmt: skip
        return 0
    for move in migration.moves:
        outcome = move.outcome.value.replace("_", " ")
        console.print(f"{move.file}: {outcome} (from Redis key {move.redis_key})")
    console.print(f"retired signing keys added: {migration.retired_keys_added}")
    deleted = ", ".join(migration.deleted) or "none (no secret was left in Redis)"
    console.print(f"deleted from Redis: {deleted}")
    console.print(f"BYOK keys moved under their {{tenant}} hash tag: {tagged}")
    return 0


def run_rotate_signing_key(args: argparse.Namespace, console: Console) -> int:
    folder = folder_of(args)
    try:
        rotation = rotate_signing_key(folder)
    except (SecretFileError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 1
    if args.json:
        print(json.dumps({"folder": str(folder), "retired": rotation.retired, "current": rotation.current}))
        return 0
    console.print(f"retired {rotation.retired} (its public key is in receipt-signing-retired.pem)")
    console.print(f"new signing key {rotation.current} in {folder}")
    console.print(
        "Gateways reading this folder sign with it from their next receipt. Where the folder is a "
        "Kubernetes Secret, update the Secret from these two files."
    )
    return 0


async def _migrate(redis_url: str, folder: Path) -> tuple[Migration, int]:
    client = plain_client(redis_url)
    try:
        migration = await guard(migrate_legacy_secrets(client, folder), what="Redis")
        return migration, await guard(tag_untagged_keys(client), what="Redis")
    finally:
        await client.aclose()


async def _migrate_if_present(redis_url: str, folder: Path) -> tuple[Migration | None, int]:
    client = plain_client(redis_url)
    try:
        present = await legacy_secrets_present(client)
        migration = await migrate_legacy_secrets(client, folder) if present else None
        return migration, await tag_untagged_keys(client)
    finally:
        await client.aclose()
