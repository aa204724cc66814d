"""The conversation vLLM renders for a /v1 chat request, rebuilt in the gateway, or why it cannot be.

vLLM does not template a chat request's messages as they come: it rebuilds each message
(``vllm/renderers/chat_utils.py`` ``parse_chat_messages``) and adjusts the list before the
template runs (``vllm/renderers/hf.py`` ``safe_apply_chat_template``)::

    message ─► {role, content, tool_calls? (assistant), reasoning?, reasoning_content? (assistant),
                tool_call_id? (tool), name?, task?, tools: None (developer)}
      content, by the template's content format (detected from its AST):
        "string"   a string: the text parts joined by "\\n" (None: "")
        "openai"   a list of {"type": "text", "text": ...} (None: []); a tool's: joined, as above
      tool_calls: the validated calls (keys in the schema's order, extras after), each function's
        "arguments" JSON text decoded to an object ("", invalid JSON or a non-object: {});
        an empty list is dropped
    developer messages, when the template never names the role: become system messages, and
    every system message is merged into one at the front (contents joined by "\\n\\n")

then renders with ``tools`` (``vllm/renderers/online_renderer.py`` ``render_chat``: each
tool's pydantic dump, ``ChatCompletionToolsParam``: ``description`` and ``parameters`` kept as
None, ``strict`` and ``defer_loading`` only when set; None without tools),
``add_generation_prompt`` (default true) and ``continue_final_message=False`` (arguments it
leaves None, such as ``documents`` and ``reasoning_effort``, are not passed at all), and
tokenizes without the tokenizer's own special tokens (the template writes them).
``tool_choice`` changes no rendering, except "none": then the engines' flag
``exclude_tools_when_tool_choice_none`` decides whether the template sees the tools.

``engine_conversation`` rebuilds that list for the requests whose rendering it reproduces
exactly, and names the reason (``ChatFallback``) for any other: tools it does not reproduce
(a malformed tool or tool call, which vLLM rejects, tools with tool_choice "none", a developer
message's tools, the deprecated ``functions``), a request that changes the template's
arguments, content that is not text, messages it does not model. Such a request keeps text
keys: a worse pick at most, never an error. ``tests/unit/test_chat_keys.py`` holds the result
equal to vLLM's own renderer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal

ContentFormat = Literal["string", "openai"]
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
_BILLING_HEADER = "x-anthropic-billing-header"  # vLLM strips this line from system text
# Body fields that change what vLLM renders (None or absent: the default); tools are their own.
_TEMPLATE_FIELDS = (
    "chat_template", "chat_template_kwargs", "continue_final_message", "documents",
    "reasoning_effort", "add_special_tokens", "truncate_prompt_tokens", "mm_processor_kwargs",
)  # fmt: skip

# FunctionDefinition's fields after ``name``, in its order, and the ones its dump keeps as None.
_FUNCTION_FIELDS: dict[str, type] = {
    "description": str, "parameters": dict, "strict": bool, "defer_loading": bool,
}  # fmt: skip
_KEPT_AS_NONE = frozenset({"description", "parameters"})


class ChatFallback(Enum):
    """Why a chat request keeps text keys (stable lower-case values: counted by them)."""

    TOOLS = "tools"  # tools or tool calls not reproduced (malformed, tool_choice "none")
    TEMPLATE_ARGS = "template_args"  # a field that changes the template's arguments
    CONTENT = "content"  # a content part that is not text (multimodal), or odd text
    MESSAGE = "message"  # a role or a message field not modelled here
    ADAPTER = "adapter"  # a LoRA adapter: its name is in the engine's block hashes
    NO_TOKENIZER = "no_tokenizer"  # the gateway cannot load the model's tokenizer
    ENGINE_TEMPLATE = "engine_template"  # the engines render with arguments of their own
    TOO_LARGE = "too_large"  # above the gateway's tokenizing limit
    RENDER_ERROR = "render_error"  # the template failed (vLLM answers the request itself)
    NO_EVENTS = "no_events"  # the group's engines report no KV events: nothing is tokenized


@dataclass(frozen=True)
class EngineChat:
    """What vLLM hands the chat template for one request. ``tools``: the request's tools as
    vLLM dumps them (None: the request has none; the template gets ``tools=None``)."""

    conversation: tuple[dict[str, Any], ...]
    add_generation_prompt: bool
    tools: tuple[dict[str, Any], ...] | None = None


def engine_conversation(
    body: Mapping[str, Any], *, content_format: ContentFormat, developer_role: bool
) -> EngineChat | ChatFallback:
    """The conversation vLLM templates for ``body`` (a /v1 chat body), or why the gateway does
    not reproduce it. ``content_format``: the template's, as vLLM detects it (found at deploy:
    ``engines/vllm_args.py`` ``chat_content_format``); ``developer_role``: whether the template
    names the developer role (else vLLM makes it a system message)."""
    tools = _engine_tools(body)
    if isinstance(tools, ChatFallback):
        return tools
    if any(body.get(name) not in (None, False, {}) for name in _TEMPLATE_FIELDS):
        return ChatFallback.TEMPLATE_ARGS
    add_generation_prompt = body.get("add_generation_prompt", True)
    messages = body.get("messages")
    if not isinstance(add_generation_prompt, bool) or not isinstance(messages, list):
        return ChatFallback.TEMPLATE_ARGS
    conversation: list[dict[str, Any]] = []
    for message in messages:
        rebuilt = _engine_message(message, content_format)
        if isinstance(rebuilt, ChatFallback):
            return rebuilt
        conversation.append(rebuilt)
    if not developer_role and any(m["role"] == "developer" for m in conversation):
        conversation = _merged_system(conversation)
    return EngineChat(tuple(conversation), add_generation_prompt, tools)


def _engine_tools(body: Mapping[str, Any]) -> tuple[dict[str, Any], ...] | None | ChatFallback:
    """The request's tools as vLLM dumps them for the template (``ChatCompletionToolsParam``)."""
    tools, tool_choice = body.get("tools"), body.get("tool_choice")
    if body.get("functions") is not None:
        return ChatFallback.TOOLS
    if tools is None:  # a tool_choice other than "none" without tools: vLLM rejects the request
        return None if tool_choice in (None, "none") else ChatFallback.TOOLS
    if tool_choice == "none" or not isinstance(tools, list) or not tools:  # []: vLLM rejects it
        return ChatFallback.TOOLS
    dumped = [_engine_tool(tool) for tool in tools]
    return ChatFallback.TOOLS if None in dumped else tuple(d for d in dumped if d is not None)


