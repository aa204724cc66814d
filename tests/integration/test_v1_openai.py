"""/v1 through the official openai client against the real stack.

Invariants held here:
- every success body validates against the official SDK types with no extra keys, and against
  the official OpenAPI spec where ``../shared`` is present;
- streaming at temperature 0 yields exactly the non-streaming text, with one finish_reason
  chunk, and ``include_usage`` gives one final usage chunk (choices ``[]``) and ``usage: null``
  on every other chunk;
- a repeated prompt reports ``cached_tokens > 0``, equal to ``x-zumik-reuse-captured-tokens``;
- every success carries ``x-zumik-decision-id`` and ``x-zumik-route``.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.support.openai_schema import (
    assert_matches_openai_type,
    assert_matches_spec_component,
    assert_official,
    spec_available,
)
from zumik_serve.providers.sse import sse_lines_sync

pytestmark = [pytest.mark.redis, pytest.mark.ray, pytest.mark.vllm]

LONG_PROMPT = "The agent reads the tool registry and the repository policy before acting. " * 12


def _chat(model: str, content: str, **kwargs: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **kwargs}


def test_models_list_matches_official_schema(http: httpx.Client, running_stack) -> None:
    response = http.get("/v1/models")
    assert response.status_code == 200
    body = response.json()
    assert [model["id"] for model in body["data"]] == [running_stack.model]
    for model in body["data"]:
        assert_matches_openai_type(model, Model)
    if spec_available():
        assert_matches_spec_component(body, "ListModelsResponse")


def test_models_through_sdk(client: openai.OpenAI, running_stack) -> None:
    assert [model.id for model in client.models.list()] == [running_stack.model]
    assert client.models.retrieve(running_stack.model).id == running_stack.model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_chat_completion_body_is_strictly_official(http: httpx.Client, running_stack) -> None:
    response = http.post(
        "/v1/chat/completions", json=_chat(running_stack.model, "Hello there", max_tokens=8, temperature=0)
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert_official(body, ChatCompletion, "CreateChatCompletionResponse")
    assert body["object"] == "chat.completion"
    assert body["model"] == running_stack.model
    assert body["usage"]["completion_tokens"] == 8
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["message"]["content"]
    assert response.headers["x-zumik-decision-id"].startswith("dec_")
    assert response.headers["x-zumik-route"].startswith("byoc:")


def test_completion_body_is_strictly_official(http: httpx.Client, running_stack) -> None:
    response = http.post(
        "/v1/completions",
        json={"model": running_stack.model, "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert_official(body, Completion, "CreateCompletionResponse")
    assert body["object"] == "text_completion"
    assert body["usage"]["completion_tokens"] == 6


def test_chat_logprobs_and_n_render_officially(http: httpx.Client, running_stack) -> None:
    response = http.post(
        "/v1/chat/completions",
        json=_chat(running_stack.model, "Pick a word", max_tokens=4, n=2, logprobs=True, top_logprobs=2),
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert_matches_openai_type(body, ChatCompletion)
    assert sorted(choice["index"] for choice in body["choices"]) == [0, 1]
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == 4 and len(content[0]["top_logprobs"]) == 2


def test_chat_stream_text_equals_non_stream_text(client: openai.OpenAI, running_stack) -> None:
    params = _chat(running_stack.model, "Tell me about the weather", max_tokens=24, temperature=0)
    whole = client.chat.completions.create(**params)
    chunks = list(client.chat.completions.create(**params, stream=True))
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert streamed == whole.choices[0].message.content
    finish = [
        chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason
    ]
    assert finish == [whole.choices[0].finish_reason]
    assert all(chunk.usage is None for chunk in chunks)


def test_completion_stream_text_equals_non_stream_text(client: openai.OpenAI, running_stack) -> None:
    params = {
        "model": running_stack.model,
        "prompt": "The repository policy says",
        "max_tokens": 20,
        "temperature": 0,
    }
    whole = client.completions.create(**params)
    streamed = "".join(
        chunk.choices[0].text for chunk in client.completions.create(**params, stream=True) if chunk.choices
    )
    assert streamed == whole.choices[0].text


def test_stream_include_usage_gives_one_final_usage_chunk(http: httpx.Client, running_stack) -> None:
    body = _chat(
        running_stack.model, "Count to ten", max_tokens=5, stream=True, stream_options={"include_usage": True}
    )
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-zumik-decision-id"].startswith("dec_")
        lines = [line for line in sse_lines_sync(response.iter_bytes()) if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    for chunk in chunks:
        assert_official(chunk, ChatCompletionChunk, "CreateChatCompletionStreamResponse")
        assert "usage" in chunk
    *content_chunks, usage_chunk = chunks
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 5
    assert all(chunk["usage"] is None for chunk in content_chunks)


def test_repeated_prompt_reports_cached_tokens(http: httpx.Client, running_stack) -> None:
    body = _chat(running_stack.model, LONG_PROMPT + " First question.", max_tokens=2)
    first = http.post("/v1/chat/completions", json=body)
    second = http.post("/v1/chat/completions", json=body)
    assert first.status_code == second.status_code == 200
    usage = second.json()["usage"]
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    assert 0 < cached <= usage["prompt_tokens"]
    assert second.headers["x-zumik-reuse-captured-tokens"] == str(cached)


def test_repeated_prompt_cached_tokens_through_sdk_stream(client: openai.OpenAI, running_stack) -> None:
    params = _chat(running_stack.model, LONG_PROMPT + " Streamed.", max_tokens=2)
    client.chat.completions.create(**params)
    chunks = list(
        client.chat.completions.create(**params, stream=True, stream_options={"include_usage": True})
    )
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens > 0


def test_prompt_cache_key_and_hints_are_accepted(client: openai.OpenAI, running_stack) -> None:
    """Provider hints have no effect on a self-hosted engine and never reach it;
    ``reasoning_effort`` is vLLM's own field (its chat template's argument) and does."""
    response = client.chat.completions.create(
        **_chat(running_stack.model, "hi", max_tokens=2),
        prompt_cache_key="agent-7",
        user="u1",
        metadata={"a": "b"},
        verbosity="low",
        safety_identifier="u1-hash",
        service_tier="flex",
        store=True,
        reasoning_effort="low",
    )
    assert response.usage is not None and response.usage.completion_tokens == 2
    assert response.service_tier is None  # the engine names no tier
