"""Redis ACL users on a real redis-server (``store/redis_acl.py``): least privilege, no password
where a log or ``ps`` could show it, clear errors for a refused user, and TLS.

- ``default`` is refused; the gateway's user reaches every Zumik key and the commands the purge
  needs, not FLUSHALL or CONFIG SET; the engines' user reads and writes ``kv:*``/``kvkey:*``
  only (NOPERM on ``zumik:*`` and ``z:*``, on FLUSHALL, KEYS, CONFIG, FUNCTION LOAD), through
  the clients kvstore builds from a config;
- the engines' connector config names the user and the password's file, never the password;
- a wrong password, a disabled user or a user without Zumik's keys stops a start with a message
  naming the user and what to check; an unreachable Redis does not (that is an outage);
- ``rediss://`` works for the gateway's client and the engines' tiers, and only with the CA.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kvstore.keys import BlockKey, ScopeId
from kvstore.tier import BlockAddress
from kvstore.tiers.build import KvRedisPasswordError, build_keyring, build_tiers
from kvstore.tiers.redis_tier import RedisTier
from profiles import load_builtin
from zumik_serve.engines.vllm_config import kv_transfer_config
from zumik_serve.errors import StoreUnavailableError
from zumik_serve.home import ZumikHome
from zumik_serve.store.client import (
    RedisDurabilityError,
    check_access,
    check_durability,
    gateway_client,
    guard,
)
from zumik_serve.store.local_redis import LocalRedis, TlsFiles, free_port, wait_for_redis
from zumik_serve.store.redis_acl import (
    GATEWAY_USER,
    KV_USER,
    RedisAccessError,
    RedisPasswordError,
    acl_template_text,
    engine_redis_access,
    redact_url,
    with_user,
)

pytestmark = pytest.mark.redis

ADDRESS = BlockAddress("c" * 64, BlockKey("0" * 32), ScopeId("s" * 16))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    started = LocalRedis(data_dir=tmp_path_factory.mktemp("redis")).start()
    yield started
    started.stop()


def kv_config(server: LocalRedis) -> dict[str, object]:
    access = server.kv_access
    return {"compat_digest": "c" * 64, "redis_url": access.url, "keyring_redis_url": access.url,
            "redis_password_file": str(access.password_file)}  # fmt: skip


def test_default_user_is_refused(server: LocalRedis) -> None:
    port = int(str(server.port))
    anonymous = redis.Redis(host=server.host, port=port, protocol=2)
    with pytest.raises(redis.exceptions.AuthenticationError):  # NOAUTH: default is off
        anonymous.get("zumik:anything")
    with pytest.raises(redis.exceptions.AuthenticationError):  # and cannot be logged in as
        redis.Redis(host=server.host, port=port, username="default", password="").ping()


def test_gateway_user_has_every_key_and_the_purge_commands_only(server: LocalRedis) -> None:
    gateway = redis.Redis.from_url(server.url)
    assert gateway.acl_whoami() == GATEWAY_USER
    for key in ("zumik:apikey:x", "z:{ten_a}:gen:x", "kv:c:s:k", "kvkey:s"):
        assert gateway.set(key, b"v") and gateway.get(key) == b"v"
    assert gateway.config_get("appendonly") == {"appendonly": "yes"}
    assert gateway.info("persistence")["aof_enabled"] == 1
    assert gateway.eval("return redis.call('GET', KEYS[1])", 1, "zumik:apikey:x") == b"v"
    for forbidden in (gateway.flushall, lambda: gateway.config_set("appendonly", "no"),
                      lambda: gateway.keys("*"), lambda: gateway.acl_setuser("x")):  # fmt: skip
        with pytest.raises(redis.exceptions.NoPermissionError):
            forbidden()
    keyless = "return redis.call('EXISTS', KEYS[1])"  # scripts name '' for an absent optional key
    assert gateway.eval(keyless, 1, "") == 0


def test_kv_user_reads_and_writes_kv_keys_and_is_refused_zumik_keys(server: LocalRedis) -> None:
    config = kv_config(server)
    (tier,) = build_tiers(config)
    keyring = build_keyring(config)
    assert isinstance(tier, RedisTier) and keyring is not None
    assert tier.store(ADDRESS, b"block") and tier.contains([ADDRESS]) == [True]
    assert tier.load(ADDRESS) == b"block"
    data_key = keyring.data_key(ADDRESS.scope, create=True)
    assert data_key is not None and len(data_key) == 32
    assert tier.remove_scope(ADDRESS.scope) == 1 and tier.take_events() == []

    kv = redis.Redis.from_url(
        server.kv_access.url, password=Path(str(config["redis_password_file"])).read_text()
    )
    redis.Redis.from_url(server.url).set("zumik:apikey:victim", b"ten_a")
    library = "#!lua name=x\nredis.register_function('f', function() end)"
    attempts = [
        lambda: kv.get("zumik:apikey:victim"), lambda: kv.set("zumik:apikey:forged", b"ten_b"),
        lambda: kv.get("z:{ten_a}:gen:x"), kv.flushall, lambda: kv.config_get("dir"), kv.script_flush,
        lambda: kv.keys("*"), lambda: kv.function_load(library),
    ]  # fmt: skip
    for attempt in attempts:
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()


def test_engine_config_names_the_kv_user_and_the_password_file_never_the_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ZUMIK_SECRETS_DIR", raising=False)
    home = ZumikHome(tmp_path / "home")
    server = LocalRedis(data_dir=tmp_path / "redis", secrets_dir=home.root / "secrets").start()
    try:
        profile = load_builtin("local-cpu")
        config = kv_transfer_config(
            profile, compat_digest="c" * 64, redis_url=server.url, home_root=home.root
        )
        assert config is not None
        extra = config["kv_connector_extra_config"]
        text = json.dumps(config)
        for name in ("redis-gateway.password", "redis-kv.password"):
            assert (home.root / "secrets" / name).read_text() not in text
        assert (
            extra["redis_url"] == extra["keyring_redis_url"] == f"redis://{KV_USER}@127.0.0.1:{server.port}/0"
        )
        assert extra["redis_password_file"] == str(home.root / "secrets" / "redis-kv.password")
        (_host, tier, _disk) = build_tiers(extra)  # the engine's tiers log in as zumik-kv
        assert isinstance(tier, RedisTier) and tier.store(ADDRESS, b"x")
        (home.root / "secrets" / "redis-kv.password").unlink()
        with pytest.raises(KvRedisPasswordError, match="redis-kv.password"):
            build_tiers(extra)  # an engine without the file fails at start, naming it
        with pytest.raises(RedisPasswordError, match="redis-kv.password"):
            kv_transfer_config(profile, compat_digest="c" * 64, redis_url=server.url, home_root=home.root)
    finally:
        server.stop()


def test_engine_access_of_a_redis_without_users_is_the_same_url() -> None:
    plain = "redis://zumik-redis:6379/0"
    assert engine_redis_access(plain, Path("/nonexistent")).password_file is None
    assert engine_redis_access(plain, Path("/nonexistent")).url == plain
    with pytest.raises(RedisPasswordError, match="no user"):
        engine_redis_access("redis://:secret@zumik-redis:6379/0", Path("/nonexistent"))


def test_a_refused_user_stops_the_start_with_what_to_check(server: LocalRedis) -> None:
    wrong = with_user(server.url, GATEWAY_USER, "not-the-password")
    with pytest.raises(RedisAccessError) as refused:
        check_access(wrong)
    message = str(refused.value)
    assert "zumik-gateway" in message and "redis-gateway.password" in message
    assert "not-the-password" not in message
    with pytest.raises(RedisAccessError, match="put it and its password in the URL"):
        check_access(f"redis://{server.host}:{server.port}/0")  # no user: default is off
    kv_url = with_user(server.url, KV_USER, Path(str(server.kv_access.password_file)).read_text())
    with pytest.raises(RedisAccessError, match="zumik-kv"):
        check_access(kv_url)  # logs in, but has no Zumik keys: not the gateway's user
    check_access(server.url)
    check_access(f"redis://{GATEWAY_USER}:x@127.0.0.1:{free_port()}/0")  # unreachable: an outage, no error


async def test_a_refused_gateway_call_is_logged_with_what_to_check(
    server: LocalRedis, caplog: pytest.LogCaptureFixture
) -> None:
    client = gateway_client(with_user(server.url, GATEWAY_USER, "rotated-elsewhere"))
    try:
        with caplog.at_level(logging.ERROR, logger="ray.serve"), pytest.raises(StoreUnavailableError):
            await guard(client.get("zumik:apikey:x"))
    finally:
        await client.aclose()
    assert "redis-gateway.password" in caplog.text and "rotated-elsewhere" not in caplog.text


def test_passwords_stay_out_of_ps_the_run_file_and_reprs(tmp_path: Path) -> None:
    server = LocalRedis(data_dir=tmp_path / "redis", run_file=tmp_path / "run" / "redis.json").start()
    try:
        passwords = [(server.secrets_folder / name).read_text() for name in ("redis-gateway.password",
                                                                            "redis-kv.password")]  # fmt: skip
        # What redis-server was started with (ps shows it until the server renames its process).
        command_line = " ".join(server.command)
        acl_file = (tmp_path / "redis" / "users.acl").read_text()
        shown = [command_line, acl_file, (tmp_path / "run" / "redis.json").read_text(), repr(server),
                 server.redacted_url, redact_url(server.url)]  # fmt: skip
        assert passwords[0] in server.url  # the gateway's URL carries its password, for its callers
        for password in passwords:
            assert all(password not in text for text in shown)
        assert "--aclfile" in command_line and "user zumik-kv on" in acl_file
        assert server.redacted_url == f"redis://{GATEWAY_USER}:***@127.0.0.1:{server.port}/0"
    finally:
        server.stop()


def test_the_shipped_acl_template_is_the_code_s_rules() -> None:
    """deploy/redis renders its ACL file from this template (tests/unit/test_deploy.py runs it)."""
    template = Path(__file__).resolve().parents[2] / "deploy" / "redis" / "users.acl.template"
    assert template.read_text() == acl_template_text()


# -- TLS ------------------------------------------------------------------------------------------


def make_tls_files(folder: Path) -> TlsFiles:
    """A self-signed CA and a server certificate for 127.0.0.1, made with cryptography."""
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "zumik test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "redis")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                     x509.DNSName("localhost")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    files = TlsFiles(cert_file=folder / "redis.crt", key_file=folder / "redis.key", ca_file=folder / "ca.crt")
    files.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return files


async def test_rediss_urls_work_for_the_gateway_and_the_engines(tmp_path: Path) -> None:
    tls = make_tls_files(tmp_path / "tls")
    server = LocalRedis(data_dir=tmp_path / "redis", tls=tls).start()
    try:
        assert server.url.startswith(f"rediss://{GATEWAY_USER}:")
        client = gateway_client(server.url)
        try:
            assert await client.set("zumik:tls", b"v") and await client.get("zumik:tls") == b"v"
        finally:
            await client.aclose()
        assert server.kv_access.url.startswith(f"rediss://{KV_USER}@127.0.0.1:")
        (tier,) = build_tiers({"redis_url": server.kv_access.url,
                               "redis_password_file": str(server.kv_access.password_file)})  # fmt: skip
        assert tier.store(ADDRESS, b"sealed-in-transit") and tier.load(ADDRESS) == b"sealed-in-transit"
        without_ca = server.url.partition("?")[0]  # the system's CAs do not know the test CA
        with pytest.raises(redis.exceptions.ConnectionError):
            redis.Redis.from_url(without_ca, socket_timeout=5).ping()
        plain = with_user(f"redis://127.0.0.1:{server.port}/0", GATEWAY_USER, "x")  # no TLS: refused
        with pytest.raises(redis.exceptions.ConnectionError):
            await aioredis.from_url(plain, socket_timeout=5).ping()
    finally:
        server.stop()


def test_a_state_redis_that_may_lose_acknowledged_writes_stops_the_start(
    server: LocalRedis, tmp_path: Path
) -> None:
    """Zumik answers a write once Redis has it on disk: the embedded server (AOF, fsync before each
    reply) passes; a Redis that fsyncs every second, one without an AOF, and one whose
    configuration the user may not read each stop the start (the build of the app, as deployed)
    with what to change, unless the operator sets ZUMIK_REDIS_DURABILITY=unchecked, when the gap
    is logged instead."""
    assert check_durability(server.url, environ={}) is None
    port = free_port()
    loose = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
         "--appendfsync", "everysec", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        url = f"redis://127.0.0.1:{port}/0"
        wait_for_redis(url, timeout_s=30, process=loose)
        with pytest.raises(
            RedisDurabilityError, match=r"appendfsync 'everysec'.*ZUMIK_REDIS_DURABILITY=unchecked"
        ):
            check_durability(url, environ={})
        redis.Redis.from_url(url).config_set("appendonly", "no")
        with pytest.raises(RedisDurabilityError, match=r"AOF is off"):
            check_durability(url, environ={})
        assert "AOF is off" in str(check_durability(url, environ={"ZUMIK_REDIS_DURABILITY": "unchecked"}))
        kv_url = with_user(server.url, KV_USER, Path(str(server.kv_access.password_file)).read_text())
        with pytest.raises(RedisDurabilityError, match=r"configuration cannot be read \(CONFIG GET"):
            check_durability(kv_url, environ={})  # a user without +config|get, as on a managed Redis

        # On the production path: building the app stops before any deployment, or logs the gap.
        from zumik_serve.app.application import build_serve_app

        profile = load_builtin("local-cpu")
        tiers = profile.kv_tiers.model_copy(update={"redis": False})
        build = {"model_dir": tmp_path, "redis_url": url, "dev_key": None, "home": ZumikHome(tmp_path)}
        with pytest.raises(RedisDurabilityError, match="AOF is off"):
            build_serve_app(profile.model_copy(update={"kv_tiers": tiers}), **build)  # type: ignore[arg-type]
    finally:
        loose.kill()
        loose.wait(timeout=30)
    assert check_durability(f"redis://127.0.0.1:{free_port()}/0", environ={}) is None  # an outage, no error
