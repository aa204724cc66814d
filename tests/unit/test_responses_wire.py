"""The Responses translation layer (``zumik_serve/responses``): a ``POST /v1/responses`` body in,
a chat-completions body out; a chat answer or chat stream back as the official Response object or
Responses stream events.

Invariants held here:

- every Response and event carries only keys of the official schema and every key it requires,
  checked against the ``openai`` SDK's types and, where ``../shared`` is present, the OpenAPI
  spec (the one key the SDK lags the spec on is listed in ``SDK_LAGS_SPEC`` and tested as such);
- a bad body is a 400 ``invalid_request_error`` naming the value to fix and never echoing it;
  every unsupported spec field is refused with its table's reason unless it asks for nothing;
- the chat body is one Zumik's own /v1/chat/completions check accepts unchanged;
- an earlier response's output sent back as input gives the same chat messages as the stored
  chain (``input_history`` + ``output_history``), and instructions never enter the history;
- a streamed answer gives the official event order with strictly increasing sequence numbers,
  and its final Response equals ``render_response`` of the same answer whole;
- the official client reads the objects and the SSE stream (its stream accumulator included).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from typing import Any

import httpx2
import pytest
from openai import OpenAI
from openai.types.responses import Response, ResponseFunctionCallArgumentsDoneEvent, ResponseStreamEvent
from pydantic import TypeAdapter

from tests.support.openai_schema import (
    assert_matches_openai_type,
    assert_matches_spec_component,
    spec_available,
)
from zumik_serve.api.v1.wire import prepare_request
from zumik_serve.engines.protocol import EngineCall
from zumik_serve.errors import EngineError, InvalidRequestError
from zumik_serve.responses.wire import (
    UNSUPPORTED_FIELDS,
    ItemIds,
    ResponseHead,
    ResponsesRequest,
    StreamTranslator,
    chat_body,
    chat_messages,
    input_history,
    output_history,
    parse_request,
    render_response,
    sse,
)

CREATED_AT = 1_700_000_000
COMPLETED_AT = 1_700_000_009
QUESTION = "What is the weather in Paris?"
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}
TIME_TOOL: dict[str, Any] = {"type": "function", "name": "get_time", "parameters": None, "strict": None}
USAGE = {
    "prompt_tokens": 21,
    "completion_tokens": 9,
    "total_tokens": 30,
    "prompt_tokens_details": {"cached_tokens": 16},
}
RESPONSES_USAGE = {
    "input_tokens": 21,
    "input_tokens_details": {"cached_tokens": 16, "cache_write_tokens": 0},
    "output_tokens": 9,
    "output_tokens_details": {"reasoning_tokens": 0},
    "total_tokens": 30,
}
PARIS_CALL = ("call_paris", "get_weather", ['{"city":', ' "Paris"}'])
TIME_CALL = ("call_time", "get_time", ["{}"])

# Keys the spec requires that the SDK's type does not declare yet (the SDK tolerates them).
SDK_LAGS_SPEC = {"response.function_call_arguments.done": frozenset({"name"})}
EVENT_COMPONENTS = {
    "response.created": "ResponseCreatedEvent",
    "response.in_progress": "ResponseInProgressEvent",
    "response.output_item.added": "ResponseOutputItemAddedEvent",
    "response.output_item.done": "ResponseOutputItemDoneEvent",
    "response.content_part.added": "ResponseContentPartAddedEvent",
    "response.content_part.done": "ResponseContentPartDoneEvent",
    "response.output_text.delta": "ResponseTextDeltaEvent",
    "response.output_text.done": "ResponseTextDoneEvent",
    "response.function_call_arguments.delta": "ResponseFunctionCallArgumentsDeltaEvent",
    "response.function_call_arguments.done": "ResponseFunctionCallArgumentsDoneEvent",
    "response.completed": "ResponseCompletedEvent",
    "response.incomplete": "ResponseIncompleteEvent",
    "response.failed": "ResponseFailedEvent",
    "error": "ResponseErrorEvent",
}
EVENTS = TypeAdapter(ResponseStreamEvent)
NO_SPEC = "the OpenAI spec (../shared/data/openai/openapi.yaml) is not in this checkout"


# --- builders -------------------------------------------------------------------------------


def make_request(**fields: Any) -> ResponsesRequest:
    return parse_request({"model": "tiny", "input": QUESTION, **fields})


def make_head(request: ResponsesRequest) -> ResponseHead:
    return ResponseHead(id="resp_1", model="tiny", created_at=CREATED_AT, request=request)


def counting_ids() -> ItemIds:
    counter = itertools.count(1)
    return lambda prefix: f"{prefix}_{next(counter)}"


Call = tuple[str, str, list[str]]  # call id, function name, argument pieces as streamed


def chat_answer(text: str | None, calls: Sequence[Call] = (), finish: str = "stop") -> dict[str, Any]:
    """A whole chat answer as the /v1/chat/completions pipeline renders it."""
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if calls:
        message["tool_calls"] = [
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": "".join(pieces)}}
            for call_id, name, pieces in calls
        ]
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": CREATED_AT,
        "model": "tiny",
        "choices": [choice],
        "usage": USAGE,
    }


def chat_chunks(
    text: Sequence[str], calls: Sequence[Call] = (), finish: str = "stop"
) -> list[dict[str, Any]]:
    """The same answer as the pipeline streams it (with include_usage): a role delta, the text,
    each tool call (id and name first), the finish reason, then the usage chunk."""

    def chunk(delta: dict[str, Any] | None, finish_reason: str | None = None) -> dict[str, Any]:
        choices = (
            []
            if delta is None
            else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        )
        return {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": CREATED_AT,
            "model": "tiny",
            "choices": choices,
            "usage": USAGE if delta is None else None,
        }

    chunks = [chunk({"role": "assistant", "content": ""})]
    chunks += [chunk({"content": piece}) for piece in text]
    for index, (call_id, name, pieces) in enumerate(calls):
        head = {
            "index": index,
            "id": call_id,
            "type": "function",
            "function": {"name": name, "arguments": ""},
        }
        chunks.append(chunk({"tool_calls": [head]}))
        chunks += [chunk({"tool_calls": [{"index": index, "function": {"arguments": p}}]}) for p in pieces]
    chunks.append(chunk({}, finish))
    chunks.append(chunk(None))
    return chunks


def stream_events(request: ResponsesRequest, chunks: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    translator = StreamTranslator(make_head(request), new_id=counting_ids())
    events = translator.start()
    for chunk in chunks:
        events += translator.feed(chunk)
    return events + translator.finish(COMPLETED_AT)


def refused(body: dict[str, Any]) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        parse_request(body)
    assert info.value.status == 400 and info.value.type == "invalid_request_error"
    return info.value


# --- the two authorities on shapes ----------------------------------------------------------


class Official:
    """Checks Responses objects and events against one authority: the SDK's types or the spec."""

    def __init__(self, authority: str) -> None:
        self.authority = authority

    def response(self, body: dict[str, Any]) -> None:
        if self.authority == "sdk":
            assert_matches_openai_type(body, Response)
        else:
            assert_matches_spec_component(body, "Response")

    def event(self, event: dict[str, Any]) -> None:
        component = EVENT_COMPONENTS[event["type"]]
        if self.authority == "sdk":
            model = type(EVENTS.validate_python(event))
            assert model.__name__ == component
            lagging = SDK_LAGS_SPEC.get(event["type"], frozenset())
            assert_matches_openai_type({k: v for k, v in event.items() if k not in lagging}, model)
        else:
            assert_matches_spec_component(event, component)
            assert_matches_spec_component(event, "ResponseStreamEvent")


