"""Input items: the messages and function calls a Responses ``input`` (or an earlier response's
``output`` sent back) is made of.

    message               role user | system | developer | assistant; content a string or
                          parts: input_text (user, system, developer), output_text and
                          refusal (assistant)
    function_call         a call the model made: call_id, name, arguments
    function_call_output  what the function returned for call_id: a string or input_text parts

Other kinds the spec defines are refused (``UNSUPPORTED_ITEM_TYPES``, ``UNSUPPORTED_CONTENT_TYPES``)
with a 400 naming ``<path>.type``. Fields a client sends back from an earlier output (``id``,
``status``, ``phase``, annotations, logprobs) are accepted and never reach the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, StrictStr, ValidationInfo, field_validator, model_validator

from zumik_serve.responses.body import Unsupported, W, Wire, by_type, refuse_unsupported
from zumik_serve.validation import FieldRuleError

ItemStatus = Literal["in_progress", "completed", "incomplete"]

UNSUPPORTED_ITEM_TYPES = (
    "additional_tools", "apply_patch_call", "apply_patch_call_output", "code_interpreter_call",
    "compaction", "compaction_trigger", "computer_call", "computer_call_output",
    "custom_tool_call", "custom_tool_call_output", "file_search_call", "image_generation_call",
    "item_reference", "local_shell_call", "local_shell_call_output", "mcp_approval_request",
    "mcp_approval_response", "mcp_call", "mcp_list_tools", "program", "program_output",
    "reasoning", "shell_call", "shell_call_output", "tool_search_call", "tool_search_output",
    "web_search_call",
)  # fmt: skip
UNSUPPORTED_CONTENT_TYPES = ("input_audio", "input_file", "input_image")


# --- content parts ------------------------------------------------------------------------


class InputText(Wire):
    """``input_text``: text of a user, system or developer message, or of a function's output."""

    type: Literal["input_text"]
    text: StrictStr
    prompt_cache_breakpoint: dict[str, Any] | None = None  # a caching hint: no effect here


class OutputText(Wire):
    """``output_text``: text of an assistant message, as an earlier response returned it.
    Its annotations and logprobs are accepted as they came and never reach the model."""

    type: Literal["output_text"]
    text: StrictStr
    annotations: tuple[Any, ...] | None = None
    logprobs: tuple[Any, ...] | None = None


class Refusal(Wire):
    """``refusal``: an assistant's refusal, as an earlier response returned it."""

    type: Literal["refusal"]
    refusal: StrictStr


ContentPart = InputText | OutputText | Refusal
CONTENT_TYPES: Mapping[str, type[ContentPart]] = {
    "input_text": InputText,
    "output_text": OutputText,
    "refusal": Refusal,
}
_REFUSED_CONTENT = {
    kind: f"'{kind}' content is not supported by this server: send text ('input_text')."
    for kind in UNSUPPORTED_CONTENT_TYPES
}


def _content_parts(value: Any, where: str, kinds: Mapping[str, type[W]]) -> tuple[W, ...]:
    if not isinstance(value, list):
        raise FieldRuleError(where, f"'{where}' must be a string or an array of content parts.")
    return tuple(by_type(part, f"{where}.{i}", kinds, _REFUSED_CONTENT) for i, part in enumerate(value))


# --- input items --------------------------------------------------------------------------


