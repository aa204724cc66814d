"""The server's secrets: files in the secrets folder, never in Redis; signing keys that rotate.

Invariants held here (real files, a real redis-server, the real in-process gateway):
- ``generate_missing`` creates each missing secret once, 0600 in a 0700 folder, and never
  changes one that exists; ``zumik secrets init`` prints the files' names, never a value;
- a gateway whose secret file is missing or malformed does not start, and the error names the
  file and the fix; ZUMIK_BYOK_MASTER_KEY (base64 of 32 bytes) takes the BYOK file's place;
- a serving gateway seals BYOK keys with the file's master key, derives cache salts from the
  file's secret, signs with the file's key, and Redis holds none of them (nor their old keys);
- after ``zumik secrets rotate-signing-key`` a running gateway signs with the new key without a
  restart; ``GET /v2/keys`` lists it current and the old one retired; receipts signed before and
  after both verify with ``zumik receipt verify --keys``; a receipt of an unknown key fails,
  saying so; a Kubernetes Secret update (its ``..data`` link swapped) is picked up the same way;
  a changed key file that does not load leaves the last good key signing;
- ``zumik secrets migrate`` copies an earlier version's Redis secrets into missing files, keeps
  its old public keys as retired, deletes them from Redis, moves BYOK keys under the {tenant}
  hash tag, and afterwards that version's BYOK keys open and its receipts verify; a file with
  another value stops it before anything changes; run again, it changes nothing.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from profiles import load_builtin
from tests.support.fake_engine import FakeEngine
from tests.support.inprocess import gateway_settings, make_gateway, purge_new_artifact
from zumik_serve.app.context import Metrics, build_context
from zumik_serve.app.secrets_setup import prepare_secrets
from zumik_serve.cli import main
from zumik_serve.providers.byok import KeyVault
from zumik_serve.purge.classes import GuaranteeClass
from zumik_serve.purge.receipt import ReceiptSigner, StoreEntry, StoreResult, build_receipt, verify_receipt
from zumik_serve.purge.signing_keys import SigningKeys, rotate_signing_key
from zumik_serve.purge.verify_cli import run_verify, verify_file
from zumik_serve.secret_files import SecretFileError, write_private_file
from zumik_serve.server_secrets import (
    BYOK_MASTER_KEY_ENV,
    BYOK_MASTER_KEY_FILE,
    CACHE_SALT_FILE,
    RETIRED_KEYS_FILE,
    SIGNING_KEY_FILE,
    generate_missing,
    load_server_secrets,
    read_byok_master_key,
)
from zumik_serve.store.legacy_secrets import (
    LEGACY_BYOK_MASTER_KEY,
    LEGACY_CACHE_SALT,
    LEGACY_PUBLIC_KEYS,
    LEGACY_SIGNING_KEY,
)
from zumik_serve.store.local_redis import LocalRedis, free_port
from zumik_serve.tenancy.tenant import DEV_TENANT, cache_salt

CHAT = {"model": "zumik-tiny", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 8}
PROVIDER_KEY = "sk-tenant-" + "0123456789abcdef" * 2
ALL_FILES = {SIGNING_KEY_FILE, BYOK_MASTER_KEY_FILE, CACHE_SALT_FILE}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return tmp_path / "secrets"


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A redis-server of the test's own: migrations change Redis' global keys."""
    server = LocalRedis(data_dir=tmp_path / "redis").start()
    try:
        yield server.url
    finally:
        server.stop()


async def _cli(argv: list[str]) -> int:
    """``zumik ...`` as a command runs it: outside this test's event loop."""
    return await asyncio.to_thread(main, argv)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _printed(capsys: pytest.CaptureFixture[str]) -> str:
    """What a command printed, the console's line wrapping undone."""
    captured = capsys.readouterr()
    return (captured.out + captured.err).replace("\n", "")