@pytest.fixture(params=["sdk", "spec"])
def official(request: pytest.FixtureRequest) -> Official:
    if request.param == "spec" and not spec_available():
        pytest.skip(NO_SPEC)
    return Official(request.param)


@pytest.fixture
def spec() -> None:
    if not spec_available():
        pytest.skip(NO_SPEC)


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


FULL_BODY: dict[str, Any] = {
    "model": "tiny",
    "instructions": "Answer in one sentence.",
    "input": [
        {"role": "developer", "content": "Use metric units."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": QUESTION}]},
        {
            "id": "msg_0",
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": "Let me check.", "annotations": [], "logprobs": []}],
        },
        {"type": "function_call", "id": "fc_0", "call_id": "call_paris", "name": "get_weather",
         "arguments": '{"city": "Paris"}', "status": "completed"},
        {"type": "function_call_output", "call_id": "call_paris", "output": '{"temp_c": 21}'},
    ],
    "previous_response_id": "resp_0",
    "store": False,
    "stream": True,
    "tools": [WEATHER_TOOL, TIME_TOOL],
    "tool_choice": {"type": "function", "name": "get_weather"},
    "parallel_tool_calls": False,
    "temperature": 0.2,
    "top_p": 0.9,
    "max_output_tokens": 256,
    "text": {"format": {"type": "json_schema", "name": "weather", "schema": {"type": "object"},
                        "strict": True, "description": "The weather."}, "verbosity": "medium"},
    "metadata": {"ticket": "T-1"},
    "user": "user-1",
    "prompt_cache_key": "tenant-a",
    "safety_identifier": "hash-1",
    # hints and unsupported fields at values that ask for nothing
    "prompt_cache_retention": "24h",
    "background": False,
    "include": [],
    "reasoning": {"effort": None, "summary": None},
    "service_tier": "auto",
    "stream_options": {"include_obfuscation": False},
    "top_logprobs": 0,
    "truncation": "disabled",
    "conversation": None,
}  # fmt: skip


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
    assert request.background is None and request.reasoning is None and request.truncation is None


# Each unsupported field at a value (valid in the spec) that asks for something, and the param.
UNSUPPORTED_EXAMPLES: dict[str, tuple[Any, str]] = {
    "background": (True, "background"),
    "context_management": ([{"type": "compaction", "compact_threshold": 2000}], "context_management"),
    "conversation": ("conv_123", "conversation"),
    "include": (["message.output_text.logprobs"], "include"),
    "max_tool_calls": (3, "max_tool_calls"),
    "moderation": ({"model": "omni-moderation-latest"}, "moderation"),
    "prompt": ({"id": "pmpt_123", "version": "2"}, "prompt"),
    "reasoning": ({"effort": "high", "summary": None}, "reasoning.effort"),
    "service_tier": ("flex", "service_tier"),
    "stream_options": ({"include_obfuscation": True}, "stream_options.include_obfuscation"),
    "top_logprobs": (5, "top_logprobs"),
    "truncation": ("auto", "truncation"),
}


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
        "user": "user-1",
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
    assert prepared.engine_body == body
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


# --- the Response object --------------------------------------------------------------------


def test_a_text_answer_renders_the_whole_response(official: Official) -> None:
    request = make_request(metadata={"ticket": "T-1"}, temperature=0.5, user="user-1")
    response = render_response(
        make_head(request), chat_answer("It is sunny."), completed_at=COMPLETED_AT, new_id=counting_ids()
    )
    official.response(response)
    assert response == {
        "id": "resp_1",
        "object": "response",
        "created_at": CREATED_AT,
        "status": "completed",
        "background": False,
        "completed_at": COMPLETED_AT,
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "max_output_tokens": None,
        "model": "tiny",
        "output": [
            {
                "id": "msg_1",
                "type": "message",
                "status": "completed",
                "content": [
                    {"type": "output_text", "annotations": [], "logprobs": [], "text": "It is sunny."}
                ],
                "role": "assistant",
            }
        ],
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "prompt_cache_key": None,
        "safety_identifier": None,
        "service_tier": "default",
        "temperature": 0.5,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": None,
        "truncation": "disabled",
        "metadata": {"ticket": "T-1"},
        "usage": RESPONSES_USAGE,
        "user": "user-1",
    }


def test_tool_calls_render_as_function_call_items_and_echo_the_request(official: Official) -> None:
    request = parse_request({**FULL_BODY, "stream": False})
    answer = chat_answer("Checking both.", [PARIS_CALL, TIME_CALL], finish="tool_calls")
    response = render_response(make_head(request), answer, completed_at=COMPLETED_AT, new_id=counting_ids())
    official.response(response)
    assert response["output"][1:] == [
        {"id": "fc_2", "type": "function_call", "status": "completed", "arguments": '{"city": "Paris"}',
         "call_id": "call_paris", "name": "get_weather"},
        {"id": "fc_3", "type": "function_call", "status": "completed", "arguments": "{}",
         "call_id": "call_time", "name": "get_time"},
    ]  # fmt: skip
    assert response["output"][0]["id"] == "msg_1" and response["status"] == "completed"
    assert response["tools"] == [
        {k: WEATHER_TOOL[k] for k in ("type", "name", "description", "parameters", "strict")},
        {"type": "function", "name": "get_time", "description": None, "parameters": None, "strict": None},
    ]
    assert response["tool_choice"] == {"type": "function", "name": "get_weather"}
    assert response["text"] == {"format": FULL_BODY["text"]["format"]}
    assert (response["instructions"], response["previous_response_id"]) == (
        "Answer in one sentence.",
        "resp_0",
    )
    assert (response["parallel_tool_calls"], response["max_output_tokens"]) == (False, 256)
    assert "store" not in response  # not a key of the spec's Response


def test_a_length_cut_is_incomplete_and_its_last_item_too(official: Official) -> None:
    answer = chat_answer("Let me", [PARIS_CALL], finish="length")
    response = render_response(
        make_head(make_request()), answer, completed_at=COMPLETED_AT, new_id=counting_ids()
    )
    official.response(response)
    assert response["status"] == "incomplete" and response["completed_at"] is None
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert [item["status"] for item in response["output"]] == ["completed", "incomplete"]
    filtered = render_response(
        make_head(make_request()), chat_answer("", finish="content_filter"), completed_at=1
    )
    assert filtered["incomplete_details"] == {"reason": "content_filter"}
    assert (
        filtered["output"][0]["content"][0]["text"] == "" and filtered["output"][0]["status"] == "incomplete"
    )


def test_an_empty_answer_is_an_empty_message_not_an_empty_output(official: Official) -> None:
    response = render_response(
        make_head(make_request()), chat_answer(None), completed_at=COMPLETED_AT, new_id=counting_ids()
    )
    official.response(response)
    assert [item["content"][0]["text"] for item in response["output"]] == [""]


def test_an_abnormal_finish_reason_is_an_engine_error_not_an_outcome() -> None:
    with pytest.raises(EngineError, match="abnormally"):
        render_response(
            make_head(make_request()), chat_answer("x", finish="abort"), completed_at=COMPLETED_AT
        )
    with pytest.raises(EngineError, match="no choices"):
        render_response(
            make_head(make_request()), {**chat_answer("x"), "choices": []}, completed_at=COMPLETED_AT
        )


def test_usage_without_details_counts_zero_cached_tokens() -> None:
    answer = {**chat_answer("x"), "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}}
    usage = render_response(make_head(make_request()), answer, completed_at=COMPLETED_AT)["usage"]
    assert usage["input_tokens_details"] == {"cached_tokens": 0, "cache_write_tokens": 0}
    assert (usage["input_tokens"], usage["output_tokens"], usage["total_tokens"]) == (4, 2, 6)
    no_usage = render_response(make_head(make_request()), {**chat_answer("x"), "usage": None}, completed_at=1)
    assert "usage" not in no_usage  # the spec's usage is not nullable


# --- streams --------------------------------------------------------------------------------

TEXT_EVENTS = [
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.delta",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]
CALL_EVENTS = [
    "response.output_item.added",
    "response.function_call_arguments.delta",
    "response.function_call_arguments.delta",
    "response.function_call_arguments.done",
    "response.output_item.done",
]
START = ["response.created", "response.in_progress"]


def check_stream(events: list[dict[str, Any]], official: Official) -> None:
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    for event in events:
        official.event(event)


@pytest.mark.parametrize(
    ("text", "calls", "finish", "types"),
    [
        (["It ", "is ", "sunny."], [], "stop", [*TEXT_EVENTS, "response.completed"]),
        ([], [PARIS_CALL], "tool_calls", [*CALL_EVENTS, "response.completed"]),
        (
            ["Let ", "me ", "check."],
            [PARIS_CALL],
            "tool_calls",
            [*TEXT_EVENTS, *CALL_EVENTS, "response.completed"],
        ),
        (["It ", "is ", "sun"], [], "length", [*TEXT_EVENTS, "response.incomplete"]),
        ([], [], "stop", [*TEXT_EVENTS[:2], *TEXT_EVENTS[5:], "response.completed"]),
    ],
    ids=["text", "tool call", "text then tool call", "length", "empty"],
)
def test_a_stream_gives_the_official_events_and_the_whole_response(
    text: list[str], calls: list[Call], finish: str, types: list[str], official: Official
) -> None:
    request = make_request(tools=[WEATHER_TOOL])
    events = stream_events(request, chat_chunks(text, calls, finish))
    check_stream(events, official)
    assert [event["type"] for event in events] == START + types
    whole = chat_answer("".join(text) or None, calls, finish)
    expected = render_response(make_head(request), whole, completed_at=COMPLETED_AT, new_id=counting_ids())
    assert events[-1]["response"] == expected
    in_progress = {key: value for key, value in expected.items() if key != "usage"}
    in_progress |= {"status": "in_progress", "output": [], "completed_at": None, "incomplete_details": None}
    assert events[0]["response"] == events[1]["response"] == in_progress


def test_stream_deltas_add_up_to_the_done_events() -> None:
    events = stream_events(
        make_request(), chat_chunks(["It ", "is ", "sunny."], [PARIS_CALL, TIME_CALL], "tool_calls")
    )
    by_type: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        by_type.setdefault(event["type"], []).append(event)
    assert "".join(e["delta"] for e in by_type["response.output_text.delta"]) == "It is sunny."
    assert by_type["response.output_text.done"][0]["text"] == "It is sunny."
    assert [
        (e["output_index"], e["name"], e["arguments"])
        for e in by_type["response.function_call_arguments.done"]
    ] == [
        (1, "get_weather", '{"city": "Paris"}'),
        (2, "get_time", "{}"),
    ]
    added = [e["item"] for e in by_type["response.output_item.added"]]
    assert [(item["type"], item["status"]) for item in added] == [
        ("message", "in_progress"),
        ("function_call", "in_progress"),
        ("function_call", "in_progress"),
    ]
    assert added[0]["content"] == [] and added[1]["arguments"] == ""
    # an item is done before the next one is added
    order = [
        (e["type"], e.get("output_index")) for e in events if e["type"].startswith("response.output_item")
    ]
    assert order == [(f"response.output_item.{step}", i) for i in range(3) for step in ("added", "done")]


def test_a_failure_mid_stream_is_response_failed_with_the_output_so_far(official: Official) -> None:
    translator = StreamTranslator(make_head(make_request()), new_id=counting_ids())
    events = translator.start()
    for chunk in chat_chunks(["It ", "is "])[:3]:
        events += translator.feed(chunk)
    events += translator.fail("The engine failed while streaming; retry the request.")
    check_stream(events, official)
    failed = events[-1]
    assert failed["type"] == "response.failed"
    assert failed["response"]["status"] == "failed" and failed["response"]["completed_at"] is None
    assert failed["response"]["error"] == {
        "code": "server_error",
        "message": "The engine failed while streaming; retry the request.",
    }
    assert failed["response"]["output"] == [
        {
            "id": "msg_1",
            "type": "message",
            "status": "incomplete",
            "content": [{"type": "output_text", "annotations": [], "logprobs": [], "text": "It is "}],
            "role": "assistant",
        }
    ]
    with pytest.raises(RuntimeError):
        translator.feed(chat_chunks(["x"])[1])


def test_a_client_fault_mid_stream_is_an_error_event(official: Official) -> None:
    translator = StreamTranslator(make_head(make_request()))
    events = translator.start() + translator.error(
        "The input is longer than the model's context.", code="context_length_exceeded", param="input"
    )
    check_stream(events, official)
    assert events[-1] == {
        "type": "error",
        "code": "context_length_exceeded",
        "message": "The input is longer than the model's context.",
        "param": "input",
        "sequence_number": 2,
    }
    with pytest.raises(RuntimeError):
        translator.finish(COMPLETED_AT)


def test_a_stream_without_a_finish_reason_raises_and_can_still_fail() -> None:
    translator = StreamTranslator(make_head(make_request()))
    translator.start()
    translator.feed(chat_chunks(["partial"])[1])
    with pytest.raises(EngineError, match="ended before the answer did"):
        translator.finish(COMPLETED_AT)
    assert translator.fail("cut")[0]["response"]["output"][0]["status"] == "incomplete"


def test_an_abnormal_stream_is_an_engine_error() -> None:
    translator = StreamTranslator(make_head(make_request()))
    translator.start()
    with pytest.raises(EngineError, match="abnormally"):
        translator.feed(chat_chunks(["x"], finish="abort")[-2])
    translator = StreamTranslator(make_head(make_request()))
    translator.start()
    chunks = chat_chunks([], [PARIS_CALL, TIME_CALL], "tool_calls")
    for chunk in chunks[:6]:
        translator.feed(chunk)
    with pytest.raises(EngineError, match="out of order"):
        translator.feed(chunks[2])  # call 0 again, after call 1 began
    nameless = StreamTranslator(make_head(make_request()))
    nameless.start()
    with pytest.raises(EngineError, match="without its id or name"):
        nameless.feed(
            {
                "choices": [
                    {"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{"}}]}}
                ]
            }
        )


