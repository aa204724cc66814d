"""A Responses request as a chat-completions body, and the chat messages each response adds to
its chain.

    chat messages  = [instructions, as a system message]
                     + history
                     + input_history(request)
    history        = for each earlier response of the chain, oldest first:
                     input_history(its request) + output_history(its output)

Input items become chat messages in order: a developer message is a system message; function
calls in a row are one assistant message with ``tool_calls`` (joined to the assistant message
just before them, whose turn they are part of); a function's output is a ``tool`` message.

Rules kept here:

- instructions never enter the history: OpenAI does not carry them to the next response;
- an earlier response's ``output`` sent back as input (chaining without storage) becomes exactly
  the messages ``output_history`` stores for it, so both ways of chaining give the model the same
  prompt (and the same cached prefix);
- a chat body holds only fields /v1/chat/completions accepts (``api/v1/wire.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from zumik_serve.errors import InvalidRequestError
from zumik_serve.responses.items import (
    FunctionCallItem,
    InputItem,
    InputText,
    MessageItem,
    OutputText,
    Refusal,
    parse_input_items,
)
from zumik_serve.responses.request import (
    FunctionChoice,
    FunctionTool,
    JsonSchemaFormat,
    ResponsesRequest,
    TextFormat,
    ToolChoice,
)

ChatMessage = dict[str, Any]  # one message of a chat-completions body, as JSON


def chat_body(request: ResponsesRequest, history: Sequence[ChatMessage] = ()) -> dict[str, Any]:
    """The chat-completions body that runs ``request`` after ``history``.

    Tools, ``tool_choice`` and ``parallel_tool_calls`` go only with at least one tool (chat
    refuses the last two without tools). ``max_output_tokens`` is ``max_completion_tokens``;
    ``text.format`` is ``response_format``; ``reasoning.effort`` is ``reasoning_effort``. The
    provider hints go as chat's own (``text.verbosity`` is ``verbosity``; ``metadata`` stays the
    Response's). A stream asks for the usage chunk, which the final Response carries.
    """
    body: dict[str, Any] = {"model": request.model, "messages": chat_messages(request, history)}
    if request.tools:
        body["tools"] = [_chat_tool(tool) for tool in request.tools]
        body["tool_choice"] = _chat_tool_choice(request.tool_choice)
        body["parallel_tool_calls"] = request.parallel_tool_calls
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if request.top_p is not None:
        body["top_p"] = request.top_p
    if request.max_output_tokens is not None:
        body["max_completion_tokens"] = request.max_output_tokens
    if request.text is not None and request.text.format is not None:
        body["response_format"] = _response_format(request.text.format)
    if request.reasoning is not None and request.reasoning.effort is not None:
        body["reasoning_effort"] = request.reasoning.effort
    if request.user is not None:
        body["user"] = request.user
    body.update(_provider_hints(request))
    if request.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def _provider_hints(request: ResponsesRequest) -> dict[str, Any]:
    hints = {
        "prompt_cache_key": request.prompt_cache_key,
        "safety_identifier": request.safety_identifier,
        "prompt_cache_retention": request.prompt_cache_retention,
        "prompt_cache_options": (
            request.prompt_cache_options.model_dump(exclude_none=True)
            if request.prompt_cache_options
            else None
        ),
        "verbosity": request.text.verbosity if request.text is not None else None,
    }
    return {name: value for name, value in hints.items() if value is not None}


def chat_messages(request: ResponsesRequest, history: Sequence[ChatMessage] = ()) -> list[ChatMessage]:
    """``instructions`` (a system message), then ``history`` (the same dicts, not copies), then
    the request's input items. A 400 naming ``input`` when that leaves nothing to answer."""
    messages: list[ChatMessage] = []
    if request.instructions:
        messages.append({"role": "system", "content": request.instructions})
    messages.extend(history)
    messages.extend(input_history(request))
    if not messages:
        raise InvalidRequestError("'input' is empty: send at least one message.", param="input")
    return messages


def input_history(request: ResponsesRequest) -> list[ChatMessage]:
    """The chat messages of the request's input items (never its instructions): what a stored
    response contributes to its chain before its output."""
    return _messages(request.input_items())


def output_history(output: Sequence[Mapping[str, Any]]) -> list[ChatMessage]:
    """The chat messages of a response's ``output`` items (as ``render_response`` or the stream's
    final event built them): one assistant message with its text and/or ``tool_calls``, or none
    for an empty output. Read exactly as input items are, so a client sending the output back
    gets the same messages."""
    return _messages(parse_input_items(list(output), "output"))


def _messages(items: Sequence[InputItem]) -> list[ChatMessage]:
    messages: list[ChatMessage] = []
    for item in items:
        if isinstance(item, MessageItem):
            messages.append(_message(item))
        elif isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            if messages and messages[-1]["role"] == "assistant":
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            content = _text_parts(item.output)
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": content})
    return messages


def _message(item: MessageItem) -> ChatMessage:
    role = "system" if item.role == "developer" else item.role
    if isinstance(item.content, str):
        return {"role": role, "content": item.content}
    if item.role != "assistant":
        texts = tuple(part for part in item.content if isinstance(part, InputText))
        return {"role": role, "content": _text_parts(texts)}
    # An assistant's text is one string, as output_history stores a response's own output.
    text = "".join(part.text for part in item.content if isinstance(part, OutputText))
    refusal = "".join(part.refusal for part in item.content if isinstance(part, Refusal))
    message: ChatMessage = {"role": "assistant", "content": None if refusal and not text else text}
    if refusal:
        message["refusal"] = refusal
    return message


def _text_parts(content: str | tuple[InputText, ...]) -> str | list[dict[str, str]]:
    """A string as is; text parts as chat's text parts (an empty list as an empty string, which
    chat accepts where it refuses an empty array)."""
    if isinstance(content, str):
        return content
    return [{"type": "text", "text": part.text} for part in content] or ""


def _chat_tool(tool: FunctionTool) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.name}
    if tool.description is not None:
        function["description"] = tool.description
    if tool.parameters is not None:
        function["parameters"] = tool.parameters
    if tool.strict is not None:
        function["strict"] = tool.strict
    return {"type": "function", "function": function}


def _chat_tool_choice(choice: ToolChoice) -> str | dict[str, Any]:
    if isinstance(choice, FunctionChoice):
        return {"type": "function", "function": {"name": choice.name}}
    return choice


def _response_format(text_format: TextFormat) -> dict[str, Any]:
    if not isinstance(text_format, JsonSchemaFormat):
        return {"type": text_format.type}
    schema: dict[str, Any] = {"name": text_format.name, "schema": text_format.schema_}
    if text_format.description is not None:
        schema["description"] = text_format.description
    if text_format.strict is not None:
        schema["strict"] = text_format.strict
    return {"type": "json_schema", "json_schema": schema}