class MessageItem(Wire):
    """A message: ``EasyInputMessage``, ``InputMessage``, or an earlier response's
    ``OutputMessage`` sent back as input.

    ``content`` is a string or parts: ``input_text`` for user, system and developer messages,
    ``output_text`` and ``refusal`` for assistant messages (as OpenAI requires). ``id``,
    ``status`` and ``phase`` are accepted, since clients send earlier output back as it came,
    and never reach the model.
    """

    HINTS: ClassVar[Mapping[str, str]] = {
        "role": "'role' must be one of: user, assistant, system, developer.",
    }

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: StrictStr | tuple[ContentPart, ...]
    id: StrictStr | None = None
    status: ItemStatus | None = None
    phase: Literal["commentary", "final_answer"] | None = None

    @field_validator("content", mode="plain")
    @classmethod
    def _content(cls, value: Any) -> str | tuple[ContentPart, ...]:
        return value if isinstance(value, str) else _content_parts(value, "content", CONTENT_TYPES)

    @model_validator(mode="after")
    def _parts_fit_the_role(self) -> MessageItem:
        if isinstance(self.content, str):
            return self
        assistant = self.role == "assistant"
        for index, part in enumerate(self.content):
            if assistant and isinstance(part, InputText):
                raise FieldRuleError(
                    f"content.{index}.type",
                    "assistant messages take 'output_text' and 'refusal' content, not 'input_text'.",
                )
            if not assistant and not isinstance(part, InputText):
                raise FieldRuleError(
                    f"content.{index}.type", f"{self.role} messages take 'input_text' content only."
                )
        return self


class FunctionCallItem(Wire):
    """``function_call``: a call the model made, sent back before its output."""

    UNSUPPORTED: ClassVar[Mapping[str, Unsupported]] = {
        "namespace": Unsupported("Namespaced tools are not supported; omit 'namespace'."),
        "caller": Unsupported(
            "Programmatic tool calling is not supported; omit 'caller'.", accepted=({"type": "direct"},)
        ),
    }

    type: Literal["function_call"]
    call_id: Annotated[StrictStr, Field(min_length=1)]
    name: Annotated[StrictStr, Field(min_length=1)]
    arguments: StrictStr
    id: StrictStr | None = None
    status: ItemStatus | None = None
    namespace: None = None  # UNSUPPORTED
    caller: None = None  # UNSUPPORTED

    @field_validator(*UNSUPPORTED, mode="plain")
    @classmethod
    def _refuse(cls, value: Any, info: ValidationInfo) -> None:
        return refuse_unsupported(cls, value, info)


class FunctionCallOutputItem(Wire):
    """``function_call_output``: what your code's function returned for ``call_id``. ``name``
    repeats the call's and is not needed (the chat tool message names the call by its id)."""

    UNSUPPORTED: ClassVar[Mapping[str, Unsupported]] = FunctionCallItem.UNSUPPORTED

    type: Literal["function_call_output"]
    call_id: Annotated[StrictStr, Field(min_length=1)]
    output: StrictStr | tuple[InputText, ...]
    id: StrictStr | None = None
    name: StrictStr | None = None
    status: ItemStatus | None = None
    namespace: None = None  # UNSUPPORTED
    caller: None = None  # UNSUPPORTED

    @field_validator("output", mode="plain")
    @classmethod
    def _output(cls, value: Any) -> str | tuple[InputText, ...]:
        return value if isinstance(value, str) else _content_parts(value, "output", {"input_text": InputText})

    @field_validator(*UNSUPPORTED, mode="plain")
    @classmethod
    def _refuse(cls, value: Any, info: ValidationInfo) -> None:
        return refuse_unsupported(cls, value, info)


InputItem = MessageItem | FunctionCallItem | FunctionCallOutputItem
ITEM_TYPES: Mapping[str, type[InputItem]] = {
    "message": MessageItem,
    "function_call": FunctionCallItem,
    "function_call_output": FunctionCallOutputItem,
}
_REFUSED_ITEMS = {
    kind: f"'{kind}' input items are not supported by this server; send messages, 'function_call' "
    "and 'function_call_output' items."
    for kind in UNSUPPORTED_ITEM_TYPES
}


def parse_input_items(value: Any, where: str = "input") -> tuple[InputItem, ...]:
    """A list of input items (a message's ``type`` may be left out), or a ``FieldRuleError``
    naming the first bad one from ``where``. Also reads back a response's own ``output``."""
    if not isinstance(value, list):
        raise FieldRuleError(where, f"'{where}' must be a string or an array of input items.")
    return tuple(
        by_type(item, f"{where}.{i}", ITEM_TYPES, _REFUSED_ITEMS, default="message")
        for i, item in enumerate(value)
    )
