"""``zumik serve`` as a user runs it, once from start to stop (local-cpu, the tiny model), in a
subprocess of its own (it cannot share ``running_stack``: the point is the command's own start
and stop). Invariants:

- the Ray dashboard and metrics URLs it prints answer; after a request the metrics port serves
  Zumik's series (``ray_zumik_*``) and Ray's Prometheus discovery file lists that port;
- SIGTERM drains: a streaming request in flight (its body still arriving, so it is provably in
  the gateway when the signal lands) gets its whole answer, while new requests get 503
  ``shutting_down``; then the process exits 0 and none of the processes it started (the Redis
  servers, Ray's, the vLLM engine's) remains.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from zumik_serve.app.ray_head import running_ray_address
from zumik_serve.home import ZumikHome
from zumik_serve.providers.sse import sse_lines_sync
from zumik_serve.store.local_redis import free_port

pytestmark = [pytest.mark.redis, pytest.mark.ray, pytest.mark.vllm]

DEV_KEY = "zk-dev-lifecycle-key-8c3e5a91d2f7"
MAX_TOKENS = 48  # the tiny model's greedy answer is exactly max_tokens tokens
START_TIMEOUT_S = 600


class Serve:
    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        self.log = tmp_path / "serve.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "OTEL_"))}
        env.pop("ZUMIK_REDIS_URL", None)
        env.pop("ZUMIK_TRACES", None)
        self.home = tmp_path / "home"
        env.update(ZUMIK_HOME=str(self.home), ZUMIK_DEV_KEY=DEV_KEY, PYTHONUNBUFFERED="1")
        command = [
            sys.executable, "-m", "zumik_serve.cli", "serve", "--port", str(self.port),
            "--dashboard-port", str(free_port()), "--metrics-port", str(free_port()),
            "--drain-timeout", "300",
        ]  # fmt: skip
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout_s: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        while (found := re.search(pattern, self.output)) is None:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} (exit {self.process.poll()}):\n{self.output[-6000:]}")
            time.sleep(1)
        return found


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    server = Serve(tmp_path)
    try:
        yield server
    finally:
        if server.process.poll() is None:  # the test failed midway: stop it without a drain
            server.process.send_signal(signal.SIGTERM)
            server.process.send_signal(signal.SIGTERM)
            try:
                server.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                server.process.kill()


def _metrics_text(url: str, wanted: str, timeout_s: float = 120) -> str:
    deadline = time.monotonic() + timeout_s
    while True:  # Ray exports metrics on an interval
        text = httpx.get(url, timeout=10).text
        if re.search(wanted, text, re.MULTILINE) or time.monotonic() > deadline:
            return text
        time.sleep(2)


def _streaming_with_slow_body(url: str, release: threading.Event) -> tuple[int, list[str]]:
    """A streaming chat request whose body arrives in two parts, the second once ``release`` is
    set: the status and the choices of every chunk (the usage chunk's usage), ``[DONE]`` last."""
    body = json.dumps(
        {"model": "zumik-tiny", "messages": [{"role": "user", "content": "Tell me a long story."}],
         "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
         "stream_options": {"include_usage": True}}
    ).encode()  # fmt: skip

    def parts() -> Iterator[bytes]:
        yield body[:20]
        release.wait(timeout=600)
        yield body[20:]

    headers = {"Authorization": f"Bearer {DEV_KEY}", "Content-Type": "application/json"}
    chunks: list[str] = []
    with (
        httpx.Client(timeout=600) as client,
        client.stream("POST", url, content=parts(), headers=headers) as response,
    ):
        for line in sse_lines_sync(response.iter_bytes()):
            if line.startswith("data: "):
                data = line.removeprefix("data: ")
                chunk = None if data == "[DONE]" else json.loads(data)
                chunks.append(data if chunk is None else json.dumps(chunk.get("usage") or chunk["choices"]))
        return response.status_code, chunks


def test_serve_prints_working_monitoring_urls_and_drains_on_sigterm(serve: Serve) -> None:
    dashboard = serve.wait_for(r"Ray dashboard:\s+(http://\S+)", START_TIMEOUT_S).group(1)
    metrics = serve.wait_for(r"Metrics:\s+(http://\S+/metrics)", 5).group(1)
    discovery = serve.wait_for(r"metrics addresses: (\S+\.json)\)", 5).group(1)
    api = f"http://127.0.0.1:{serve.port}"
    auth = {"Authorization": f"Bearer {DEV_KEY}"}

    # Monitoring: the dashboard answers; a request's decision shows on the metrics port.
    page = httpx.get(dashboard, timeout=30)
    assert page.status_code == 200 and "Ray" in page.text
    chat = {"model": "zumik-tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    assert httpx.post(f"{api}/v1/chat/completions", json=chat, headers=auth, timeout=300).status_code == 200
    text = _metrics_text(metrics, r"^ray_zumik_decisions_total\{")
    decisions = r'^ray_zumik_decisions_total\{[^}]*profile="local-cpu"'
    assert re.search(decisions, text, re.MULTILINE), text[-3000:]
    address = metrics.removeprefix("http://").removesuffix("/metrics")
    (group,) = json.loads(Path(discovery).read_text())
    assert address in group["targets"]

    started = psutil.Process(serve.process.pid).children(recursive=True)
    names = " ".join(_command(p) for p in started)
    assert "redis-server" in names and "raylet" in names and "gcs_server" in names, names
    # The head's address, for `zumik tenant delete` (it sweeps every node's KV tiers through it).
    home = ZumikHome(serve.home)
    address = running_ray_address(home, environ={})
    (gcs,) = [p for p in started if "gcs_server" in _command(p)]
    listening = {c.laddr.port for c in gcs.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    assert address is not None and int(address.rpartition(":")[2]) in listening, (address, listening)

    # SIGTERM with a streaming request in flight.
    release = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        streaming: Future[tuple[int, list[str]]] = pool.submit(
            _streaming_with_slow_body, f"{api}/v1/chat/completions", release
        )
        deadline = time.monotonic() + 120
        while httpx.get(f"{api}/healthz", timeout=30).json()["in_flight"] < 1:
            assert time.monotonic() < deadline and not streaming.done(), "the request never reached Zumik"
            time.sleep(0.2)
        serve.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 120
        while (refused := httpx.get(f"{api}/v1/models", headers=auth, timeout=30)).status_code == 200:
            assert time.monotonic() < deadline, "new requests were still taken after SIGTERM"
            time.sleep(0.2)
        release.set()
        status, chunks = streaming.result(timeout=600)

    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "shutting_down" and refused.headers["retry-after"] == "1"
    assert status == 200 and chunks[-1] == "[DONE]", chunks[-3:]
    # Every token was generated, and the answer ran to its length: counted by the usage, not by
    # the content chunks (vLLM merges the deltas of tokens that come faster than they are sent,
    # as while the stack drains: seen once, 47 chunks for 48 tokens).
    *contents, usage = [json.loads(chunk) for chunk in chunks[:-1]]
    assert usage["completion_tokens"] == MAX_TOKENS, usage
    assert "".join(c["delta"].get("content") or "" for choices in contents for c in choices)
    assert contents[-1][-1]["finish_reason"] == "length"

    assert serve.process.wait(timeout=300) == 0, serve.output[-6000:]
    assert running_ray_address(home, environ={}) is None and not (home.run_dir / "ray.json").exists()
    assert re.search(r"drained: 1 request\(s\) in flight finished", serve.output), serve.output[-3000:]
    deadline = time.monotonic() + 60
    while left := [p for p in started if _alive(p)]:
        if time.monotonic() > deadline:
            raise AssertionError(f"still running after the stop: {[_command(p) for p in left]}")
        time.sleep(1)


def _alive(process: psutil.Process) -> bool:
    try:  # is_running() also tells a reused pid from the process seen before
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _command(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""
