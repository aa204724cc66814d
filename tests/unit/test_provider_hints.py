"""Provider hints from the official client to a managed provider, and back. The production app
over real Redis, with a real HTTP server on loopback playing the managed provider.

Invariants:
- ``reasoning_effort``, ``verbosity``, ``prompt_cache_retention`` and ``safety_identifier`` (as
  a pseudonym) reach a managed route from /v1/chat/completions, and ``reasoning.effort``,
  ``text.verbosity`` and ``safety_identifier`` from /v1/responses; ``service_tier``,
  ``metadata`` and ``store`` never reach it (``providers/hints.py``);
- the provider's reasoning tokens reach the client (``usage.completion_tokens_details``, and the
  Response's ``output_tokens_details``), and a Response says the effort it ran with;
- a hint out of the spec's range is a 400 naming the field, and nothing is sent.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from profiles import parse_profile
from tests.support.fault_server import FaultServer
from tests.support.inprocess import InProcessGateway, make_gateway

PROFILE = """
name: provider-hints
model: {{source: "builtin:tiny", served_name: zumik-tiny}}
engine: {{device: cpu, kv_cache_memory_bytes: 1048576}}
routes:
  - {{name: managed, kind: managed, base_url: "{managed}", model: gpt-test, api_key_env: TEST_MANAGED_KEY,
     prices: {{input: "0.15", cached_input: "0.075", output: "0.60"}}, timeout_s: 5, max_retries: 0}}
  - {{name: local, kind: byoc, replica_hour_usd: "0.50", tokens_per_replica_hour: 2000000}}
routing:
  default_route: managed
  fallback_order: [managed]
"""


@dataclass
class Setup:
    managed: FaultServer
    gateway: InProcessGateway
    key: str

    def official(self) -> openai.AsyncOpenAI:
        transport = httpx.ASGITransport(app=self.gateway.app)
        return openai.AsyncOpenAI(
            api_key=self.key, base_url="http://zumik.test/v1", max_retries=0,
            http_client=httpx.AsyncClient(transport=transport, base_url="http://zumik.test"),
        )  # fmt: skip


@pytest.fixture
async def setup(
    module_redis_url: str, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Setup]:
    monkeypatch.setenv("TEST_MANAGED_KEY", "sk-managed-hints")
    with FaultServer() as managed:
        profile = parse_profile(PROFILE.format(managed=managed.base_url), source="test")
        gateway = make_gateway(module_redis_url, tiny_model_dir, profile=profile)
        yield Setup(managed, gateway, await gateway.create_tenant(f"hints-{secrets.token_hex(4)}"))


async def test_chat_hints_reach_a_managed_route_by_its_rules_and_reasoning_tokens_come_back(
    setup: Setup,
) -> None:
    async with setup.official() as client:
        answer = await client.chat.completions.create(
            model="zumik-tiny", messages=[{"role": "user", "content": "hello"}], max_completion_tokens=8,
            reasoning_effort="low", verbosity="low", prompt_cache_retention="24h",
            safety_identifier="alice@example.com", service_tier="flex", metadata={"ticket": "T-1"},
            store=True, prompt_cache_key="agent-7",
        )  # fmt: skip
    sent = setup.managed.requests[-1].body
    assert (sent["reasoning_effort"], sent["verbosity"], sent["prompt_cache_retention"]) == (
        "low",
        "low",
        "24h",
    )
    assert sent["safety_identifier"].startswith("zu-") and "alice" not in sent["safety_identifier"]
    assert not {"service_tier", "metadata", "store"} & set(sent)
    assert sent["prompt_cache_key"] not in ("agent-7", None)
    assert answer.usage is not None and answer.usage.completion_tokens == 4
    details = answer.usage.completion_tokens_details
    assert details is not None and details.reasoning_tokens == 3
    assert answer.service_tier is None  # never sent to a managed route: nothing to report


async def test_a_stream_carries_the_reasoning_tokens_in_its_usage_chunk(setup: Setup) -> None:
    async with setup.official() as client:
        stream = await client.chat.completions.create(
            model="zumik-tiny", messages=[{"role": "user", "content": "hello"}], max_completion_tokens=8,
            reasoning_effort="high", stream=True, stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = [chunk async for chunk in stream]
    assert setup.managed.requests[-1].body["reasoning_effort"] == "high"
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 3


async def test_responses_reasoning_effort_and_hints_reach_the_route_and_the_response_says_so(
    setup: Setup,
) -> None:
    async with setup.official() as client:
        response = await client.responses.create(
            model="zumik-tiny", input="hello", max_output_tokens=16, store=False,
            reasoning={"effort": "minimal"}, text={"verbosity": "high"},
            safety_identifier="alice", prompt_cache_key="agent-7",
        )  # fmt: skip
    sent = setup.managed.requests[-1].body
    assert (sent["reasoning_effort"], sent["verbosity"]) == ("minimal", "high")
    assert sent["safety_identifier"].startswith("zu-") and sent["prompt_cache_key"] != "agent-7"
    assert response.reasoning is not None and response.reasoning.effort == "minimal"
    assert response.usage is not None and response.usage.output_tokens_details.reasoning_tokens == 3


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        ("/v1/chat/completions", {"verbosity": "loud"}, "verbosity"),
        ("/v1/chat/completions", {"safety_identifier": "s" * 65}, "safety_identifier"),
        ("/v1/chat/completions", {"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ("/v1/chat/completions", {"service_tier": "gold"}, "service_tier"),
        ("/v1/chat/completions", {"prompt_cache_retention": "7d"}, "prompt_cache_retention"),
        ("/v1/chat/completions", {"store": "yes"}, "store"),
        ("/v1/chat/completions", {"prompt_cache_options": {"ttl": "24h"}}, "prompt_cache_options.ttl"),
        ("/v1/chat/completions", {"prompt_cache_options": {"keep": True}}, "prompt_cache_options.keep"),
        ("/v1/chat/completions", {"reasoning_effort": "ultra"}, "reasoning_effort"),
        ("/v1/chat/completions", {"reasoning_effort": {"level": 1}}, "reasoning_effort"),
        ("/v1/responses", {"prompt_cache_options": {"mode": "sometimes"}}, "prompt_cache_options.mode"),
        ("/v1/responses", {"reasoning": {"summary": "detailed"}}, "reasoning.summary"),
        ("/v1/responses", {"reasoning": {"effort": "extreme"}}, "reasoning.effort"),
    ],
)
async def test_a_hint_out_of_range_is_a_400_naming_it_and_nothing_is_sent(
    setup: Setup, path: str, extra: dict[str, object], param: str
) -> None:
    body: dict[str, object] = (
        {"model": "zumik-tiny", "messages": [{"role": "user", "content": "hi"}]}
        if path.endswith("completions")
        else {"model": "zumik-tiny", "input": "hi"}
    )
    async with setup.gateway.client(setup.key) as http:
        refused = await http.post(path, json={**body, **extra})
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param), error
    assert "s" * 65 not in error["message"]  # the value is never echoed
    assert setup.managed.requests == []
