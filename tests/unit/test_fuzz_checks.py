"""The fuzz checks of ``zumik bench fuzz``, as pure functions over (schema, instance).

Invariants held here:
- ``non_spec_keys`` finds every key no applicable schema declares, at any depth, and nothing
  else: ``allOf`` declares the union of its parts, ``anyOf``/``oneOf`` the branches the value
  matches, ``additionalProperties`` opens an object (a schema there checks the values), and an
  object schema declaring nothing is free-form.
- What ``api/v1/wire.py`` renders from a vLLM body has no non-spec key; the vLLM body itself has.
- ``error_body_problems`` accepts ``render_error``'s object and rejects a missing key, a
  non-string ``code`` and a body without ``error``.
- The spec Zumik is fuzzed against has exactly the four implemented operations, each 4xx an
  ``ErrorResponse``; the spec's ``Error`` requires all four keys, ``code`` string or null.

With the official spec present (``../shared`` or ``$ZUMIK_OPENAI_SPEC``) the response schemas
are the spec's own; without it, small inline schemas of the same shape.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from zumik_serve.api.v1.wire import render_chat_completion, render_error
from zumik_serve.bench.fuzz import (
    ERROR_STATUSES,
    INLINE_ERROR_RESPONSE,
    MAX_TOKENS_CAP,
    N_CAP,
    SPEC_ENV,
    V1_OPERATIONS,
    SchemaContext,
    _steer_positive,
    default_spec_path,
    error_body_problems,
    load_spec,
    non_spec_keys,
    spec_missing_reason,
    zumik_v1_spec,
)

SPEC_PATH = default_spec_path()
SPEC_PRESENT = spec_missing_reason(SPEC_PATH) is None
needs_spec = pytest.mark.skipif(not SPEC_PRESENT, reason=str(spec_missing_reason(SPEC_PATH)))

# The shape of the spec's CreateChatCompletionResponse, for when the spec is absent.
INLINE_CHAT_RESPONSE: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "object": {"type": "string"},
        "created": {"type": "integer"},
        "model": {"type": "string"},
        "system_fingerprint": {"type": "string"},
        "choices": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "index": {"type": "integer"},
                    "finish_reason": {"type": "string"},
                    "logprobs": {"anyOf": [{"type": "object"}, {"type": "null"}]},
                    "message": {
                        "type": "object",
                        "properties": {
                            "role": {"type": "string"},
                            "content": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                            "refusal": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                        },
                    },
                },
            },
        },
        "usage": {
            "type": "object",
            "properties": {
                "prompt_tokens": {"type": "integer"},
                "completion_tokens": {"type": "integer"},
                "total_tokens": {"type": "integer"},
                "prompt_tokens_details": {
                    "type": "object",
                    "properties": {"cached_tokens": {"type": "integer"}},
                },
            },
        },
    },
}

# A vLLM 0.32 chat response with its extension fields.
VLLM_CHAT: dict[str, Any] = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "tiny",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "hi", "refusal": None, "reasoning": None},
            "logprobs": None,
            "finish_reason": "length",
            "stop_reason": None,
            "token_ids": None,
        }
    ],
    "system_fingerprint": "vllm-0.32.0",
    "usage": {
        "prompt_tokens": 5,
        "total_tokens": 7,
        "completion_tokens": 2,
        "prompt_tokens_details": {"cached_tokens": 3, "cached_tokens_by_tier": {}},
    },
    "prompt_token_ids": [1, 2],
    "kv_transfer_params": {"x": 1},
}


def make_schemas() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(root, chat response schema, ErrorResponse schema): the spec's, else inline ones."""
    if SPEC_PRESENT:
        spec = load_spec(SPEC_PATH)
        return (
            spec,
            {"$ref": "#/components/schemas/CreateChatCompletionResponse"},
            {"$ref": "#/components/schemas/ErrorResponse"},
        )
    return INLINE_CHAT_RESPONSE, INLINE_CHAT_RESPONSE, INLINE_ERROR_RESPONSE


# --- non-spec keys --------------------------------------------------------------------------


def test_rendered_chat_completion_has_no_non_spec_key() -> None:
    root, chat, _ = make_schemas()
    rendered = render_chat_completion(VLLM_CHAT, "tiny")
    assert non_spec_keys(chat, rendered, root) == []
    assert SchemaContext(root).problems(chat, rendered) == []


