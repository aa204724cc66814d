"""``zumik bench fuzz`` in small, against the real stack (the per-PR size of test T1).

Holds: schemathesis cases generated from the official OpenAI spec, positive and negative, get
no 5xx from /v1, every 200 JSON body validates against its operation's schema, every 4xx is an
``ErrorResponse``, no /v1 body carries a key the spec does not declare; Zumik's own /v2 routes
answer no 5xx either. Each /v1 operation really got examples in each mode, and positive ones
reached the engine (200s), so the checks cannot pass vacuously.
"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.integration.conftest import RunningStack
from zumik_serve.bench.fuzz import V1_OPERATIONS, FuzzResult, default_spec_path, run_fuzz, spec_missing_reason

pytestmark = [pytest.mark.redis, pytest.mark.ray, pytest.mark.vllm]

EXAMPLES = 25


def _failures(result: FuzzResult) -> str:
    lines = [f"{e.suite} {e.mode} {e.operation} {e.path} -> {e.status}: {e.reason} | body: {e.request_body}"
             for e in result.examples]  # fmt: skip
    return "\n".join(lines[:12])


def _wait_until_engine_answers(stack: RunningStack, timeout_s: float = 60.0) -> None:
    """Leave the shared stack serving: a failure streak may have opened a circuit breaker."""
    body = {"model": stack.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    headers = {"Authorization": f"Bearer {stack.tenant_key}"}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if httpx.post(f"{stack.url}/v1/chat/completions", json=body, headers=headers, timeout=60).is_success:
            return
        time.sleep(1.0)


def test_fuzz_finds_no_5xx_no_schema_failure_no_non_spec_key(running_stack: RunningStack) -> None:
    reason = spec_missing_reason(default_spec_path())
    if reason is not None:
        pytest.skip(reason)
    try:
        result = run_fuzz(running_stack.url, running_stack.tenant_key, examples_per_operation=EXAMPLES,
                          seed=7, model=running_stack.model)  # fmt: skip
    finally:
        _wait_until_engine_answers(running_stack)

    assert result.v1_skipped is None and result.v2_skipped is None
    assert sum(c.server_5xx for c in result.operations) == 0, _failures(result)
    assert sum(c.no_answer for c in result.operations) == 0, _failures(result)
    assert sum(c.schema_failures for c in result.operations) == 0, _failures(result)
    assert sum(c.non_spec_keys for c in result.operations) == 0, _failures(result)
    for method, path in V1_OPERATIONS:
        for mode in result.modes:
            counts = result.counts("v1", f"{method} {path}", mode)
            assert counts.examples > 0, (method, path, mode, counts.skipped)
            if method == "POST" and mode == "positive":
                assert counts.ok_2xx > 0, f"no positive {path} case reached the engine"
    assert any(c.suite == "v2" and c.examples for c in result.operations)
