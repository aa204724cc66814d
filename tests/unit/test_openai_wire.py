"""The /v1 wire layer: spec fields in, official objects out, vLLM extensions never through."""

from __future__ import annotations

import json

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.support.openai_schema import assert_matches_openai_type
from zumik_serve.api.v1.wire import (
    MAX_JSON_DEPTH,
    StreamRenderer,
    parse_json_body,
    prepare_request,
    render_chat_completion,
    render_completion,
)
from zumik_serve.engines.protocol import EngineCall
from zumik_serve.errors import EngineError, InvalidRequestError, ModelNotFoundError

MODELS = {"tiny"}

# A vLLM chat response as vLLM 0.32 dumps it, with its extension fields.
VLLM_CHAT = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "tiny",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "hi",
                "refusal": None,
                "annotations": None,
                "audio": None,
                "function_call": None,
                "tool_calls": [],
                "reasoning": None,
            },
            "logprobs": None,
            "finish_reason": "length",
            "stop_reason": None,
            "token_ids": None,
            "routed_experts": None,
        }
    ],
    "service_tier": None,
    "system_fingerprint": "vllm-0.32.0",
    "usage": {
        "prompt_tokens": 5,
        "total_tokens": 7,
        "completion_tokens": 2,
        "prompt_tokens_details": {"cached_tokens": 3, "cached_tokens_by_tier": {}},
        "completion_tokens_details": None,
    },
    "prompt_logprobs": None,
    "prompt_token_ids": [1, 2],
    "prompt_text": None,
    "kv_transfer_params": {"x": 1},
    "ec_transfer_params": None,
    "metrics": None,
}


def test_chat_render_drops_every_engine_extension() -> None:
    rendered = render_chat_completion(VLLM_CHAT, "tiny")
    assert_matches_openai_type(rendered, ChatCompletion)
    assert "prompt_token_ids" not in json.dumps(rendered)
    assert rendered["usage"]["prompt_tokens_details"] == {"cached_tokens": 3}


def test_completion_render_is_official() -> None:
    body = {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "tiny",
        "choices": [
            {
                "index": 0,
                "text": "x",
                "logprobs": None,
                "finish_reason": "stop",
                "stop_reason": None,
                "prompt_logprobs": None,
                "token_ids": [4],
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        "kv_transfer_params": None,
    }
    assert_matches_openai_type(render_completion(body, "tiny"), Completion)


def test_abnormal_finish_reason_is_an_error_not_a_made_up_stop() -> None:
    aborted = json.loads(json.dumps(VLLM_CHAT))
    aborted["choices"][0]["finish_reason"] = "abort"
    with pytest.raises(EngineError):
        render_chat_completion(aborted, "tiny")


def test_stream_renderer_usage_semantics() -> None:
    renderer = StreamRenderer(EngineCall.CHAT, "tiny", include_usage=True)
    chunk = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "tiny",
        "choices": [
            {
                "index": 0,
                "delta": {"content": "a", "reasoning": None},
                "logprobs": None,
                "finish_reason": None,
                "token_ids": None,
            }
        ],
        "prompt_token_ids": None,
    }
    rendered = renderer.render(chunk)
    assert rendered is not None and rendered["usage"] is None
    assert_matches_openai_type(rendered, ChatCompletionChunk)
    usage_chunk = renderer.render(
        {**chunk, "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
    )
    assert (
        usage_chunk is not None and usage_chunk["choices"] == [] and usage_chunk["usage"]["total_tokens"] == 2
    )
    without = StreamRenderer(EngineCall.CHAT, "tiny", include_usage=False)
    assert without.render({**chunk, "choices": [], "usage": {"prompt_tokens": 1}}) is None
    assert "usage" not in (without.render(chunk) or {})


def test_prepare_request_rules() -> None:
    ok = prepare_request(
        EngineCall.CHAT,
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": "x"}],
            "prompt_cache_key": "k",
            "cache_salt": "evil",
        },
        MODELS,
    )
    assert "prompt_cache_key" not in ok.engine_body and "cache_salt" not in ok.engine_body
    with pytest.raises(ModelNotFoundError):
        prepare_request(EngineCall.CHAT, {"model": "gpt-4", "messages": [{"role": "user"}]}, MODELS)
    with pytest.raises(InvalidRequestError, match="Unrecognized") as info:
        prepare_request(EngineCall.CHAT, {"model": "tiny", "messages": [{}], "top_k": 3}, MODELS)
    assert info.value.param == "top_k"
    with pytest.raises(InvalidRequestError, match="only allowed when 'stream' is true"):
        prepare_request(EngineCall.CHAT, {"model": "tiny", "messages": [{}], "stream_options": {}}, MODELS)


def test_hints_stay_off_the_engine_body_and_reasoning_effort_goes_to_the_engine() -> None:
    """vLLM implements ``reasoning_effort`` (its chat template's argument), so it is an engine
    field; the provider hints never reach an engine. The legacy completions endpoint has no
    hints: only the client's ``prompt_cache_key`` is kept there."""
    hints = {"verbosity": "low", "service_tier": "flex", "metadata": {"a": "b"}, "store": True,
             "safety_identifier": "u", "prompt_cache_retention": "24h", "prompt_cache_key": "k"}  # fmt: skip
    chat = prepare_request(
        EngineCall.CHAT,
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "reasoning_effort": "low", **hints},
        MODELS,
    )
    assert chat.engine_body["reasoning_effort"] == "low" and not set(hints) & set(chat.engine_body)
    assert (chat.hints.verbosity, chat.hints.service_tier, chat.hints.store) == ("low", "flex", True)
    legacy = prepare_request(EngineCall.COMPLETION, {"model": "tiny", "prompt": "x", **hints}, MODELS)
    assert not set(hints) & set(legacy.engine_body)
    assert (
        legacy.hints.prompt_cache_key == "k"
        and legacy.hints.for_route(managed=False, retention_days=30) == {}
    )


