"""The ``Response`` object: a whole chat answer rendered as OpenAI's Responses object, and the
parts the stream events reuse (output items, usage, the object at each status).

    chat finish_reason          status       incomplete_details
    stop, tool_calls            completed    null
    length                      incomplete   {"reason": "max_output_tokens"}
    content_filter              incomplete   {"reason": "content_filter"}
    anything else (an abort)    EngineError: never a made-up outcome

Output items, in order: a ``message`` with one ``output_text`` part when the answer has text (or
has nothing at all: an empty message, not an empty output), then one ``function_call`` per tool
call. Every item is ``completed`` except, in an incomplete response, the last one (the item the
limit cut short).

Rule kept here: a Response carries only keys of the spec's ``Response`` and of the SDK's type, and
all the keys the spec requires (``instructions``, ``metadata``, ``temperature``, ``top_p``,
``tools``, ``tool_choice``... echo the request). Keys the spec marks optional and not nullable
(``usage``, ``user``) are left out rather than sent as null. ``store`` is not a key of the
spec's ``Response`` and is never echoed. Time and ids come in as arguments.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from zumik_serve.errors import EngineError
from zumik_serve.responses.items import ItemStatus
from zumik_serve.responses.request import FunctionChoice, JsonSchemaFormat, ResponsesRequest

ItemIds = Callable[[str], str]  # a fresh item id for a prefix: "msg" -> "msg_..."
Status = Literal["in_progress", "completed", "incomplete", "failed"]

MESSAGE_PREFIX = "msg"
FUNCTION_CALL_PREFIX = "fc"
INCOMPLETE_REASONS: Mapping[str, str | None] = {
    "stop": None,
    "tool_calls": None,
    "function_call": None,
    "length": "max_output_tokens",
    "content_filter": "content_filter",
}


def random_item_id(prefix: str) -> str:
    """An item id shaped like OpenAI's: the prefix, then 48 random hex digits."""
    return f"{prefix}_{secrets.token_hex(24)}"


@dataclass(frozen=True)
class ResponseHead:
    """What every rendering of one response shares: the snapshots in ``response.created`` and
    ``response.in_progress`` and the final object. ``id`` is the response's (``resp_...``),
    ``model`` the model that answers (what /v1/chat/completions would name), ``created_at`` when
    the request arrived (Unix seconds), ``request`` the request whose fields it echoes."""

    id: str
    model: str
    created_at: int
    request: ResponsesRequest


@dataclass(frozen=True)
class ToolCall:
    """One tool call of a chat answer: the call's id (the item's ``call_id``), the function's
    name and its arguments (JSON text, as the model wrote it)."""

    call_id: str
    name: str
    arguments: str


def incomplete_reason(finish_reason: Any) -> str | None:
    """``incomplete_details.reason`` for a chat finish reason (None: the response completed)."""
    if isinstance(finish_reason, str) and finish_reason in INCOMPLETE_REASONS:
        return INCOMPLETE_REASONS[finish_reason]
    raise EngineError(
        f"The engine stopped the generation abnormally (finish reason {str(finish_reason)[:40]!r}). "
        "Retry the request; if it keeps failing, check the server logs."
    )


def render_response(
    head: ResponseHead,
    answer: Mapping[str, Any],
    *,
    completed_at: int,
    new_id: ItemIds = random_item_id,
) -> dict[str, Any]:
    """The Response for a whole chat answer (a ``chat.completion`` as the pipeline returns it;
    its first choice). ``completed_at`` (Unix seconds) is sent only when the status is
    ``completed``; ``new_id`` makes the item ids, message first, then one per tool call."""
    choices = answer.get("choices") or []
    if not choices:
        raise EngineError("The engine returned no choices. Retry the request.")
    choice = choices[0]
    message = choice.get("message") or {}
    reason = incomplete_reason(choice.get("finish_reason"))
    calls = [_tool_call(call) for call in message.get("tool_calls") or []]
    output = output_items(message.get("content") or "", calls, incomplete=reason is not None, new_id=new_id)
    return response_object(
        head,
        status="incomplete" if reason else "completed",
        output=output,
        usage=render_usage(answer.get("usage")),
        incomplete=reason,
        completed_at=None if reason else completed_at,
    )


def output_items(
    text: str, calls: Sequence[ToolCall], *, incomplete: bool, new_id: ItemIds
) -> list[dict[str, Any]]:
    """The output items of an answer with ``text`` and ``calls`` (see the module's docstring)."""
    items: list[dict[str, Any]] = []
    if text or not calls:
        items.append(message_item(new_id(MESSAGE_PREFIX), text, "completed"))
    items.extend(function_call_item(new_id(FUNCTION_CALL_PREFIX), call, "completed") for call in calls)
    if incomplete:
        items[-1] = {**items[-1], "status": "incomplete"}
    return items