def test_engine_fields_are_non_spec_keys_at_every_depth() -> None:
    root, chat, _ = make_schemas()
    found = non_spec_keys(chat, VLLM_CHAT, root)
    assert set(found) == {
        "$.prompt_token_ids",
        "$.kv_transfer_params",
        "$.choices[0].stop_reason",
        "$.choices[0].token_ids",
        "$.choices[0].message.reasoning",
        "$.usage.prompt_tokens_details.cached_tokens_by_tier",
    }


def test_all_of_declares_the_union_of_its_parts() -> None:
    schema = {"allOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}]}
    assert non_spec_keys(schema, {"a": 1, "b": 2}) == []
    assert non_spec_keys(schema, {"a": 1, "c": 3}) == ["$.c"]


def test_any_of_declares_only_the_branches_the_value_matches() -> None:
    schema = {
        "anyOf": [
            {"type": "object", "required": ["text"], "properties": {"type": {"const": "text"}, "text": {}}},
            {"type": "object", "required": ["url"], "properties": {"type": {"const": "image"}, "url": {}}},
        ]
    }
    assert non_spec_keys(schema, {"type": "text", "text": "x"}) == []
    # "url" is declared by the image branch only, which this value does not match.
    assert non_spec_keys(schema, {"type": "text", "text": "x", "url": "u"}) == ["$.url"]


def test_references_resolve_against_the_root() -> None:
    root = {
        "components": {
            "schemas": {"Item": {"type": "object", "properties": {"id": {}, "sub": {"$ref": "#/x"}}}}
        },
        "x": {"type": "object", "properties": {"ok": {}}},
    }
    schema = {"type": "array", "items": {"$ref": "#/components/schemas/Item"}}
    instance = [{"id": 1, "sub": {"ok": 1}}, {"id": 2, "sub": {"ok": 2, "leak": 3}}]
    assert non_spec_keys(schema, instance, root) == ["$[1].sub.leak"]


def test_additional_properties_opens_an_object_and_checks_its_values() -> None:
    schema = {
        "type": "object",
        "properties": {
            "bias": {"type": "object", "additionalProperties": {"type": "integer"}},
            "meta": {"type": "object", "additionalProperties": {"type": "object", "properties": {"v": {}}}},
            "free": {"type": "object", "additionalProperties": True, "properties": {"a": {}}},
        },
    }
    assert non_spec_keys(schema, {"bias": {"50256": -100}, "free": {"a": 1, "z": 2}}) == []
    assert non_spec_keys(schema, {"meta": {"k": {"v": 1, "w": 2}}}) == ["$.meta.k.w"]


def test_an_object_schema_declaring_nothing_is_free_form() -> None:
    schema = {"type": "object", "properties": {"parameters": {"type": "object"}}}
    assert non_spec_keys(schema, {"parameters": {"anything": {"goes": 1}}}) == []


def test_a_closed_object_without_properties_flags_every_key() -> None:
    assert non_spec_keys({"type": "object", "additionalProperties": False}, {"a": 1}) == ["$.a"]


def test_odd_keys_are_quoted_in_paths() -> None:
    assert non_spec_keys({"properties": {"a": {}}}, {"a": 1, "x-y": 2}) == ['$["x-y"]']


# --- ErrorResponse --------------------------------------------------------------------------


def test_render_error_is_an_error_response() -> None:
    root, _, error = make_schemas()
    for code in (None, "model_not_found"):
        body = render_error("no such model", "invalid_request_error", "model", code)
        assert error_body_problems(body, error, root) == []
        assert non_spec_keys(error, body, root) == []
    assert error_body_problems(render_error("m", "t", None, None)) == []


def test_error_response_rejects_missing_keys_and_odd_codes() -> None:
    root, _, error = make_schemas()
    missing = {"error": {"message": "m", "type": "t", "param": None}}
    assert "'error' lacks 'code'" in error_body_problems(missing, error, root)
    numeric = {"error": {"message": "m", "type": "t", "param": None, "code": 400}}
    assert "'code' is a int, not a string or null" in error_body_problems(numeric, error, root)
    assert error_body_problems({"detail": "Not Found"}, error, root) == ["the body has no 'error' object"]
    assert error_body_problems([1], error, root) == ["the body has no 'error' object"]


def test_extra_keys_in_an_error_are_non_spec_keys() -> None:
    root, _, error = make_schemas()
    body = {"error": {"message": "m", "type": "t", "param": None, "code": None, "status": 400}}
    assert error_body_problems(body, error, root) == []
    assert non_spec_keys(error, body, root) == ["$.error.status"]


@needs_spec
def test_spec_error_requires_four_keys_and_a_string_or_null_code() -> None:
    spec = load_spec(SPEC_PATH)
    error = spec["components"]["schemas"]["Error"]
    assert sorted(error["required"]) == ["code", "message", "param", "type"]
    context = SchemaContext(spec)
    assert context.is_valid(error["properties"]["code"], None)
    assert context.is_valid(error["properties"]["code"], "x")
    assert not context.is_valid(error["properties"]["code"], 1)


# --- the spec Zumik is fuzzed against -------------------------------------------------------


@needs_spec
def test_v1_spec_has_the_implemented_operations_each_4xx_an_error_response() -> None:
    spec = zumik_v1_spec(load_spec(SPEC_PATH), "http://127.0.0.1:1/")
    assert spec["servers"] == [{"url": "http://127.0.0.1:1/v1"}]
    operations = {(method.upper(), path) for path, methods in spec["paths"].items() for method in methods}
    assert operations == set(V1_OPERATIONS)
    for path, methods in spec["paths"].items():
        for operation in methods.values():
            for status in ERROR_STATUSES:
                schema = operation["responses"][status]["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (path, status)


def test_spec_path_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(SPEC_ENV, str(tmp_path / "openapi.yaml"))
    assert default_spec_path() == tmp_path / "openapi.yaml"
    reason = spec_missing_reason(default_spec_path())
    assert reason is not None and SPEC_ENV in reason and str(tmp_path) in reason


# --- steering positive cases ----------------------------------------------------------------


def make_case(method: str, path: str, body: Any) -> SimpleNamespace:
    """The fields of a schemathesis Case that steering reads and writes."""
    return SimpleNamespace(
        operation=SimpleNamespace(method=method, path=path), body=body, path_parameters={"model": "x"}
    )


def test_steered_cases_reach_the_engine_within_the_caps() -> None:
    declared = {
        "POST /chat/completions": frozenset(
            {"model", "messages", "n", "max_tokens", "audio", "stream_options"}
        )
    }
    body = {"messages": [], "n": 100, "max_tokens": 10**9, "audio": {}, "random": 1, "stream_options": {}}
    refused = {"POST /chat/completions": frozenset({"audio"}), "POST /responses": frozenset({"messages"})}
    case = _steer_positive(make_case("POST", "/chat/completions", body), 0, "tiny", declared, refused)
    assert case.body == {"model": "tiny", "messages": [], "n": N_CAP, "max_tokens": MAX_TOKENS_CAP}


def test_steered_responses_cases_get_an_input_and_the_least_output() -> None:
    declared = {
        "POST /responses": frozenset(
            {"model", "input", "prompt", "max_output_tokens", "previous_response_id"}
        )
    }
    body = {"prompt": {"id": "pmpt_1"}, "max_output_tokens": 5000, "previous_response_id": "resp_x"}
    refused = {"POST /responses": frozenset({"prompt"}), "POST /completions": frozenset()}
    case = _steer_positive(make_case("POST", "/responses", body), 0, "tiny", declared, refused)
    assert case.body == {"model": "tiny", "input": "Hello", "max_output_tokens": 16}


def test_unsteered_cases_are_only_capped() -> None:
    body = {"model": "m", "max_completion_tokens": 99, "random": 1}
    case = _steer_positive(make_case("POST", "/chat/completions", body), 3, "tiny", {}, {})
    assert case.body == {"model": "m", "max_completion_tokens": MAX_TOKENS_CAP, "random": 1}
    model_case = _steer_positive(make_case("GET", "/models/{model}", None), 0, "tiny", {}, {})
    assert model_case.path_parameters == {"model": "tiny"}


def test_rows_below_the_asked_examples_are_reported_short() -> None:
    from zumik_serve.bench.fuzz import FuzzResult, OperationCounts

    result = FuzzResult("http://x", 0, 1000, ("positive", "negative"), "spec.yaml")
    result.operations = [
        OperationCounts("v1", "POST /chat/completions", "positive", examples=1000),
        OperationCounts("v1", "POST /completions", "negative", examples=999),
        OperationCounts("v1", "GET /models", "negative", skipped="no negative input"),
        OperationCounts("v2", "GET /v2/artifacts/{id}", "positive", examples=3),
    ]
    assert [(c.operation, c.mode) for c in result.short_v1_rows()] == [("POST /completions", "negative")]
    assert result.to_json()["short_v1_rows"] == ["POST /completions negative: 999"]
