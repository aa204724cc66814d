"""`zumik tenant create` against the running stack's Redis: the printed key works at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest

pytestmark = [pytest.mark.redis, pytest.mark.ray, pytest.mark.vllm]


def _zumik(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zumik_serve.cli", *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_tenant_create_prints_a_working_key(running_stack) -> None:
    env = {
        **os.environ,
        "ZUMIK_REDIS_URL": running_stack.redis_url,
        "ZUMIK_HOME": str(running_stack.home.root),
    }
    result = _zumik("tenant", "create", "beta-team", "--json", env=env)
    assert result.returncode == 0, result.stderr
    created = json.loads(result.stdout)
    assert created["api_key"].startswith("zk-") and created["tenant"] == "beta-team"
    response = httpx.get(
        f"{running_stack.url}/v1/models", headers={"Authorization": f"Bearer {created['api_key']}"}
    )
    assert response.status_code == 200

    again = _zumik("tenant", "create", "beta-team", env=env)
    assert again.returncode == 1 and "already exists" in again.stderr
    assert created["api_key"] not in again.stderr + again.stdout
