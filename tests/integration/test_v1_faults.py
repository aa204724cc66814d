"""Engine failure mid-stream, for real: the engine replica is killed while it streams.

Invariants: the client gets an SSE error event (an OpenAI error object) and then ``[DONE]``,
never a made-up ``finish_reason``; Serve replaces the replica and later requests succeed.
Runs last (marker ``disruptive``) because the stack is without an engine for about a minute.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

pytestmark = [pytest.mark.redis, pytest.mark.ray, pytest.mark.vllm, pytest.mark.disruptive]


def _kill_engine_replica() -> str:
    import ray

    for actor in ray.util.list_named_actors(all_namespaces=True):
        if "EngineReplica" in actor["name"] and actor["name"].startswith("SERVE_REPLICA"):
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
            return str(actor["name"])
    raise AssertionError("no EngineReplica actor found")


def test_replica_killed_mid_stream_gives_error_event_then_done(http: httpx.Client, running_stack) -> None:
    body = {
        "model": running_stack.model,
        "messages": [{"role": "user", "content": "Write a very long story."}],
        "max_tokens": 1800,
        "stream": True,
    }
    lines: list[str] = []
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line:
                continue
            lines.append(line)
            if len(lines) == 3:
                _kill_engine_replica()
    assert lines[-1] == "data: [DONE]"
    payloads = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert "error" in payloads[-1], payloads[-1]
    error = payloads[-1]["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "server_error"
    finishes = [c["choices"][0]["finish_reason"] for c in payloads[:-1] if c.get("choices")]
    assert all(reason is None for reason in finishes)  # no made-up finish_reason

    deadline = time.monotonic() + 240
    while True:
        retry = http.post(
            "/v1/completions", json={"model": running_stack.model, "prompt": "hi", "max_tokens": 2}
        )
        if retry.status_code == 200:
            break
        assert retry.status_code in (500, 502, 503), retry.text
        assert time.monotonic() < deadline, "the engine replica was not replaced in time"
        time.sleep(2)
    assert retry.json()["usage"]["completion_tokens"] == 2