def test_the_translator_must_start_first_and_ends_once() -> None:
    translator = StreamTranslator(make_head(make_request()))
    with pytest.raises(RuntimeError):
        translator.feed(chat_chunks(["x"])[1])
    translator.start()
    with pytest.raises(RuntimeError):
        translator.start()


def test_the_sdk_lags_the_spec_on_the_name_of_arguments_done(spec: None) -> None:
    """When the SDK declares ``name``, drop it from SDK_LAGS_SPEC."""
    assert "name" not in ResponseFunctionCallArgumentsDoneEvent.model_fields
    event = {"type": "response.function_call_arguments.done", "item_id": "fc_1", "output_index": 0,
             "arguments": "{}", "sequence_number": 5}  # fmt: skip
    with pytest.raises(AssertionError, match="name"):
        assert_matches_spec_component(event, "ResponseFunctionCallArgumentsDoneEvent")


# --- the wire: SSE and the official client --------------------------------------------------


def test_sse_frames_an_event_as_openai_does() -> None:
    event = {"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0, "content_index": 0,
             "delta": "line one\nline two é", "logprobs": [], "sequence_number": 4}  # fmt: skip
    framed = sse(event)
    head, data, end = framed.split(b"\n", 2)
    assert head == b"event: response.output_text.delta" and end == b"\n"
    assert data.startswith(b"data: ") and json.loads(data[len(b"data: ") :]) == event
    assert b", " not in data and "é".encode() in data  # compact, UTF-8 as sent