def test_a_providers_tier_and_reasoning_tokens_are_rendered_and_nothing_else() -> None:
    body = json.loads(json.dumps(VLLM_CHAT))
    body["service_tier"] = "flex"
    body["usage"]["completion_tokens_details"] = {
        "reasoning_tokens": 3, "audio_tokens": 0, "secret_extension": 7, "text_tokens": True,
    }  # fmt: skip
    rendered = render_chat_completion(body, "tiny")
    assert_matches_openai_type(rendered, ChatCompletion)
    assert rendered["service_tier"] == "flex"
    assert rendered["usage"]["completion_tokens_details"] == {"reasoning_tokens": 3, "audio_tokens": 0}
    for odd in ("made-up", ["flex"], {"tier": "flex"}):
        body["service_tier"] = odd
        assert "service_tier" not in render_chat_completion(body, "tiny")
    chunk = {"id": "c", "created": 1, "service_tier": "priority", "choices": [],
             "usage": {"prompt_tokens": 3, "completion_tokens": 4,
                       "completion_tokens_details": {"reasoning_tokens": 3}}}  # fmt: skip
    streamed = StreamRenderer(EngineCall.CHAT, "tiny", include_usage=True).render(chunk)
    assert streamed is not None and streamed["service_tier"] == "priority"
    assert streamed["usage"]["completion_tokens_details"] == {"reasoning_tokens": 3}


def test_stream_options_pass_only_include_usage() -> None:
    prepared = prepare_request(
        EngineCall.COMPLETION,
        {
            "model": "tiny",
            "prompt": "x",
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        },
        MODELS,
    )
    assert prepared.engine_body["stream_options"] == {"include_usage": True}
    assert prepared.include_usage


@pytest.mark.parametrize("options", [None, {}, {"include_usage": False}])
def test_a_stream_always_asks_the_engine_for_its_usage_and_shows_it_only_when_asked(
    options: dict[str, bool] | None,
) -> None:
    """The engine's usage settles the tenant's rate on the tokens used and counts the cached
    ones, so every stream asks for it; a client that did not ask never sees it."""
    body = {"model": "tiny", "prompt": "x", "stream": True}
    if options is not None:
        body["stream_options"] = options
    prepared = prepare_request(EngineCall.COMPLETION, body, MODELS)
    assert prepared.engine_body["stream_options"] == {"include_usage": True}
    assert not prepared.include_usage
    renderer = StreamRenderer(EngineCall.COMPLETION, "tiny", prepared.include_usage)
    usage_chunk = {
        "id": "c",
        "created": 1,
        "choices": [],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1},
    }
    assert renderer.render(usage_chunk) is None
    whole = prepare_request(EngineCall.COMPLETION, {"model": "tiny", "prompt": "x"}, MODELS)
    assert "stream_options" not in whole.engine_body  # a whole answer carries its usage anyway


@pytest.mark.parametrize("raw", [b"", b"   ", b"{", b"[1]", b"\xff\xfe", b'"text"'])
def test_parse_json_body_rejects_non_objects(raw: bytes) -> None:
    with pytest.raises(InvalidRequestError):
        parse_json_body(raw)


def test_parse_json_body_rejects_deep_nesting_without_recursion_error() -> None:
    deep = b'{"a":' * (MAX_JSON_DEPTH + 5) + b"1" + b"}" * (MAX_JSON_DEPTH + 5)
    with pytest.raises(InvalidRequestError, match="nested deeper"):
        parse_json_body(deep)
    very_deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(InvalidRequestError):
        parse_json_body(b'{"a":' + very_deep + b"}")


def test_stream_error_types_are_openai_types() -> None:
    from zumik_serve.api.v1.wire import render_stream_error

    server = render_stream_error({"message": "EngineCore died", "type": "InternalServerError", "code": 500})
    assert server["error"]["type"] == "server_error" and "Retry" in server["error"]["message"]
    assert server["error"]["code"] == "engine_error"
    client = render_stream_error({"message": "bad", "type": "BadRequestError", "code": 400, "param": "x"})
    assert client["error"] == {"message": "bad", "type": "invalid_request_error", "param": "x", "code": None}