def _secret_forms(folder: Path) -> list[bytes]:
    """Every secret of ``folder`` in the forms it could leak in: raw, hex, base64, PEM."""
    forms = []
    for name in (BYOK_MASTER_KEY_FILE, CACHE_SALT_FILE):
        raw = (folder / name).read_bytes()
        forms += [raw, raw.hex().encode(), base64.b64encode(raw)]
    pem = (folder / SIGNING_KEY_FILE).read_bytes()
    body = b"".join(pem.splitlines()[1:-1])
    return [*forms, pem, body]


async def _redis_dump(client: aioredis.Redis) -> bytes:
    """Every key and value in Redis, as bytes (strings, hashes, lists, sets, sorted sets)."""
    dump = b""
    async for key in client.scan_iter(count=1000):
        kind = (await client.type(key)).decode()
        if kind == "string":
            values = [await client.get(key)]
        elif kind == "hash":
            values = [field + b"=" + value for field, value in (await client.hgetall(key)).items()]
        elif kind == "list":
            values = await client.lrange(key, 0, -1)
        elif kind == "set":
            values = list(await client.smembers(key))
        elif kind == "zset":
            values = [member for member, _ in await client.zrange(key, 0, -1, withscores=True)]
        else:
            values = []
        dump += key + b"\n" + b"\n".join(values) + b"\n"
    return dump


# -- creating and reading the files ------------------------------------------------------------


def test_generate_missing_creates_each_secret_once_owner_only(folder: Path) -> None:
    created = generate_missing(folder, environ={})
    assert {path.name for path in created} == ALL_FILES
    assert _mode(folder) == 0o700
    assert all(_mode(folder / name) == 0o600 for name in ALL_FILES)
    before = {name: (folder / name).read_bytes() for name in ALL_FILES}
    (folder / CACHE_SALT_FILE).unlink()
    assert generate_missing(folder, environ={}) == [folder / CACHE_SALT_FILE]  # only the missing one
    assert generate_missing(folder, environ={}) == []
    after = {name: (folder / name).read_bytes() for name in ALL_FILES}
    assert after[SIGNING_KEY_FILE] == before[SIGNING_KEY_FILE]
    assert after[BYOK_MASTER_KEY_FILE] == before[BYOK_MASTER_KEY_FILE]
    assert after[CACHE_SALT_FILE] != before[CACHE_SALT_FILE] and len(after[CACHE_SALT_FILE]) == 32
    ReceiptSigner.from_pem(after[SIGNING_KEY_FILE])  # an Ed25519 PKCS#8 PEM


def test_byok_master_key_from_the_environment_wins_and_a_bad_one_fails_naming_it(folder: Path) -> None:
    configured = bytes(range(32))
    env = {BYOK_MASTER_KEY_ENV: base64.b64encode(configured).decode()}
    created = generate_missing(folder, environ=env)
    assert {path.name for path in created} == {SIGNING_KEY_FILE, CACHE_SALT_FILE}  # no BYOK file
    assert read_byok_master_key(folder, environ=env) == configured
    write_private_file(folder / BYOK_MASTER_KEY_FILE, b"f" * 32)
    assert read_byok_master_key(folder, environ=env) == configured  # the variable wins over the file
    assert read_byok_master_key(folder, environ={}) == b"f" * 32
    for bad in (base64.b64encode(b"x" * 16).decode(), "not base64!"):
        with pytest.raises(SecretFileError, match=BYOK_MASTER_KEY_ENV):
            read_byok_master_key(folder, environ={BYOK_MASTER_KEY_ENV: bad})