def test_the_official_client_reads_our_objects_and_our_stream() -> None:
    answer = chat_answer("Let me check.", [PARIS_CALL], finish="tool_calls")
    chunks = chat_chunks(["Let ", "me ", "check."], [PARIS_CALL], "tool_calls")
    sent: list[dict[str, Any]] = []

    def serve(http_request: httpx2.Request) -> httpx2.Response:
        body = json.loads(http_request.content)
        sent.append(body)
        request = parse_request(body)  # what the SDK sends is a body we accept
        if not request.stream:
            rendered = render_response(
                make_head(request), answer, completed_at=COMPLETED_AT, new_id=counting_ids()
            )
            return httpx2.Response(200, json=rendered)
        frames = b"".join(sse(event) for event in stream_events(request, chunks))
        return httpx2.Response(200, content=frames, headers={"content-type": "text/event-stream"})

    transport = httpx2.MockTransport(serve)  # stands in for the handler, which is not this layer
    client = OpenAI(
        api_key="sk-test", base_url="http://zumik.test/v1", http_client=httpx2.Client(transport=transport)
    )
    response = client.responses.create(model="tiny", input=QUESTION, tools=[WEATHER_TOOL])  # type: ignore[list-item]
    assert response.output_text == "Let me check." and response.status == "completed"
    with client.responses.stream(model="tiny", input=QUESTION, tools=[WEATHER_TOOL]) as stream:  # type: ignore[list-item]
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds == START + TEXT_EVENTS + CALL_EVENTS + ["response.completed"]
    assert final.output_text == "Let me check."
    call = final.output[1]
    assert call.type == "function_call" and call.parsed_arguments == {"city": "Paris"}
    assert final.model_dump(exclude={"output"}) == response.model_dump(exclude={"output"})
    # The SDK's own objects sent back as input (chaining without storage) parse, and give the
    # messages the stored chain would.
    result = {"type": "function_call_output", "call_id": "call_paris", "output": "21C"}
    client.responses.create(
        model="tiny", input=[{"role": "user", "content": QUESTION}, *response.output, result]
    )  # type: ignore[list-item]
    assert [body.get("stream") for body in sent] == [None, True, None]
    first = parse_request(sent[0])
    history = input_history(first) + output_history(response.to_dict()["output"])
    assert chat_messages(parse_request(sent[2])) == history + [
        {"role": "tool", "tool_call_id": "call_paris", "content": "21C"}
    ]
