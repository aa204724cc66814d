"""The embedded redis-server: started by ``zumik serve`` under ``$ZUMIK_HOME/redis``.

Durability choice: ``appendonly yes`` with ``appendfsync always``, so Redis fsyncs the AOF before
it answers a write; an object Zumik has acknowledged survives ``kill -9`` of redis-server.
(``WAITAOF`` gives the same promise per command; ``always`` gives it for every write without
extra round trips, at a throughput cost that Zumik's write rate does not notice.)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from zumik_serve.home import ZumikHome

REDIS_URL_ENV = "ZUMIK_REDIS_URL"


class RedisNotInstalledError(RuntimeError):
    pass


@dataclass
class LocalRedis:
    """A redis-server child process with AOF on, bound to loopback."""

    data_dir: Path
    run_file: Path | None = None
    port: int | None = None
    host: str = "127.0.0.1"
    _process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self, timeout_s: float = 15.0) -> LocalRedis:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(binary).exists():
            raise RedisNotInstalledError(
                "redis-server is not installed; install it with `apt-get install redis-server` "
                f"or point Zumik at a running server with {REDIS_URL_ENV}=redis://HOST:PORT/0"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.port is None:
            self.port = free_port(self.host)
        args = [
            binary,
            "--bind",
            self.host,
            "--port",
            str(self.port),
            "--dir",
            str(self.data_dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--appenddirname",
            "appendonly",
            "--save",
            "",
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
            "--logfile",
            str(self.data_dir / "redis.log"),
        ]
        self._process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        wait_for_redis(self.url, timeout_s=timeout_s, process=self._process)
        if self.run_file is not None:
            self.run_file.parent.mkdir(parents=True, exist_ok=True)
            self.run_file.write_text(json.dumps({"url": self.url, "pid": self._process.pid}))
        return self

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
    return LocalRedis(data_dir=home.redis_dir, run_file=home.run_dir / "redis.json", port=port)


def running_redis_url(home: ZumikHome) -> str | None:
    """``ZUMIK_REDIS_URL``, else the embedded server's URL if it is running now, else None."""
    if os.environ.get(REDIS_URL_ENV):
        return os.environ[REDIS_URL_ENV]
    run_file = home.run_dir / "redis.json"
    try:
        info = json.loads(run_file.read_text())
        os.kill(int(info["pid"]), 0)
    except (OSError, ValueError, KeyError):
        return None
    return str(info["url"])


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
            except redis.exceptions.RedisError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis at {url} did not answer within {timeout_s:.0f} s")
            time.sleep(0.05)
    finally:
        client.close()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
