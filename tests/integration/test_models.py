"""Several models and a LoRA adapter behind one endpoint (profile ``local-cpu-multi``): the
tiny model with the tiny LoRA adapter on its engine, and a second tiny model on an engine group
of its own, deployed beside the main app in the same Ray cluster under /multi, called with the
official SDK.

Invariants: /v1/models lists every model and adapter; ``model`` picks the engine group (and the
adapter); an adapter really changes the output and never shares the base model's cached prefix;
an unknown model is the OpenAI 404; /v2 tokenizes with the picked model's tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.support.beside import deployed_beside

pytestmark = [pytest.mark.redis, pytest.mark.ray, pytest.mark.vllm]

APP = "zumik-multi"
PREFIX = "/multi"
BASE, ADAPTER, OTHER = "zumik-tiny", "zumik-tiny-lora", "zumik-tiny-b"
PROMPT = " ".join(f"word{index}" for index in range(60))  # two full KV blocks and more


@pytest.fixture(scope="module")
def multi(running_stack) -> Iterator[openai.OpenAI]:
    with deployed_beside(running_stack, "local-cpu-multi", app=APP, prefix=PREFIX):
        yield openai.OpenAI(
            base_url=f"{running_stack.url}{PREFIX}/v1",
            api_key=running_stack.tenant_key,
            max_retries=0,
            timeout=120,
        )


def _greedy(client: openai.OpenAI, model: str, prompt: str = PROMPT) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=8, temperature=0
    )


def test_every_model_and_adapter_is_listed_and_served(multi: openai.OpenAI) -> None:
    assert [model.id for model in multi.models.list()] == [BASE, ADAPTER, OTHER]
    for name in (BASE, ADAPTER, OTHER):
        answer = _greedy(multi, name, "hello there")
        assert answer.model == name and answer.usage is not None and answer.usage.completion_tokens >= 1
    with pytest.raises(openai.NotFoundError) as missing:
        _greedy(multi, "zumik-nope")
    assert missing.value.body["param"] == "model"  # type: ignore[index]


def test_the_adapter_changes_the_output_and_keeps_its_own_prefix_cache(multi: openai.OpenAI) -> None:
    base_first, base_again = _greedy(multi, BASE), _greedy(multi, BASE)
    assert base_again.usage.prompt_tokens_details.cached_tokens > 0  # type: ignore[union-attr]
    adapter = _greedy(multi, ADAPTER)
    # vLLM keys an adapter's blocks apart from the base model's: the base's cached prefix is a miss.
    assert adapter.usage.prompt_tokens_details.cached_tokens == 0  # type: ignore[union-attr]
    assert adapter.choices[0].message.content != base_first.choices[0].message.content
    assert _greedy(multi, ADAPTER).choices[0].message.content == adapter.choices[0].message.content
    other = _greedy(multi, OTHER)
    assert other.choices[0].message.content != base_first.choices[0].message.content


def test_v2_generate_uses_the_picked_models_engine_group(running_stack, multi: openai.OpenAI) -> None:
    headers = {"Authorization": f"Bearer {running_stack.tenant_key}"}
    with httpx.Client(base_url=f"{running_stack.url}{PREFIX}", headers=headers, timeout=120) as http:
        for name in (OTHER, ADAPTER):
            response = http.post("/v2/generate", json={"model": name, "input": "hello", "max_tokens": 4})
            assert response.status_code == 200, response.text
            assert response.json()["model"] == name
