"""The provider adapter against a real OpenAI-compatible server: vLLM's own, with the tiny model.

Invariants held here: a chat completion through ``OpenAICompatProvider`` is a valid
``chat.completion`` with usage (and vLLM's cached-token count read as an int); a streamed
completion yields chunks, a usage chunk, then ``[DONE]``; a body routed through the fault server
in proxy mode reaches vLLM and its answer comes back unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.fault_server import FaultServer
from tests.support.vllm_provider import VllmProvider, home_for_tests
from zumik_serve.providers.openai_http import OpenAICompatProvider, prompt_cache_key_for

pytestmark = pytest.mark.vllm

API_KEY = "sk-managed-test-key-0123456789"


@pytest.fixture(scope="module")
def vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmProvider]:
    home = home_for_tests(Path(tmp_path_factory.mktemp("zumik-home")))
    with VllmProvider(home, api_key=API_KEY) as running:
        print(f"vllm serve ready in {running.startup_s:.1f} s")
        yield running


async def test_chat_completion_through_provider(vllm: VllmProvider) -> None:
    provider = OpenAICompatProvider("managed", vllm.base_url, timeout_s=120)
    body = {
        "model": vllm.model,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 8,
        "temperature": 0,
    }
    try:
        reply = await provider.complete("/chat/completions", body, api_key=API_KEY)
    finally:
        await provider.aclose()
    assert reply.status == 200 and reply.body["object"] == "chat.completion"
    choice = reply.body["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    usage = reply.body["usage"]
    assert usage["completion_tokens"] == 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert isinstance(reply.cached_tokens, int)  # vLLM reports it (enable_prompt_tokens_details)


async def test_streamed_completion_through_fault_server_proxy(vllm: VllmProvider) -> None:
    with FaultServer(upstream=vllm.base_url) as proxy:
        provider = OpenAICompatProvider("managed", proxy.base_url, timeout_s=120)
        body = {
            "model": vllm.model,
            "prompt": "Once upon a time",
            "max_tokens": 6,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "prompt_cache_key": prompt_cache_key_for("ten_a", "snp_digest"),
        }
        try:
            payloads = [p async for p in provider.stream("/completions", body, api_key=API_KEY)]
        finally:
            await provider.aclose()
        (seen,) = proxy.requests
    assert seen.handled_as == "proxy" and seen.body == body
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(chunk["object"] == "text_completion" for chunk in chunks)
    text = "".join(choice["text"] for chunk in chunks for choice in chunk["choices"])
    assert text
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens"] == 6 and usage["prompt_tokens"] > 0