def _engine_tool(tool: Any) -> dict[str, Any] | None:
    """``ChatCompletionToolsParam(**tool).model_dump()`` (None: vLLM rejects or coerces it):
    fields in the model's order, None kept for ``description`` and ``parameters``, extras
    dropped, a tool's ``defer_loading`` copied to its function when the function has none."""
    if not isinstance(tool, Mapping) or tool.get("type", "function") != "function":
        return None
    function, defer_loading = tool.get("function"), tool.get("defer_loading")
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        return None
    fields = {key: function.get(key) for key in _FUNCTION_FIELDS}
    if fields["defer_loading"] is None:
        fields["defer_loading"] = defer_loading
    checked = [*fields.items(), ("defer_loading", defer_loading)]
    if not all(value is None or isinstance(value, _FUNCTION_FIELDS[key]) for key, value in checked):
        return None  # pydantic would coerce it ("true" to True) or refuse it
    dumped_function = {"name": function["name"]} | {
        key: value for key, value in fields.items() if value is not None or key in _KEPT_AS_NONE
    }
    dumped: dict[str, Any] = {"type": "function", "function": dumped_function}
    if defer_loading is not None:
        dumped["defer_loading"] = defer_loading
    return dumped


def _engine_message(message: Any, content_format: ContentFormat) -> dict[str, Any] | ChatFallback:
    if not isinstance(message, Mapping) or message.get("role") not in ROLES:
        return ChatFallback.MESSAGE
    role = message["role"]
    texts = content_texts(message.get("content"))
    if texts is None or (role == "system" and any(text.startswith(_BILLING_HEADER) for text in texts)):
        return ChatFallback.CONTENT
    content: str | list[dict[str, str]]
    if content_format == "string" or role == "tool":
        content = "\n".join(texts)
    else:
        content = [{"type": "text", "text": text} for text in texts]
    rebuilt: dict[str, Any] = {"role": role, "content": content}
    if role == "assistant":
        extra = _assistant_fields(message)
        if isinstance(extra, ChatFallback):
            return extra
        rebuilt |= extra
    if role == "tool" and "tool_call_id" in message:
        if not isinstance(message["tool_call_id"], str):
            return ChatFallback.MESSAGE
        rebuilt["tool_call_id"] = message["tool_call_id"]
    for name in ("name", "task"):
        if isinstance(message.get(name), str):
            rebuilt[name] = message[name]
    if role == "developer":
        if message.get("tools") is not None:
            return ChatFallback.TOOLS
        rebuilt["tools"] = None
    return rebuilt


