"""The embedded redis-server: started by ``zumik serve`` under ``$ZUMIK_HOME/redis``.

Durability choice: ``appendonly yes`` with ``appendfsync always``, so Redis fsyncs the AOF before
it answers a write; an object Zumik has acknowledged survives ``kill -9`` of redis-server.
(``WAITAOF`` gives the same promise per command; ``always`` gives it for every write without
extra round trips, at a throughput cost that Zumik's write rate does not notice.)

The KV Redis (``role="kv"``, ``embedded_kv_redis``): a second server for the engines' KV blocks
only, so that KV growth never touches tenant state. It is a cache: ``maxmemory`` with
``volatile-lru`` (the least recently used blocks are evicted: each has a TTL; the tier's
per-scope byte counts have none and are never evicted), no AOF and no RDB. The state
server keeps ``noeviction``; the per-scope data keys (the keyring) stay there. On the KV server
the ``zumik-kv`` user may also run INFO (the tier reports the server's memory and evictions).

Access: the ACL users of ``redis_acl.py`` (``default`` off), loaded from ``users.acl`` in the data
directory (SHA-256 hashes only; no password on the command line, where ``ps`` would show it),
with the passwords read from (or, when missing, generated into) the secrets folder. A third
user, ``zumik-admin``, exists for whoever started the server (tests flush and change ACLs with
it): its password lives only in this object's memory. Files: the data directory is 0700 and the
server runs with umask 077, so its AOF, its log and the ACL file are 0600; so is the run file,
which holds no password.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import redis

from zumik_serve.home import ZumikHome
from zumik_serve.secret_files import (
    ensure_private_dir,
    read_or_create_secret_file,
    secrets_dir,
    write_private_file,
)
from zumik_serve.store.redis_acl import (
    GATEWAY_PASSWORD_FILE,
    GATEWAY_USER,
    KV_PASSWORD_FILE,
    KV_USER,
    EngineRedisAccess,
    RedisAccessError,
    RedisPasswords,
    access_refused_message,
    acl_file_text,
    engine_redis_access,
    parse_password,
    password_sha256,
    read_password,
    redact_url,
    with_user,
)

REDIS_URL_ENV = "ZUMIK_REDIS_URL"
KV_REDIS_URL_ENV = "ZUMIK_KV_REDIS_URL"  # the KV tier's own Redis (gateway user's URL)
ADMIN_USER = "zumik-admin"
ACL_FILE = "users.acl"


class RedisNotInstalledError(RuntimeError):
    pass


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a TLS-only server: its certificate and key, and the CA clients verify it with."""

    cert_file: Path
    key_file: Path
    ca_file: Path


@dataclass
class LocalRedis:
    """A redis-server child process with AOF on, bound to loopback, with ACL users.

    ``secrets_dir``: where the users' password files are (default: ``data_dir/secrets``);
    missing ones are generated (0600)."""

    data_dir: Path
    run_file: Path | None = None
    port: int | None = None
    host: str = "127.0.0.1"
    secrets_dir: Path | None = None
    tls: TlsFiles | None = None  # TLS only (no plain port); URLs are rediss:// with the CA named
    role: str = "state"  # "state": AOF, noeviction; "kv": maxmemory_bytes with volatile-lru, no AOF
    maxmemory_bytes: int | None = None  # the KV server's bound (required for role "kv")
    _process: subprocess.Popen[bytes] | None = None
    command: list[str] = field(default_factory=list, init=False, repr=False)  # as started (no secret)
    _admin_password: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)

    @property
    def secrets_folder(self) -> Path:
        return self.secrets_dir if self.secrets_dir is not None else self.data_dir / "secrets"

    @property
    def url(self) -> str:
        """The gateway user's URL, password included: never log it (``redacted_url``)."""
        password = read_password(self.secrets_folder, GATEWAY_PASSWORD_FILE)
        return with_user(self._plain_url, GATEWAY_USER, password)

    @property
    def redacted_url(self) -> str:
        return redact_url(self.url)

    @property
    def admin_url(self) -> str:
        """An all-powerful user's URL, for tests and tools of the process that started the server."""
        return with_user(self._plain_url, ADMIN_USER, self._admin_password)

    @property
    def kv_access(self) -> EngineRedisAccess:
        """The engines' access: the ``zumik-kv`` user, its password in a file."""
        return engine_redis_access(self.url, self.secrets_folder)

    @property
    def _plain_url(self) -> str:
        if self.tls is not None:
            return f"rediss://{self.host}:{self.port}/0?ssl_ca_certs={quote(str(self.tls.ca_file))}"
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self, timeout_s: float = 15.0) -> LocalRedis:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(binary).exists():
            raise RedisNotInstalledError(
                "redis-server is not installed; install it with `apt-get install redis-server` "
                f"or point Zumik at a running server with {REDIS_URL_ENV}=redis://zumik-gateway:PASSWORD@HOST:PORT/0"
            )
        ensure_private_dir(self.data_dir)
        acl_file = self.data_dir / ACL_FILE
        admin_line = f"user {ADMIN_USER} on resetpass #{password_sha256(self._admin_password)} ~* &* +@all"
        acl_text = acl_file_text(ensure_passwords(self.secrets_folder), (admin_line,))
        if self.role == "kv":  # the KV tier reports this server's memory and evictions (INFO)
            acl_text = "".join(
                f"{line} +info\n" if line.startswith(f"user {KV_USER} ") else f"{line}\n"
                for line in acl_text.splitlines()
            )
        write_private_file(acl_file, acl_text.encode(), overwrite=True)
        if self.port is None:
            self.port = free_port(self.host)
        if self.tls is None:
            listen = ["--port", str(self.port)]
        else:
            listen = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls.cert_file),
                      "--tls-key-file", str(self.tls.key_file), "--tls-ca-cert-file", str(self.tls.ca_file),
                      "--tls-auth-clients", "no"]  # fmt: skip
        args = [
            binary,
            "--bind",
            self.host,
            *listen,
            "--dir",
            str(self.data_dir),
            *self._role_args(),
            "--save",
            "",
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
            "--aclfile",
            str(acl_file),
            "--logfile",
            str(self.data_dir / "redis.log"),
        ]
        # umask 077: the AOF folder and files, the log and any rewrite are created owner-only.
        self.command = args
        self._process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, umask=0o077
        )
        wait_for_redis(self.url, timeout_s=timeout_s, process=self._process)
        if self.run_file is not None:
            info = {"url": self._plain_url, "pid": self._process.pid, "secrets_dir": str(self.secrets_folder)}
            write_private_file(self.run_file, json.dumps(info).encode(), overwrite=True)
        return self

    def _role_args(self) -> list[str]:
        if self.role == "state":
            return ["--appendonly", "yes", "--appendfsync", "always", "--appenddirname", "appendonly",
                    "--maxmemory-policy", "noeviction"]  # fmt: skip
        if self.role != "kv" or not self.maxmemory_bytes or self.maxmemory_bytes <= 0:
            raise ValueError("a KV Redis (role 'kv') needs a positive maxmemory_bytes")
        return ["--appendonly", "no", "--maxmemory", str(self.maxmemory_bytes),
                "--maxmemory-policy", "volatile-lru"]  # fmt: skip

    def kill(self) -> None:
        """SIGKILL, as a crash would (used by durability tests)."""
        if self._process is not None:
            self._process.kill()
            self._process.wait(timeout=10)

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=timeout_s)
        self._process = None
        if self.run_file is not None:
            self.run_file.unlink(missing_ok=True)


