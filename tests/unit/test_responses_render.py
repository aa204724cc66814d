"""The Responses translation layer, answers out (``zumik_serve/responses``): a chat answer or
chat stream rendered as the official Response object or Responses stream events.

Invariants held here:

- every Response and event carries only keys of the official schema and every key it requires,
  checked against the ``openai`` SDK's types and, where ``../shared`` is present, the OpenAPI
  spec (the one key the SDK lags the spec on is listed in ``SDK_LAGS_SPEC`` and tested as such);
- a streamed answer gives the official event order with strictly increasing sequence numbers,
  and its final Response equals ``render_response`` of the same answer whole;
- the official client reads the objects and the SSE stream (its stream accumulator included).
"""

from __future__ import annotations

import json
from typing import Any

import httpx2
import pytest
from openai import OpenAI
from openai.types.responses import ResponseFunctionCallArgumentsDoneEvent

from tests.support.openai_schema import (
    assert_matches_spec_component,
)
from tests.support.responses_cases import (
    COMPLETED_AT,
    CREATED_AT,
    FULL_BODY,
    PARIS_CALL,
    QUESTION,
    RESPONSES_USAGE,
    TIME_CALL,
    WEATHER_TOOL,
    Call,
    Official,
    chat_answer,
    chat_chunks,
    counting_ids,
    make_head,
    make_request,
    stream_events,
)
from zumik_serve.errors import EngineError
from zumik_serve.responses.wire import (
    StreamTranslator,
    chat_messages,
    input_history,
    output_history,
    parse_request,
    render_response,
    sse,
)

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
        "reasoning": {"effort": None, "summary": None},
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