def _assistant_fields(message: Mapping[str, Any]) -> dict[str, Any] | ChatFallback:
    """An assistant message's ``tool_calls`` and ``reasoning`` as vLLM hands them on (vLLM reads
    the deprecated ``reasoning_content`` as ``reasoning`` and passes both names)."""
    fields: dict[str, Any] = {}
    calls = message.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            return ChatFallback.TOOLS
        rebuilt = [_engine_tool_call(call) for call in calls]
        if None in rebuilt:
            return ChatFallback.TOOLS
        if rebuilt:  # vLLM drops an empty list
            fields["tool_calls"] = rebuilt
    reasoning = message.get("reasoning")
    if reasoning is None:
        reasoning = message.get("reasoning_content")
    if reasoning is not None:
        if not isinstance(reasoning, str):
            return ChatFallback.MESSAGE
        fields |= {"reasoning": reasoning, "reasoning_content": reasoning}
    return fields


def _engine_tool_call(call: Any) -> dict[str, Any] | None:
    """A function tool call as the template gets it (None: vLLM rejects it): the keys of
    ``ChatCompletionMessageFunctionToolCallParam`` in its order, extras after them in the
    request's order (so for its ``function``), ``arguments`` decoded (vLLM's
    ``_postprocess_messages``)."""
    if not isinstance(call, Mapping) or call.get("type") != "function":
        return None
    function = call.get("function")
    if not isinstance(call.get("id"), str) or not isinstance(function, Mapping):
        return None
    arguments, name = function.get("arguments"), function.get("name")
    if not isinstance(arguments, str) or not isinstance(name, str):
        return None
    rebuilt_function = {"arguments": _arguments(arguments), "name": name}
    rebuilt_function |= {key: value for key, value in function.items() if key not in rebuilt_function}
    rebuilt = {"id": call["id"], "function": rebuilt_function, "type": "function"}
    return rebuilt | {key: value for key, value in call.items() if key not in rebuilt}


def _arguments(text: str) -> dict[str, Any]:
    """vLLM's decoding of a tool call's arguments: a JSON object, else {} (it logs and goes on,
    so that a malformed call in the history does not fail every later turn)."""
    if not text:
        return {}
    try:
        parsed = json.loads(text)
    except (ValueError, RecursionError):  # not JSON, an integer past Python's cap, too deep
        return {}
    return parsed if isinstance(parsed, dict) else {}


def content_texts(content: Any) -> list[str] | None:
    """A content's texts in order (None: one part is not text, or carries more than its text)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        return None
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, Mapping) and part.keys() == {"type", "text"} and part["type"] == "text":
            if not isinstance(part["text"], str):
                return None
            texts.append(part["text"])
        else:
            return None
    return texts


def _merged_system(conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """vLLM's ``_convert_developer_to_system`` then ``_consolidate_system_messages``: developer
    messages become system ones, and every system message is merged into the first place."""
    converted = [
        {key: value for key, value in m.items() if key != "tools"} | {"role": "system"}
        if m["role"] == "developer"
        else m
        for m in conversation
    ]
    systems = [i for i, m in enumerate(converted) if m["role"] == "system"]
    if systems == [0] or not systems:
        return converted
    contents = []
    for i in systems:
        content = converted[i]["content"]
        if isinstance(content, list):
            content = "\n".join(part["text"] for part in content)
        if content:
            contents.append(content)
    rest = [m for m in converted if m["role"] != "system"]
    return [{"role": "system", "content": "\n\n".join(contents)}, *rest]
