"""Agent frameworks against the real stack: the official SDK's tool, structured-output and
Responses helpers, LangChain's ``ChatOpenAI`` and LiteLLM, each pointed at Zumik's ``/v1``.

The served model has random weights, so its words are nonsense: these tests hold shapes, types,
counts, ids and protocol, and of generated JSON only what structured outputs guarantee. With at
most 16 new tokens, constrained JSON is either complete (generation ended on its own) or a prefix
cut by the token limit, and each test states which it holds in both cases.

Invariants held here:
- tools with ``tool_choice`` "auto" answer 200 with content or well-formed ``tool_calls``;
- a forced tool choice (named or "required") answers with calls of the offered tools, whose
  arguments are JSON text matching the tool's schema when finish_reason says generation ended on
  its own, and otherwise a prefix of such text (for an object schema: ``{`` after whitespace);
- an assistant ``tool_calls`` message followed by a ``tool`` message answers 200;
- a ``json_schema`` response format yields content that parses and validates when complete;
- ``/v1/responses`` bodies validate against the SDK's ``Response`` with no extra keys; a
  ``previous_response_id`` chain carries its history (input tokens grow) and reuses its prefix
  (``cached_tokens > 0``); retrieve and delete round trip; an unstored, a deleted and another
  tenant's response are all 404; a stream's events come in the official order and its text
  deltas concatenate to the final text; a forced function tool yields a ``function_call`` item
  whose ``function_call_output`` continues the chain;
- LangChain and LiteLLM invoke, stream, batch, await and call tools through the same base URL.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from functools import reduce
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

import jsonschema
import openai
import pydantic
import pytest
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_openai import ChatOpenAI
from openai.types.chat import (
    ChatCompletion,
    ChatCompletionFunctionToolParam,
    ChatCompletionMessageParam,
    ChatCompletionNamedToolChoiceParam,
)
from openai.types.responses import FunctionToolParam, Response

from tests.support.openai_schema import (
    assert_official,
)

if TYPE_CHECKING:
    from tests.integration.conftest import RunningStack

pytestmark = [pytest.mark.redis, pytest.mark.ray, pytest.mark.vllm]

MAX_TOKENS = 16  # OpenAI's floor for max_output_tokens, and cheap on two CPU cores
LONG_PROMPT = "The agent reads the tool registry and the repository policy before acting. " * 12

WEATHER_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"unit": {"type": "string", "enum": ["c", "f"]}},
    "required": ["unit"],
    "additionalProperties": False,
}
CLOCK_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}
WEATHER_TOOL: ChatCompletionFunctionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in the user's city.",
        "parameters": WEATHER_PARAMETERS,
    },
}
CLOCK_TOOL: ChatCompletionFunctionToolParam = {
    "type": "function",
    "function": {"name": "get_time", "description": "The current time.", "parameters": CLOCK_PARAMETERS},
}
STRICT_WEATHER_TOOL: ChatCompletionFunctionToolParam = {
    "type": "function",
    "function": {**WEATHER_TOOL["function"], "strict": True},
}
TOOL_SCHEMAS = {"get_weather": WEATHER_PARAMETERS, "get_time": CLOCK_PARAMETERS}
CHOOSE_WEATHER: ChatCompletionNamedToolChoiceParam = {"type": "function", "function": {"name": "get_weather"}}
# The same tool in the Responses API's flat shape.
RESPONSES_WEATHER_TOOL: FunctionToolParam = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in the user's city.",
    "parameters": WEATHER_PARAMETERS,
    "strict": True,
}


class Forecast(pydantic.BaseModel):
    unit: Literal["c", "f"]


def _messages(content: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": content}]


def _assert_constrained_arguments(arguments: object, schema: dict[str, Any], *, complete: bool) -> None:
    """What structured outputs guarantee about generated tool arguments: JSON text that matches
    ``schema`` when generation ended on its own; when the token limit cut it (``complete`` is
    False), a prefix of such text, which for an object schema opens with ``{`` after whitespace."""
    assert isinstance(arguments, str)
    if complete:
        jsonschema.validate(json.loads(arguments), schema)
    else:
        assert arguments.lstrip()[:1] in ("", "{"), arguments


def _sdk(running_stack: RunningStack, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{running_stack.url}/v1", api_key=api_key, max_retries=0, timeout=120)


def _assert_finished(response: Response) -> None:
    """A response ends ``completed``, or ``incomplete`` because max_output_tokens cut it."""
    assert response.status in ("completed", "incomplete"), response.status
    assert response.usage is not None
    assert 0 < response.usage.output_tokens <= MAX_TOKENS
    if response.status == "incomplete":
        assert response.incomplete_details is not None
        assert response.incomplete_details.reason == "max_output_tokens"
        assert response.usage.output_tokens == MAX_TOKENS
    assert response.error is None


# --- official SDK: chat completions with tools and structured outputs -----------------------


def test_tools_with_auto_choice_answer_content_or_tool_calls(
    client: openai.OpenAI, running_stack: RunningStack
) -> None:
    completion = client.chat.completions.create(
        model=running_stack.model,
        messages=_messages("What is the weather, and what time is it?"),
        tools=[WEATHER_TOOL, CLOCK_TOOL],
        tool_choice="auto",
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    choice = completion.choices[0]
    assert completion.usage is not None and completion.usage.completion_tokens <= MAX_TOKENS
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        for call in choice.message.tool_calls:
            assert call.type == "function" and call.id
            assert call.function.name in TOOL_SCHEMAS
            # A parser only reports a call it could parse: its arguments are JSON text.
            assert isinstance(json.loads(call.function.arguments), dict)
    else:
        assert choice.finish_reason in ("stop", "length")
        assert isinstance(choice.message.content, str)


def test_named_tool_choice_calls_that_tool_in_an_official_body(
    client: openai.OpenAI, running_stack: RunningStack
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=running_stack.model,
        messages=_messages("What is the weather?"),
        tools=[WEATHER_TOOL, CLOCK_TOOL],
        tool_choice=CHOOSE_WEATHER,
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    body = json.loads(raw.text)
    assert_official(body, ChatCompletion, "CreateChatCompletionResponse")
    completion = raw.parse()
    choice = completion.choices[0]
    # OpenAI ends a named tool call with "stop", not "tool_calls".
    assert choice.finish_reason in ("stop", "length")
    assert completion.usage is not None and completion.usage.completion_tokens <= MAX_TOKENS
    assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id
    assert call.function.name == "get_weather"
    _assert_constrained_arguments(
        call.function.arguments, WEATHER_PARAMETERS, complete=choice.finish_reason == "stop"
    )


def test_required_tool_choice_calls_an_offered_tool(
    client: openai.OpenAI, running_stack: RunningStack
) -> None:
    completion = client.chat.completions.create(
        model=running_stack.model,
        messages=_messages("What time is it?"),
        tools=[CLOCK_TOOL],
        tool_choice="required",
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    choice = completion.choices[0]
    assert choice.finish_reason in ("tool_calls", "length")
    assert completion.usage is not None and completion.usage.completion_tokens <= MAX_TOKENS
    if choice.finish_reason == "tool_calls":
        # Generation ended on its own: the constrained array of calls is complete.
        assert choice.message.tool_calls
    for call in choice.message.tool_calls or []:
        assert call.type == "function" and call.function.name == "get_time"
        _assert_constrained_arguments(
            call.function.arguments, CLOCK_PARAMETERS, complete=choice.finish_reason == "tool_calls"
        )


def test_tool_result_round_trip_answers(client: openai.OpenAI, running_stack: RunningStack) -> None:
    call_id = f"call_{uuid.uuid4().hex[:12]}"
    completion = client.chat.completions.create(
        model=running_stack.model,
        messages=[
            {"role": "user", "content": "What is the weather?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"unit": "c"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call_id, "content": '{"temperature": 21}'},
        ],
        tools=[WEATHER_TOOL],
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.role == "assistant"
    assert completion.usage is not None and 0 < completion.usage.completion_tokens <= MAX_TOKENS


def test_json_schema_response_format_through_parse(
    client: openai.OpenAI, running_stack: RunningStack
) -> None:
    try:
        completion = client.chat.completions.parse(
            model=running_stack.model,
            messages=_messages("Which unit do you report the weather in?"),
            response_format=Forecast,
            max_tokens=MAX_TOKENS,
            temperature=0,
        )
    except openai.LengthFinishReasonError as exc:
        # The token limit cut the JSON: the SDK says so, and the text is a prefix of an object.
        truncated = exc.completion.choices[0]
        assert truncated.finish_reason == "length"
        assert exc.completion.usage is not None and exc.completion.usage.completion_tokens == MAX_TOKENS
        assert isinstance(truncated.message.content, str)
        assert truncated.message.content.lstrip()[:1] in ("", "{"), truncated.message.content
    else:
        choice = completion.choices[0]
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Forecast)  # the SDK validated the JSON


def test_stream_helper_streams_a_forced_tool_call(client: openai.OpenAI, running_stack: RunningStack) -> None:
    events: list[Any] = []
    complete = True
    try:
        with client.chat.completions.stream(
            model=running_stack.model,
            messages=_messages("What is the weather?"),
            tools=[STRICT_WEATHER_TOOL],  # the helper parses only strict tools
            tool_choice=CHOOSE_WEATHER,
            max_tokens=MAX_TOKENS,
            temperature=0,
        ) as stream:
            events.extend(stream)
            final: Any = stream.get_final_completion()
    except openai.LengthFinishReasonError as exc:
        complete = False
        final = exc.completion
    assert any(event.type == "chunk" for event in events)
    choice = final.choices[0]
    assert choice.finish_reason == ("stop" if complete else "length")
    assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    deltas = [event for event in events if event.type == "tool_calls.function.arguments.delta"]
    assert deltas and all(event.name == "get_weather" for event in deltas)
    assert "".join(event.arguments_delta for event in deltas) == call.function.arguments
    _assert_constrained_arguments(call.function.arguments, WEATHER_PARAMETERS, complete=complete)
    if complete:
        (done,) = [event for event in events if event.type == "tool_calls.function.arguments.done"]
        jsonschema.validate(done.parsed_arguments, WEATHER_PARAMETERS)


# --- official SDK: the Responses API ---------------------------------------------------------


def test_responses_create_body_is_strictly_official(
    client: openai.OpenAI, running_stack: RunningStack
) -> None:
    raw = client.responses.with_raw_response.create(
        model=running_stack.model, input="Say something short.", max_output_tokens=MAX_TOKENS, temperature=0
    )
    body = json.loads(raw.text)
    assert_official(body, Response, "Response")
    response = raw.parse()
    assert response.object == "response" and response.id
    assert response.model == running_stack.model
    _assert_finished(response)
    (message,) = response.output
    assert message.type == "message" and message.role == "assistant"
    assert [part.type for part in message.content] == ["output_text"]
    assert isinstance(response.output_text, str)


def test_responses_retrieve_then_delete_then_404(client: openai.OpenAI, running_stack: RunningStack) -> None:
    created = client.responses.create(
        model=running_stack.model, input="Remember this.", max_output_tokens=MAX_TOKENS, temperature=0
    )
    retrieved = client.responses.retrieve(created.id)
    assert retrieved.id == created.id
    assert retrieved.status == created.status
    assert retrieved.output_text == created.output_text
    client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(created.id)


def test_responses_not_stored_are_404(client: openai.OpenAI, running_stack: RunningStack) -> None:
    created = client.responses.create(
        model=running_stack.model,
        input="Forget this.",
        store=False,
        max_output_tokens=MAX_TOKENS,
        temperature=0,
    )
    _assert_finished(created)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)


def test_responses_chain_of_three_carries_history_and_hits_cache(
    client: openai.OpenAI, running_stack: RunningStack
) -> None:
    params: dict[str, Any] = {"model": running_stack.model, "max_output_tokens": MAX_TOKENS, "temperature": 0}
    first = client.responses.create(input=f"{uuid.uuid4()} {LONG_PROMPT}", **params)
    second = client.responses.create(input="And then?", previous_response_id=first.id, **params)
    third = client.responses.create(input="And finally?", previous_response_id=second.id, **params)
    assert (second.previous_response_id, third.previous_response_id) == (first.id, second.id)
    usages = [response.usage for response in (first, second, third)]
    assert all(usage is not None for usage in usages)
    input_tokens = [usage.input_tokens for usage in usages if usage is not None]
    assert input_tokens[0] < input_tokens[1] < input_tokens[2]  # each turn carries the history
    assert third.usage is not None
    assert 0 < third.usage.input_tokens_details.cached_tokens <= third.usage.input_tokens


def test_responses_stream_helper_events_in_official_order(
    client: openai.OpenAI, running_stack: RunningStack
) -> None:
    with client.responses.stream(
        model=running_stack.model, input="Tell me a story.", max_output_tokens=MAX_TOKENS, temperature=0
    ) as stream:
        events: list[Any] = list(stream)
        terminal = events[-1]
        # The helper's final response exists only after response.completed.
        final: Any = (
            stream.get_final_response() if terminal.type == "response.completed" else terminal.response
        )
    deltas = [event for event in events if event.type == "response.output_text.delta"]
    collapsed = [
        event.type
        for index, event in enumerate(events)
        if not (event.type == "response.output_text.delta" and events[index - 1].type == event.type)
    ]
    assert collapsed == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *(["response.output_text.delta"] if deltas else []),
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        f"response.{final.status}",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert {events[0].response.id, events[1].response.id, final.id} == {final.id}
    _assert_finished(final)
    item_id = events[2].item.id
    assert all(event.item_id == item_id for event in deltas)
    (text_done,) = [event for event in events if event.type == "response.output_text.done"]
    assert "".join(event.delta for event in deltas) == text_done.text == final.output_text
    assert client.responses.retrieve(final.id).output_text == final.output_text


def test_responses_forced_function_call_then_output_continues(
    client: openai.OpenAI, running_stack: RunningStack
) -> None:
    raw = client.responses.with_raw_response.create(
        model=running_stack.model,
        input="What is the weather?",
        tools=[RESPONSES_WEATHER_TOOL],
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=MAX_TOKENS,
        temperature=0,
    )
    body = json.loads(raw.text)
    assert_official(body, Response, "Response")
    first = raw.parse()
    _assert_finished(first)
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1
    call = calls[0]
    assert call.name == "get_weather" and call.call_id
    _assert_constrained_arguments(call.arguments, WEATHER_PARAMETERS, complete=first.status == "completed")
    second = client.responses.create(
        model=running_stack.model,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature": 21}'}],
        tools=[RESPONSES_WEATHER_TOOL],
        max_output_tokens=MAX_TOKENS,
        temperature=0,
    )
    _assert_finished(second)
    assert second.previous_response_id == first.id
    assert first.usage is not None and second.usage is not None
    assert second.usage.input_tokens > first.usage.input_tokens


def test_responses_of_another_tenant_are_404(client: openai.OpenAI, running_stack: RunningStack) -> None:
    created = client.responses.create(
        model=running_stack.model, input="Private note.", max_output_tokens=MAX_TOKENS, temperature=0
    )
    other = _sdk(running_stack, running_stack.other_tenant_key)
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.create(
            model=running_stack.model,
            input="Continue.",
            previous_response_id=created.id,
            max_output_tokens=MAX_TOKENS,
        )
    assert client.responses.retrieve(created.id).id == created.id  # the owner's copy is intact


# --- LangChain --------------------------------------------------------------------------------


def _chat_model(running_stack: RunningStack, **options: Any) -> ChatOpenAI:
    return ChatOpenAI(
        model=running_stack.model,
        base_url=f"{running_stack.url}/v1",
        api_key=pydantic.SecretStr(running_stack.tenant_key),
        temperature=0,
        max_completion_tokens=MAX_TOKENS,
        max_retries=0,
        timeout=120,
        **options,
    )


def _assert_small_ai_message(message: object) -> None:
    assert isinstance(message, AIMessage)
    assert isinstance(message.text, str)
    assert message.usage_metadata is not None
    assert 0 < message.usage_metadata["output_tokens"] <= MAX_TOKENS


def test_langchain_invoke_and_stream_agree(running_stack: RunningStack) -> None:
    model = _chat_model(running_stack)
    message = model.invoke("Tell me about the weather")
    _assert_small_ai_message(message)
    assert message.response_metadata["finish_reason"] in ("stop", "length")
    assert message.response_metadata["model_name"] == running_stack.model
    chunks = list(model.stream("Tell me about the weather"))
    assert chunks and all(isinstance(chunk, AIMessageChunk) for chunk in chunks)
    merged = reduce(lambda left, right: left + right, chunks)
    assert "".join(chunk.text for chunk in chunks) == merged.text == message.text


def test_langchain_batch_of_three(running_stack: RunningStack) -> None:
    messages = _chat_model(running_stack).batch(["One", "Two", "Three"])
    assert len(messages) == 3
    for message in messages:
        _assert_small_ai_message(message)
    assert len({message.id for message in messages}) == 3


def test_langchain_bound_tool_choice_yields_that_tool_call(running_stack: RunningStack) -> None:
    model = _chat_model(running_stack).bind_tools(
        [dict(WEATHER_TOOL), dict(CLOCK_TOOL)], tool_choice="get_weather"
    )
    message = model.invoke("What is the weather?")
    assert isinstance(message, AIMessage)
    # LangChain files a call whose arguments do not parse (cut by the token limit) as invalid.
    calls = [*message.tool_calls, *message.invalid_tool_calls]
    assert [call["name"] for call in calls] == ["get_weather"]
    if message.response_metadata["finish_reason"] == "stop":
        (call,) = message.tool_calls
        jsonschema.validate(call["args"], WEATHER_PARAMETERS)


def test_langchain_responses_api_invoke(client: openai.OpenAI, running_stack: RunningStack) -> None:
    message = _chat_model(running_stack, use_responses_api=True).invoke("Say something short.")
    _assert_small_ai_message(message)
    assert message.response_metadata["status"] in ("completed", "incomplete")
    stored = client.responses.retrieve(message.response_metadata["id"])
    assert stored.output_text == message.text


# --- LiteLLM ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def litellm() -> ModuleType:
    # Offline: LiteLLM would otherwise fetch its model price map from GitHub at import.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    litellm.suppress_debug_info = True
    return litellm


def _litellm_params(running_stack: RunningStack, content: str) -> dict[str, Any]:
    return {
        "model": f"openai/{running_stack.model}",
        "api_base": f"{running_stack.url}/v1",
        "api_key": running_stack.tenant_key,
        "messages": _messages(content),
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "num_retries": 0,
    }


def test_litellm_completion_and_stream_agree(litellm: ModuleType, running_stack: RunningStack) -> None:
    params = _litellm_params(running_stack, "Tell me about the weather")
    response = litellm.completion(**params)
    text = response.choices[0].message.content
    assert isinstance(text, str)
    assert response.choices[0].finish_reason in ("stop", "length")
    assert 0 < response.usage.completion_tokens <= MAX_TOKENS
    chunks = list(litellm.completion(**params, stream=True))
    assert chunks
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == text


async def test_litellm_acompletion(litellm: ModuleType, running_stack: RunningStack) -> None:
    responses = await asyncio.gather(
        litellm.acompletion(**_litellm_params(running_stack, "First")),
        litellm.acompletion(**_litellm_params(running_stack, "Second")),
    )
    assert len({response.id for response in responses}) == 2
    for response in responses:
        assert isinstance(response.choices[0].message.content, str)
        assert 0 < response.usage.completion_tokens <= MAX_TOKENS


def test_litellm_forced_tool_call(litellm: ModuleType, running_stack: RunningStack) -> None:
    response = litellm.completion(
        **_litellm_params(running_stack, "What is the weather?"),
        tools=[WEATHER_TOOL, CLOCK_TOOL],
        tool_choice=CHOOSE_WEATHER,
    )
    choice = response.choices[0]
    # LiteLLM reports a call that ended on its own as "tool_calls", whatever the server said.
    assert choice.finish_reason in ("tool_calls", "length")
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    _assert_constrained_arguments(
        call.function.arguments, WEATHER_PARAMETERS, complete=choice.finish_reason == "tool_calls"
    )
