"""Shared values, builders and the two shape authorities (the SDK's types, the OpenAPI spec)
of the Responses translation tests (test_responses_request.py, test_responses_render.py)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from tests.support.openai_schema import (
    assert_matches_openai_type,
    assert_matches_spec_component,
)
from zumik_serve.errors import InvalidRequestError
from zumik_serve.responses.wire import (
    ItemIds,
    ResponseHead,
    ResponsesRequest,
    StreamTranslator,
    parse_request,
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
    "reasoning": {"effort": "low", "summary": None},
    # hints and unsupported fields at values that ask for nothing
    "prompt_cache_retention": "24h",
    "background": False,
    "include": [],
    "service_tier": "auto",
    "stream_options": {"include_obfuscation": False},
    "top_logprobs": 0,
    "truncation": "disabled",
    "conversation": None,
}  # fmt: skip


# Each unsupported field at a value (valid in the spec) that asks for something, and the param.
UNSUPPORTED_EXAMPLES: dict[str, tuple[Any, str]] = {
    "background": (True, "background"),
    "context_management": ([{"type": "compaction", "compact_threshold": 2000}], "context_management"),
    "conversation": ("conv_123", "conversation"),
    "include": (["message.output_text.logprobs"], "include"),
    "max_tool_calls": (3, "max_tool_calls"),
    "moderation": ({"model": "omni-moderation-latest"}, "moderation"),
    "prompt": ({"id": "pmpt_123", "version": "2"}, "prompt"),
    "service_tier": ("flex", "service_tier"),
    "stream_options": ({"include_obfuscation": True}, "stream_options.include_obfuscation"),
    "top_logprobs": (5, "top_logprobs"),
    "truncation": ("auto", "truncation"),
}