def message_item(item_id: str, text: str | None, status: ItemStatus) -> dict[str, Any]:
    """An assistant ``message`` item: one ``output_text`` part, or none when ``text`` is None
    (the item as ``response.output_item.added`` announces it)."""
    content = [] if text is None else [output_text_part(text)]
    return {"id": item_id, "type": "message", "status": status, "content": content, "role": "assistant"}


def output_text_part(text: str) -> dict[str, Any]:
    """An ``output_text`` part: no annotations, and no logprobs (the spec requires the key)."""
    return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}


def function_call_item(item_id: str, call: ToolCall, status: ItemStatus) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "arguments": call.arguments,
        "call_id": call.call_id,
        "name": call.name,
    }


def response_object(
    head: ResponseHead,
    *,
    status: Status,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None = None,
    error: str | None = None,
    incomplete: str | None = None,
    completed_at: int | None = None,
) -> dict[str, Any]:
    """The Response object at ``status``: ``error`` is the message of a failed response (code
    ``server_error``), ``incomplete`` the reason of an incomplete one, ``usage`` a rendered
    usage (left out when unknown: the spec's ``usage`` is not nullable)."""
    request = head.request
    body: dict[str, Any] = {
        "id": head.id,
        "object": "response",
        "created_at": head.created_at,
        "status": status,
        "background": False,
        "completed_at": completed_at,
        "error": None if error is None else {"code": "server_error", "message": error},
        "incomplete_details": None if incomplete is None else {"reason": incomplete},
        "instructions": request.instructions,
        "max_output_tokens": request.max_output_tokens,
        "model": head.model,
        "output": output,
        "parallel_tool_calls": request.parallel_tool_calls,
        "previous_response_id": request.previous_response_id,
        "prompt_cache_key": request.prompt_cache_key,
        "reasoning": {
            "effort": request.reasoning.effort if request.reasoning is not None else None,
            "summary": None,
        },
        "safety_identifier": request.safety_identifier,
        "service_tier": "default",
        "temperature": request.temperature,
        "text": {"format": _text_format(request)},
        "tool_choice": _tool_choice(request),
        "tools": [
            {
                "type": "function",
                "name": tool.name,
                "description": tool.description,
                "parameters": tool.parameters,
                "strict": tool.strict,
            }
            for tool in request.tools
        ],
        "top_p": request.top_p,
        "truncation": "disabled",
        "metadata": dict(request.metadata or {}),
    }
    if usage is not None:
        body["usage"] = usage
    if request.user is not None:
        body["user"] = request.user
    return body


def render_usage(usage: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A chat ``usage`` as the Responses ``usage``, or None when the answer had none.
    ``cache_write_tokens`` (required by the spec) is 0: Zumik bills no cache writes."""
    if not usage:
        return None
    input_tokens = int(usage.get("prompt_tokens") or 0)
    output_tokens = int(usage.get("completion_tokens") or 0)
    cached = _detail(usage.get("prompt_tokens_details"), "cached_tokens")
    reasoning = _detail(usage.get("completion_tokens_details"), "reasoning_tokens")
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": int(usage.get("total_tokens") or input_tokens + output_tokens),
    }


def _detail(details: Any, key: str) -> int:
    return int(details.get(key) or 0) if isinstance(details, Mapping) else 0


def _tool_call(call: Mapping[str, Any]) -> ToolCall:
    function = call.get("function") or {}
    if not call.get("id") or not function.get("name"):
        raise EngineError("The engine returned a tool call without its id or name. Retry the request.")
    arguments = function.get("arguments") or ""
    return ToolCall(call_id=str(call["id"]), name=str(function["name"]), arguments=arguments)


def _text_format(request: ResponsesRequest) -> dict[str, Any]:
    text_format = request.text.format if request.text is not None else None
    if text_format is None:
        return {"type": "text"}
    if not isinstance(text_format, JsonSchemaFormat):
        return {"type": text_format.type}
    echoed: dict[str, Any] = {"type": "json_schema", "name": text_format.name, "schema": text_format.schema_}
    if text_format.description is not None:  # a string in the spec, not nullable
        echoed["description"] = text_format.description
    if text_format.strict is not None:
        echoed["strict"] = text_format.strict
    return echoed


def _tool_choice(request: ResponsesRequest) -> str | dict[str, Any]:
    choice = request.tool_choice
    if isinstance(choice, FunctionChoice):
        return {"type": "function", "name": choice.name}
    return choice
