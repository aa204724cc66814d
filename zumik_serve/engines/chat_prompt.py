"""The conversation vLLM renders for a /v1 chat request, rebuilt in the gateway, or why it cannot be.

vLLM does not template a chat request's messages as they come: it rebuilds each message
(``vllm/renderers/chat_utils.py`` ``parse_chat_messages``) and adjusts the list before the
template runs (``vllm/renderers/hf.py`` ``safe_apply_chat_template``)::

    message ─► {role, content, name?, task?, tool_call_id? (tool), tools: None (developer)}
      content, by the template's content format (detected from its AST):
        "string"   a string: the text parts joined by "\\n" (None: "")
        "openai"   a list of {"type": "text", "text": ...} (None: []); a tool's: joined, as above
    developer messages, when the template never names the role: become system messages, and
    every system message is merged into one at the front (contents joined by "\\n\\n")

then renders with ``add_generation_prompt`` (default true) and ``continue_final_message=False``
(arguments it leaves None, such as ``documents`` and ``reasoning_effort``, are not passed at
all), and tokenizes without the tokenizer's own special tokens (the template writes them).

``engine_conversation`` rebuilds that list for the requests whose rendering it reproduces
exactly, and names the reason (``ChatFallback``) for any other: tools (a request's tools or an
assistant's tool calls: vLLM renders pydantic dumps of them), a request that changes the
template's arguments, content that is not text, messages it does not model. Such a request
keeps text keys: a worse pick at most, never an error. ``tests/unit/test_chat_keys.py`` holds
the result equal to vLLM's own renderer.
"""

from __future__ import annotations

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


class ChatFallback(Enum):
    """Why a chat request keeps text keys (stable lower-case values: counted by them)."""

    TOOLS = "tools"  # the request's tools, or an assistant message's tool calls
    TEMPLATE_ARGS = "template_args"  # a field that changes the template's arguments
    CONTENT = "content"  # a content part that is not text (multimodal), or odd text
    MESSAGE = "message"  # a role or a message field not modelled here
    ADAPTER = "adapter"  # a LoRA adapter: its name is in the engine's block hashes
    NO_TOKENIZER = "no_tokenizer"  # the gateway cannot load the model's tokenizer
    ENGINE_TEMPLATE = "engine_template"  # the engines render with arguments of their own
    TOO_LARGE = "too_large"  # above the gateway's tokenizing limit
    RENDER_ERROR = "render_error"  # the template failed (vLLM answers the request itself)


@dataclass(frozen=True)
class EngineChat:
    """What vLLM hands the chat template for one request."""

    conversation: tuple[dict[str, Any], ...]
    add_generation_prompt: bool


def engine_conversation(
    body: Mapping[str, Any], *, content_format: ContentFormat, developer_role: bool
) -> EngineChat | ChatFallback:
    """The conversation vLLM templates for ``body`` (a /v1 chat body), or why the gateway does
    not reproduce it. ``content_format``: the template's, as vLLM detects it (found at deploy:
    ``engines/vllm_args.py`` ``chat_content_format``); ``developer_role``: whether the template
    names the developer role (else vLLM makes it a system message)."""
    if body.get("tools") is not None or body.get("functions") is not None:
        return ChatFallback.TOOLS
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
    return EngineChat(tuple(conversation), add_generation_prompt)


def _engine_message(message: Any, content_format: ContentFormat) -> dict[str, Any] | ChatFallback:
    if not isinstance(message, Mapping) or message.get("role") not in ROLES:
        return ChatFallback.MESSAGE
    role = message["role"]
    if role == "assistant" and message.get("tool_calls") is not None:
        return ChatFallback.TOOLS
    if role == "assistant" and message.get("reasoning") is not None:
        return ChatFallback.MESSAGE
    texts = _texts(message.get("content"))
    if texts is None or (role == "system" and any(text.startswith(_BILLING_HEADER) for text in texts)):
        return ChatFallback.CONTENT
    content: str | list[dict[str, str]]
    if content_format == "string" or role == "tool":
        content = "\n".join(texts)
    else:
        content = [{"type": "text", "text": text} for text in texts]
    rebuilt: dict[str, Any] = {"role": role, "content": content}
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


def _texts(content: Any) -> list[str] | None:
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