def embedded_redis(home: ZumikHome, port: int | None = None) -> LocalRedis:
    run_file = home.run_dir / "redis.json"
    return LocalRedis(data_dir=home.redis_dir, run_file=run_file, port=port, secrets_dir=secrets_dir(home))


def embedded_kv_redis(home: ZumikHome, maxmemory_bytes: int, port: int | None = None) -> LocalRedis:
    """The KV Redis of ``zumik serve``: same users and secrets as the state server, its own folder."""
    return LocalRedis(
        data_dir=home.root / "redis-kv", run_file=home.run_dir / "redis-kv.json", port=port,
        secrets_dir=secrets_dir(home), role="kv", maxmemory_bytes=maxmemory_bytes,
    )  # fmt: skip


def ensure_passwords(folder: Path) -> RedisPasswords:
    """The users' passwords from ``folder``, each generated (0600) when its file is missing."""

    def password(name: str) -> str:
        data = read_or_create_secret_file(folder / name, lambda: secrets.token_urlsafe(32).encode())
        return parse_password(data, folder / name)

    return RedisPasswords(gateway=password(GATEWAY_PASSWORD_FILE), kv=password(KV_PASSWORD_FILE))


def running_redis_url(home: ZumikHome) -> str | None:
    """``ZUMIK_REDIS_URL``, else the embedded server's URL (the gateway user's, password from
    its file) if it is running now, else None."""
    return _running_url(home, REDIS_URL_ENV, "redis.json")


def running_kv_redis_url(home: ZumikHome) -> str | None:
    """``ZUMIK_KV_REDIS_URL``, else the embedded KV server's URL (the gateway user's) if it is
    running now, else None (the KV blocks, if any, are in the state Redis)."""
    return _running_url(home, KV_REDIS_URL_ENV, "redis-kv.json")


def _running_url(home: ZumikHome, env: str, run_file: str) -> str | None:
    """``env`` when set, else the URL of the embedded server ``run_file`` describes, when its
    process runs now and is this user's (its password file is then this user's to read)."""
    if os.environ.get(env):
        return os.environ[env]
    try:
        info = json.loads((home.run_dir / run_file).read_text())
        os.kill(int(info["pid"]), 0)
    except (OSError, ValueError, KeyError):
        return None
    folder = Path(info["secrets_dir"]) if "secrets_dir" in info else secrets_dir(home)
    return with_user(str(info["url"]), GATEWAY_USER, read_password(folder, GATEWAY_PASSWORD_FILE))


def wait_for_redis(url: str, *, timeout_s: float, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    client = redis.Redis.from_url(url, socket_timeout=1.0)
    try:
        while True:
            if process is not None and process.poll() is not None:
                err = process.stderr.read().decode(errors="replace") if process.stderr else ""
                raise RuntimeError(f"redis-server exited with code {process.returncode}: {err}")
            try:
                # Answering is not enough: while it loads its AOF, every command is a LOADING error.
                if client.ping() and int(client.info("persistence").get("loading", 0)) == 0:
                    return
            except (redis.exceptions.AuthenticationError, redis.exceptions.NoPermissionError) as exc:
                raise RedisAccessError(access_refused_message(url, exc)) from None
            except redis.exceptions.RedisError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis at {redact_url(url)} did not answer within {timeout_s:.0f} s")
            time.sleep(0.05)
    finally:
        client.close()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
