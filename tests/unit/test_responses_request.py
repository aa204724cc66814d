"""The Responses translation layer, requests in (``zumik_serve/responses``): a
``POST /v1/responses`` body parsed, and translated into a chat-completions body.

Invariants held here:

- a bad body is a 400 ``invalid_request_error`` naming the value to fix and never echoing it;
  every unsupported spec field is refused with its table's reason unless it asks for nothing;
- the bodies tested are valid for the official spec, and the chat body is one Zumik's own
  /v1/chat/completions check accepts unchanged;
- an earlier response's output sent back as input gives the same chat messages as the stored
  chain (``input_history`` + ``output_history``), and instructions never enter the history.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.openai_schema import (
    assert_matches_spec_component,
)
from tests.support.responses_cases import (
    COMPLETED_AT,
    FULL_BODY,
    PARIS_CALL,
    QUESTION,
    TIME_CALL,
    UNSUPPORTED_EXAMPLES,
    WEATHER_TOOL,
    chat_answer,
    counting_ids,
    make_head,
    make_request,
    refused,
)
from zumik_serve.api.v1.wire import HINT_FIELDS, prepare_request
from zumik_serve.engines.protocol import EngineCall
from zumik_serve.errors import InvalidRequestError
from zumik_serve.responses.wire import (
    UNSUPPORTED_FIELDS,
    chat_body,
    chat_messages,
    input_history,
    output_history,
    parse_request,
    render_response,
)

# --- parsing --------------------------------------------------------------------------------


def test_a_string_input_takes_the_spec_defaults() -> None:
    request = make_request()
    assert (request.store, request.stream, request.parallel_tool_calls) == (True, False, True)
    assert (request.tools, request.tool_choice, request.text, request.metadata) == ((), "auto", None, None)
    assert [item.model_dump(exclude_none=True) for item in request.input_items()] == [
        {"type": "message", "role": "user", "content": QUESTION}
    ]


def test_null_takes_the_spec_default() -> None:
    request = make_request(store=None, stream=None, parallel_tool_calls=None, tool_choice=None, tools=None)
    assert (request.store, request.stream, request.parallel_tool_calls, request.tool_choice) == (
        True,
        False,
        True,
        "auto",
    )


def test_a_full_body_parses_into_its_values() -> None:
    request = parse_request(FULL_BODY)
    assert request.tool_choice.model_dump() == {"type": "function", "name": "get_weather"}  # type: ignore[union-attr]
    assert [tool.name for tool in request.tools] == ["get_weather", "get_time"]
    assert (request.temperature, request.top_p, request.max_output_tokens) == (0.2, 0.9, 256)
    assert [type(item).__name__ for item in request.input_items()] == [
        "MessageItem",
        "MessageItem",
        "MessageItem",
        "FunctionCallItem",
        "FunctionCallOutputItem",
    ]
    assert request.background is None and request.truncation is None
    assert request.reasoning is not None and request.reasoning.effort == "low"


def test_the_bodies_tested_here_are_valid_for_the_spec(spec: None) -> None:
    # A user message with content parts fits both EasyInputMessage and InputMessage, and JSON
    # Schema ignores the spec's discriminator, so the spec's oneOf rejects it: check it alone.
    (parts_message,) = [item for item in FULL_BODY["input"] if item.get("role") == "user"]
    assert_matches_spec_component(parts_message, "EasyInputMessage")
    assert_matches_spec_component(parts_message, "InputMessage")
    unambiguous = [item for item in FULL_BODY["input"] if item is not parts_message]
    assert_matches_spec_component({**FULL_BODY, "input": unambiguous}, "CreateResponse")
    for field, (value, _) in UNSUPPORTED_EXAMPLES.items():
        assert_matches_spec_component({"model": "tiny", "input": "x", field: value}, "CreateResponse")


def test_every_unsupported_field_has_an_example_here() -> None:
    assert set(UNSUPPORTED_EXAMPLES) == set(UNSUPPORTED_FIELDS)


@pytest.mark.parametrize("field", sorted(UNSUPPORTED_EXAMPLES))
def test_an_unsupported_field_is_a_400_naming_it(field: str) -> None:
    value, param = UNSUPPORTED_EXAMPLES[field]
    error = refused({"model": "tiny", "input": "x", field: value})
    assert (error.param, error.message) == (param, UNSUPPORTED_FIELDS[field].reason)
    assert "not supported" in error.message


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"tools": [WEATHER_TOOL, {"type": "web_search"}]}, "tools.1.type",
         "'web_search' tools are not supported"),
        ({"tools": [{"type": "robot"}]}, "tools.0.type", "must be one of: function"),
        ({"tools": [{**WEATHER_TOOL, "output_schema": {"type": "object"}}]}, "tools.0.output_schema",
         "output schemas are not supported"),
        ({"tool_choice": {"type": "mcp", "server_label": "x"}}, "tool_choice.type", "'mcp' is not supported"),
        ({"tool_choice": "required"}, "tool_choice", "needs at least one tool"),
        ({"tool_choice": {"type": "function", "name": "nope"}, "tools": [WEATHER_TOOL]}, "tool_choice.name",
         "not in 'tools'"),
        ({"tool_choice": "sometimes"}, "tool_choice", "must be 'none', 'auto', 'required'"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]},
         "input.0.content.0.type", "'input_image' content is not supported"),
        ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file-1"}]}]},
         "input.0.content.0.type", "'input_file' content is not supported"),
        ({"input": [{"role": "user", "content": [{"type": "output_text", "text": "x"}]}]},
         "input.0.content.0.type", "user messages take 'input_text' content only"),
        ({"input": [{"role": "assistant", "content": [{"type": "input_text", "text": "x"}]}]},
         "input.0.content.0.type", "assistant messages take 'output_text' and 'refusal'"),
        ({"input": [{"role": "user", "content": "x"}, {"type": "reasoning", "summary": []}]}, "input.1.type",
         "'reasoning' input items are not supported"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.0.type",
         "'item_reference' input items"),
        ({"input": [{"type": "function_call", "call_id": "c", "name": "f"}]}, "input.0.arguments",
         "'input.0.arguments' is required"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": "1", "extra": 1}]},
         "input.0.extra", "unknown field 'input.0.extra'"),
        ({"input": [{"role": "wizard", "content": "x"}]}, "input.0.role", "must be one of: user, assistant"),
        ({"input": 42}, "input", "must be a string or an array of input items"),
        ({"input": ["x"]}, "input.0", "must be an object"),
        ({"model": ""}, "model", "'model' is required"),
        ({"max_output_tokens": 15}, "max_output_tokens", "greater than or equal to 16"),
        ({"temperature": 2.5}, "temperature", "less than or equal to 2"),
        ({"temperature": "0.5"}, "temperature", "valid number"),
        ({"stream": "yes"}, "stream", "valid boolean"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", "at most 16 pairs"),
        ({"metadata": {"k" * 65: "v"}}, "metadata", "keys are at most 64 characters"),
        ({"metadata": {"k": "v" * 513}}, "metadata", "values are at most 512 characters"),
        ({"safety_identifier": "s" * 65}, "safety_identifier", "at most 64 characters"),
        ({"text": {"format": {"type": "json_schema", "name": "has space", "schema": {}}}}, "text.format.name",
         "should match pattern"),
        ({"text": {"format": {"type": "json_schema", "name": "w"}}}, "text.format.schema",
         "'text.format.schema' is required"),
        ({"text": {"format": {"type": "grammar"}}}, "text.format.type", "must be one of: text, json_object"),
    ],
)  # fmt: skip
def test_a_bad_body_is_a_400_naming_the_value_to_fix(body: dict[str, Any], param: str, words: str) -> None:
    error = refused({"model": "tiny", "input": "x", **body})
    assert error.param == param
    assert words in error.message


def test_an_unknown_field_is_named_before_any_other_problem() -> None:
    error = refused({"model": "tiny", "input": 42, "background": True, "top_k": 3})
    assert error.param == "top_k" and error.message.startswith("unknown field 'top_k'")


def test_an_error_never_echoes_what_was_sent() -> None:
    secret = "sk-" + "S" * 50_000
    bodies: list[dict[str, Any]] = [
        {"input": [{"type": secret}]},
        {"input": [{"role": secret, "content": "x"}]},
        {"tools": [{"type": secret}]},
        {"tool_choice": secret},
        {"text": {"format": {"type": secret}}},
        {"temperature": secret},
        {"reasoning": {"effort": secret}},
    ]
    for body in bodies:
        error = refused({"model": "tiny", "input": "x", **body})
        assert "SSSS" not in error.message and "SSSS" not in (error.param or "")
    huge_key = refused({"model": "tiny", "input": [{"role": "user", "content": "x", secret: 1}]})
    assert len(huge_key.param or "") <= 64 and len(huge_key.message) < 400


# --- the chat body --------------------------------------------------------------------------


def test_a_string_input_is_one_user_message() -> None:
    assert chat_body(make_request()) == {"model": "tiny", "messages": [{"role": "user", "content": QUESTION}]}


def test_input_items_become_chat_messages_in_order() -> None:
    request = parse_request(FULL_BODY)
    assert chat_messages(request) == [
        {"role": "system", "content": "Answer in one sentence."},
        {"role": "system", "content": "Use metric units."},
        {"role": "user", "content": [{"type": "text", "text": QUESTION}]},
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [
                {
                    "id": "call_paris",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_paris", "content": '{"temp_c": 21}'},
    ]


def test_function_calls_in_a_row_are_one_assistant_message() -> None:
    request = make_request(
        input=[
            {"role": "user", "content": "Weather and time?"},
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city":"Oslo"}'},
            {"type": "function_call", "call_id": "c2", "name": "get_time", "arguments": "{}"},
            {
                "type": "function_call_output",
                "call_id": "c1",
                "output": [{"type": "input_text", "text": "3C"}],
            },
            {"type": "function_call_output", "call_id": "c2", "output": "09:00"},
        ]
    )
    assert chat_messages(request)[1:] == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
                },
                {"id": "c2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "3C"}]},
        {"role": "tool", "tool_call_id": "c2", "content": "09:00"},
    ]


def test_the_full_body_converts_every_supported_field() -> None:
    body = chat_body(parse_request(FULL_BODY), [{"role": "user", "content": "Earlier."}])
    assert body["messages"][:2] == [
        {"role": "system", "content": "Answer in one sentence."},
        {"role": "user", "content": "Earlier."},
    ]
    assert {key: value for key, value in body.items() if key != "messages"} == {
        "model": "tiny",
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Current weather in a city.",
                    "parameters": WEATHER_TOOL["parameters"],
                    "strict": True,
                },
            },
            {"type": "function", "function": {"name": "get_time"}},
        ],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
        "temperature": 0.2,
        "top_p": 0.9,
        "max_completion_tokens": 256,
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "weather",
                "schema": {"type": "object"},
                "description": "The weather.",
                "strict": True,
            },
        },
        "reasoning_effort": "low",
        "user": "user-1",
        "prompt_cache_key": "tenant-a",
        "safety_identifier": "hash-1",
        "prompt_cache_retention": "24h",
        "verbosity": "medium",
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_without_tools_the_body_has_no_tool_fields() -> None:
    body = chat_body(
        make_request(tool_choice="none", parallel_tool_calls=False, text={"format": {"type": "json_object"}})
    )
    assert body == {
        "model": "tiny",
        "messages": [{"role": "user", "content": QUESTION}],
        "response_format": {"type": "json_object"},
    }


def test_an_input_with_nothing_to_answer_is_a_400() -> None:
    with pytest.raises(InvalidRequestError) as info:
        chat_messages(make_request(input=[]))
    assert info.value.param == "input"
    assert chat_messages(make_request(input=[], instructions="Say hi.")) == [
        {"role": "system", "content": "Say hi."}
    ]


CHAT_BODIES = {
    "string": {},
    "full": FULL_BODY,
    "required tool": {"tools": [WEATHER_TOOL], "tool_choice": "required"},
    "json object": {"text": {"format": {"type": "json_object"}}, "stream": True},
}


@pytest.mark.parametrize("name", sorted(CHAT_BODIES))
def test_zumik_chat_accepts_the_chat_body_unchanged(name: str) -> None:
    body = chat_body(make_request(**CHAT_BODIES[name]), [{"role": "assistant", "content": "Hello."}])
    prepared = prepare_request(EngineCall.CHAT, body)
    hints = {name: body.pop(name) for name in HINT_FIELDS if name in body}  # the provider hints
    assert prepared.engine_body == body
    assert prepared.hints.model_dump(exclude_none=True) == hints
    assert prepared.stream == bool(body.get("stream"))


@pytest.mark.parametrize("name", sorted(CHAT_BODIES))
def test_the_chat_body_is_valid_for_the_spec(name: str, spec: None) -> None:
    body = chat_body(make_request(**CHAT_BODIES[name]), [{"role": "assistant", "content": "Hello."}])
    assert_matches_spec_component(body, "CreateChatCompletionRequest")


# --- chains ---------------------------------------------------------------------------------


def test_output_sent_back_gives_the_same_messages_as_the_stored_chain() -> None:
    first = make_request(instructions="Be brief.", tools=[WEATHER_TOOL])
    answer = chat_answer("Let me check.", [PARIS_CALL], finish="tool_calls")
    output = render_response(make_head(first), answer, completed_at=COMPLETED_AT, new_id=counting_ids())[
        "output"
    ]
    history = input_history(first) + output_history(output)
    assert history == [
        {"role": "user", "content": QUESTION},
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [
                {
                    "id": "call_paris",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
    ]  # no instructions: OpenAI does not carry them to the next response
    result = {"type": "function_call_output", "call_id": "call_paris", "output": '{"temp_c": 21}'}
    shared = {"model": "tiny", "instructions": "Be brief.", "tools": [WEATHER_TOOL]}
    chained = parse_request({**shared, "previous_response_id": "resp_1", "input": [result]})
    stateless = parse_request({**shared, "input": [{"role": "user", "content": QUESTION}, *output, result]})
    assert chat_body(chained, history) == chat_body(stateless)


def test_output_history_of_text_only_and_of_calls_only() -> None:
    ids = counting_ids()
    text = render_response(
        make_head(make_request()), chat_answer("Sunny."), completed_at=COMPLETED_AT, new_id=ids
    )
    calls = render_response(
        make_head(make_request()),
        chat_answer(None, [PARIS_CALL, TIME_CALL]),
        completed_at=COMPLETED_AT,
        new_id=ids,
    )
    assert output_history(text["output"]) == [{"role": "assistant", "content": "Sunny."}]
    assert output_history(calls["output"]) == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_paris",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                },
                {"id": "call_time", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
            ],
        }
    ]
    assert output_history([]) == []