@pytest.mark.redis
@pytest.mark.parametrize(
    ("name", "content"),
    [
        (SIGNING_KEY_FILE, None),
        (SIGNING_KEY_FILE, b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n"),
        (BYOK_MASTER_KEY_FILE, None),
        (BYOK_MASTER_KEY_FILE, b"short"),
        (CACHE_SALT_FILE, None),
        (CACHE_SALT_FILE, b"x" * 33),
    ],
)
def test_a_missing_or_malformed_secret_stops_the_gateway_naming_the_file(
    folder: Path, module_redis_url: str, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
    name: str, content: bytes | None,
) -> None:  # fmt: skip
    monkeypatch.delenv(BYOK_MASTER_KEY_ENV, raising=False)
    generate_missing(folder)
    if content is None:
        (folder / name).unlink()
    else:
        write_private_file(folder / name, content, overwrite=True)
    settings = gateway_settings(module_redis_url, tiny_model_dir, load_builtin("local-cpu"), folder)
    with pytest.raises(SecretFileError) as raised:
        build_context(settings, {"r0": FakeEngine()}, Metrics())
    message = str(raised.value)
    assert str(folder / name) in message
    if content is None:
        assert "zumik secrets init" in message and "Kubernetes" in message
    generate_missing(folder)  # the embedded default's fix: the missing file is created, then it starts
    if content is None:
        build_context(settings, {"r0": FakeEngine()}, Metrics())


def test_secrets_init_prints_the_files_created_never_a_value(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["secrets", "init", "--secrets-dir", str(folder), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {"folder": str(folder), "created": sorted(ALL_FILES)}
    assert main(["secrets", "init", "--secrets-dir", str(folder)]) == 0
    again = _printed(capsys)
    assert "nothing changed" in again
    for form in _secret_forms(folder):
        assert form.decode("latin-1") not in again


# -- what a serving gateway uses ---------------------------------------------------------------


@pytest.mark.redis
async def test_the_gateway_serves_with_the_files_and_redis_holds_no_secret(
    folder: Path, module_redis_url: str, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(BYOK_MASTER_KEY_ENV, raising=False)
    profile = load_builtin("local-cpu-2x")  # has a BYOK route
    gateway = make_gateway(module_redis_url, tiny_model_dir, profile=profile, secrets_dir=folder)
    files = load_server_secrets(folder)
    async with gateway.client() as http:
        assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200
        assert (await http.put("/v2/byok/byok", json={"api_key": PROVIDER_KEY})).status_code == 200
        receipt = await purge_new_artifact(http, "content for a receipt")
    # The cache salt the engine got derives from cache-salt.key.
    assert gateway.engine.bodies[-1]["cache_salt"] == cache_salt(files.cache_salt_secret, DEV_TENANT, 0)
    # The BYOK key is sealed with byok-master.key: that key opens what Redis holds.
    client = aioredis.from_url(module_redis_url)
    try:
        sealed = await client.get(f"z:{{{DEV_TENANT}}}:byok:byok")
        assert KeyVault(files.byok_master_key).open(DEV_TENANT, "byok", sealed) == PROVIDER_KEY
        # The receipt is signed with receipt-signing.pem.
        signer = ReceiptSigner.from_pem((folder / SIGNING_KEY_FILE).read_bytes())
        assert receipt["key_id"] == signer.key_id and verify_receipt(receipt, signer.public_pem()).ok
        dump = await _redis_dump(client)
        assert await client.exists(LEGACY_SIGNING_KEY, LEGACY_PUBLIC_KEYS, LEGACY_BYOK_MASTER_KEY,
                                   LEGACY_CACHE_SALT) == 0  # fmt: skip
    finally:
        await client.aclose()
    assert PROVIDER_KEY.encode() not in dump
    for form in _secret_forms(folder):
        assert form not in dump


# -- signing key rotation ----------------------------------------------------------------------


@pytest.mark.redis
async def test_receipts_signed_before_a_rotation_verify_with_the_keys_listed_after_it(
    folder: Path, module_redis_url: str, tiny_model_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    gateway = make_gateway(module_redis_url, tiny_model_dir, secrets_dir=folder)
    async with gateway.client() as http:
        before = await purge_new_artifact(http, "signed before the rotation")
        capsys.readouterr()
        assert main(["secrets", "rotate-signing-key", "--secrets-dir", str(folder), "--json"]) == 0
        rotation = json.loads(capsys.readouterr().out)
        assert rotation["retired"] == before["key_id"] and rotation["current"] != before["key_id"]
        after = await purge_new_artifact(http, "signed after the rotation")  # the same gateway, not restarted
        listed = (await http.get("/v2/keys")).json()
    assert after["key_id"] == rotation["current"]
    assert [(key["key_id"], key["status"]) for key in listed["keys"]] == [
        (after["key_id"], "current"), (before["key_id"], "retired"),
    ]  # fmt: skip
    assert _mode(folder / RETIRED_KEYS_FILE) == 0o600 and _mode(folder / SIGNING_KEY_FILE) == 0o600
    assert b"PRIVATE" not in (folder / RETIRED_KEYS_FILE).read_bytes()

    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps(listed))
    for receipt in (before, after):
        path = tmp_path / f"{receipt['id']}.json"
        path.write_text(json.dumps(receipt))
        assert run_verify(path, keys_file, as_json=False) == 0, _printed(capsys)
    # The retired file itself, as a PEM of public keys, verifies the old receipt too.
    assert verify_file(tmp_path / f"{before['id']}.json", folder / RETIRED_KEYS_FILE).ok

    stranger = ReceiptSigner.generate()
    unknown = stranger.sign({name: v for name, v in before.items() if name not in {"key_id", "signature"}})
    (tmp_path / "unknown.json").write_text(json.dumps(unknown))
    capsys.readouterr()
    assert run_verify(tmp_path / "unknown.json", keys_file, as_json=False) == 1
    printed = _printed(capsys)
    assert stranger.key_id in printed and "none of the 2 keys" in printed and "GET /v2/keys" in printed


def test_public_keys_list_the_current_key_then_the_retired_ones_in_order(folder: Path) -> None:
    generate_missing(folder)
    keys = SigningKeys(folder)
    first = keys.signer().key_id
    second = rotate_signing_key(folder).current
    third = rotate_signing_key(folder).current
    assert [(k["key_id"], k["status"]) for k in keys.public_keys()] == [
        (third, "current"), (first, "retired"), (second, "retired"),
    ]  # fmt: skip


def test_a_kubernetes_secret_update_reaches_a_running_reader(tmp_path: Path) -> None:
    """The kubelet's layout: each key a link into ``..data``, itself a link to a timestamped
    folder; an update writes a new folder and swaps ``..data`` in one rename."""
    mount = tmp_path / "mount"
    mount.mkdir()
    generate_missing(mount / "..2026_01")
    (mount / "..data").symlink_to("..2026_01")
    for name in ALL_FILES:
        (mount / name).symlink_to(f"..data/{name}")
    keys = SigningKeys(mount)
    old = keys.signer().key_id

    generate_missing(mount / "..2026_02")
    (mount / "..data_tmp").symlink_to("..2026_02")
    os.replace(mount / "..data_tmp", mount / "..data")
    new = ReceiptSigner.from_pem((mount / "..2026_02" / SIGNING_KEY_FILE).read_bytes()).key_id
    assert new != old and keys.signer().key_id == new


def test_a_changed_key_file_that_does_not_load_keeps_the_last_good_key(
    folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    generate_missing(folder)
    keys = SigningKeys(folder)
    good = keys.signer().key_id
    with caplog.at_level(logging.ERROR, logger="ray.serve"):
        write_private_file(folder / SIGNING_KEY_FILE, b"half a key", overwrite=True)
        assert keys.signer().key_id == good
        assert keys.signer().key_id == good
        (folder / SIGNING_KEY_FILE).unlink()  # a Secret key removed by mistake
        assert keys.signer().key_id == good
        assert keys.public_keys()[0]["key_id"] == good
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2 and all(str(folder / SIGNING_KEY_FILE) in e and good in e for e in errors)
    assert "half a key" not in errors[0] and "is missing" in errors[1]
    replacement = ReceiptSigner.generate()
    write_private_file(folder / SIGNING_KEY_FILE, replacement.private_pem(), overwrite=True)
    assert keys.signer().key_id == replacement.key_id


def test_rotation_without_a_signing_key_fails_and_says_how_to_create_one(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["secrets", "rotate-signing-key", "--secrets-dir", str(folder)]) == 1
    printed = _printed(capsys)
    assert str(folder / SIGNING_KEY_FILE) in printed and "zumik secrets init" in printed
    assert not (folder / RETIRED_KEYS_FILE).exists()


# -- moving an earlier version's secrets out of Redis ------------------------------------------


async def _earlier_version_state(redis_url: str) -> dict[str, Any]:
    """Redis as the version that kept secrets there left it: its signing key, every public key
    it used (one retired before), the BYOK master key and a BYOK key sealed with it (under the
    name without the hash tag), the cache-salt secret; and a receipt the older key signed."""
    older, current = ReceiptSigner.generate(), ReceiptSigner.generate()
    master, salt = os.urandom(32), os.urandom(32)
    client = aioredis.from_url(redis_url)
    try:
        await client.set(LEGACY_SIGNING_KEY, current.private_pem())
        await client.hset(LEGACY_PUBLIC_KEYS, mapping={
            older.key_id: older.public_pem(), current.key_id: current.public_pem(),
        })  # fmt: skip
        await client.set(LEGACY_BYOK_MASTER_KEY, master)
        await client.set(LEGACY_CACHE_SALT, salt)
        await client.set(f"z:{DEV_TENANT}:byok:byok", KeyVault(master).seal(DEV_TENANT, "byok", PROVIDER_KEY))
        entry = '{"key_hint": "sk-\\u2026cdef", "updated_at": 5}'
        await client.hset(f"z:{DEV_TENANT}:byok-index", "byok", entry)
    finally:
        await client.aclose()
    old_receipt = older.sign(build_receipt(
        receipt_id="prg_" + "o" * 26, tenant=DEV_TENANT, target="art_" + "o" * 26, issued_at=1_700_000_000,
        profile="local-cpu", profile_ceiling=GuaranteeClass.CRYPTO_ERASED,
        stores=[StoreEntry("redis_state", "aof_rewritten", StoreResult.DONE, GuaranteeClass.COMPACTED, "")],
        purged=["art_" + "o" * 26], seq=1, prev_receipt_hash=None,
    ))  # fmt: skip
    return {"older": older, "current": current, "master": master, "salt": salt, "receipt": old_receipt}


@pytest.mark.redis
async def test_migrate_moves_an_earlier_versions_secrets_into_files_and_out_of_redis(
    folder: Path, redis_url: str, tiny_model_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.delenv(BYOK_MASTER_KEY_ENV, raising=False)
    earlier = await _earlier_version_state(redis_url)
    assert await _cli(["secrets", "migrate", "--redis-url", redis_url, "--secrets-dir", str(folder)]) == 0
    printed = _printed(capsys)
    assert printed.count("copied") == 3 and "BYOK keys moved under their {tenant} hash tag: 2" in printed
    assert (folder / SIGNING_KEY_FILE).read_bytes() == earlier["current"].private_pem()
    assert (folder / BYOK_MASTER_KEY_FILE).read_bytes() == earlier["master"]
    assert (folder / CACHE_SALT_FILE).read_bytes() == earlier["salt"]
    assert all(_mode(folder / name) == 0o600 for name in [*ALL_FILES, RETIRED_KEYS_FILE])
    for form in _secret_forms(folder):
        assert form.decode("latin-1") not in printed
    client = aioredis.from_url(redis_url)
    try:
        assert await client.exists(LEGACY_SIGNING_KEY, LEGACY_PUBLIC_KEYS, LEGACY_BYOK_MASTER_KEY,
                                   LEGACY_CACHE_SALT, f"z:{DEV_TENANT}:byok:byok") == 0  # fmt: skip
        dump = await _redis_dump(client)
    finally:
        await client.aclose()
    for form in _secret_forms(folder):
        assert form not in dump

    # The earlier version's data still works: its BYOK key opens, its receipts verify.
    gateway = make_gateway(redis_url, tiny_model_dir, secrets_dir=folder)
    assert await gateway.context.byok.get(DEV_TENANT, "byok") == PROVIDER_KEY
    async with gateway.client() as http:
        listed = (await http.get("/v2/keys")).json()
        assert [(key["key_id"], key["status"]) for key in listed["keys"]] == [
            (earlier["current"].key_id, "current"), (earlier["older"].key_id, "retired"),
        ]  # fmt: skip
        new_receipt = await purge_new_artifact(http, "after the migration")
    (tmp_path / "keys.json").write_text(json.dumps(listed))
    for receipt in (earlier["receipt"], new_receipt):
        (tmp_path / "receipt.json").write_text(json.dumps(receipt))
        assert verify_file(tmp_path / "receipt.json", tmp_path / "keys.json").ok

    # Run again: nothing left to move, nothing changed.
    files = {name: (folder / name).read_bytes() for name in [*ALL_FILES, RETIRED_KEYS_FILE]}
    migrate = ["secrets", "migrate", "--redis-url", redis_url, "--secrets-dir", str(folder)]
    assert await _cli([*migrate, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["secrets"].values()) == {"not_in_redis"} and report["redis_keys_deleted"] == []
    assert {name: (folder / name).read_bytes() for name in files} == files


@pytest.mark.redis
async def test_migrate_refuses_a_file_that_holds_another_value_and_changes_nothing(
    folder: Path, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    await _earlier_version_state(redis_url)
    generate_missing(folder, environ={})  # e.g. `zumik secrets init` run before the migration
    files = {name: (folder / name).read_bytes() for name in ALL_FILES}
    assert await _cli(["secrets", "migrate", "--redis-url", redis_url, "--secrets-dir", str(folder)]) == 1
    printed = _printed(capsys)
    assert "holds another value than the Redis key" in printed and "nothing was changed" in printed
    assert {name: (folder / name).read_bytes() for name in ALL_FILES} == files
    assert not (folder / RETIRED_KEYS_FILE).exists()
    client = aioredis.from_url(redis_url)
    try:
        assert await client.exists(LEGACY_SIGNING_KEY, LEGACY_PUBLIC_KEYS, LEGACY_BYOK_MASTER_KEY,
                                   LEGACY_CACHE_SALT) == 4  # fmt: skip
    finally:
        await client.aclose()


@pytest.mark.redis
async def test_the_embedded_default_moves_old_secrets_before_generating_the_rest(
    folder: Path, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(BYOK_MASTER_KEY_ENV, raising=False)
    earlier = await _earlier_version_state(redis_url)
    prepared = await asyncio.to_thread(prepare_secrets, folder, redis_url)  # LocalStack.start's step
    assert prepared.migration is not None and prepared.created == () and prepared.byok_keys_tagged == 2
    assert (folder / BYOK_MASTER_KEY_FILE).read_bytes() == earlier["master"]

    fresh = await asyncio.to_thread(prepare_secrets, tmp_path / "fresh", redis_url)  # all generated
    assert fresh.migration is None and {path.name for path in fresh.created} == ALL_FILES


async def test_migrate_with_no_redis_answering_fails_clearly_and_writes_nothing(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    assert await _cli(["secrets", "migrate", "--redis-url", url, "--secrets-dir", str(folder)]) == 1
    printed = _printed(capsys)
    assert "Redis did not answer" in printed and "run the same command again" in printed
    assert not folder.exists() or not any(folder.iterdir())
