"""Engine failure mid-stream, for real: vLLM's engine process is killed while it streams.

Invariants: the client gets an SSE error event (an OpenAI error object) and then ``[DONE]``,
never a made-up ``finish_reason``; Serve replaces the failed replica and later requests succeed.
Runs last (marker ``disruptive``): the stack has no engine for about a minute.
"""

from __future__ import annotations

import json
import time

import httpx
import psutil
import pytest

from zumik_serve.providers.sse import sse_lines_sync

pytestmark = [pytest.mark.redis, pytest.mark.ray, pytest.mark.vllm, pytest.mark.disruptive]


def kill_engine_core(app_name: str) -> int:
    """SIGKILL the vLLM EngineCore process under ``app_name``'s EngineReplica actor."""
    for proc in psutil.process_iter(["name", "cmdline"]):
        label = f"{proc.info['name']} {' '.join(proc.info['cmdline'] or [])}"
        if "EngineCore" not in label:
            continue
        parent = proc.parent()
        if parent is not None and f"ServeReplica:{app_name}:EngineReplica" in " ".join(parent.cmdline()):
            proc.kill()
            return proc.pid
    raise AssertionError(f"no vLLM EngineCore process found under app {app_name!r}")


def stream_and_break(http: httpx.Client, path: str, model: str, break_after: int, kill) -> list[str]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Write a very long story."}],
        "max_tokens": 1800,
        "stream": True,
    }
    lines: list[str] = []
    with http.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        for line in sse_lines_sync(response.iter_bytes()):
            if not line:
                continue
            lines.append(line)
            if len(lines) == break_after:
                kill()
    return lines


def assert_error_event_then_done(lines: list[str]) -> None:
    assert lines[-1] == "data: [DONE]"
    assert lines.count("data: [DONE]") == 1
    payloads = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert "error" in payloads[-1], payloads[-1]
    error = payloads[-1]["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "server_error"
    assert error["code"] is None or isinstance(error["code"], str)
    finishes = [c["choices"][0]["finish_reason"] for c in payloads[:-1] if c.get("choices")]
    assert all(reason is None for reason in finishes)  # no made-up finish_reason


def wait_until_serving(http: httpx.Client, path: str, model: str, timeout_s: float = 300) -> httpx.Response:
    deadline = time.monotonic() + timeout_s
    while True:
        retry = http.post(path, json={"model": model, "prompt": "hi", "max_tokens": 2})
        if retry.status_code == 200:
            return retry
        assert retry.status_code in (500, 502, 503), retry.text
        assert time.monotonic() < deadline, "the engine replica was not replaced in time"
        time.sleep(2)


def test_engine_killed_mid_stream_gives_error_event_then_done(http: httpx.Client, running_stack) -> None:
    # A warmed snapshot, to check after the restart that the fresh engine restores it from a tier.
    doc = http.post("/v2/artifacts", json={"role": "document", "content": "Warm me. " * 120}).json()["id"]
    bundle = http.post("/v2/bundles", json={"artifacts": [doc]}).json()["id"]
    snapshot = http.post("/v2/snapshots", json={"bundle": bundle}).json()["id"]
    warm = http.post(f"/v2/snapshots/{snapshot}/warm").json()
    assert warm["num_blocks"] > 10 and warm["persisted_blocks"]["redis"] == warm["num_blocks"]
    ask = {"snapshot": snapshot, "input": "Summarize.", "max_tokens": 8, "temperature": 0}
    before = http.post("/v2/generate", json=ask).json()

    lines = stream_and_break(
        http, "/v1/chat/completions", running_stack.model, 3, lambda: kill_engine_core("zumik")
    )
    assert_error_event_then_done(lines)
    retry = wait_until_serving(http, "/v1/completions", running_stack.model)
    assert retry.json()["usage"]["completion_tokens"] == 2

    # The replacement engine starts with an empty prefix cache and restores from the Redis tier.
    after = http.post("/v2/generate", json=ask).json()
    assert after["reuse"]["captured_tokens"] >= 0.9 * warm["num_blocks"] * warm["block_size"]
    assert after["output"] == before["output"]
