"""The body of ``POST /v1/responses``: the part of OpenAI's ``CreateResponse`` that Zumik runs,
parsed into frozen values (``parse_request``).

    supported      model, input, instructions, previous_response_id, store, stream, tools
                   (function tools), tool_choice, parallel_tool_calls, temperature, top_p,
                   max_output_tokens, text (format), metadata, reasoning (effort), user,
                   prompt_cache_key, safety_identifier
    hints          HINT_FIELDS and text.verbosity: provider hints, as in chat completions
                   (``providers/hints.py``); no effect on a self-hosted engine
    unsupported    UNSUPPORTED_FIELDS: a 400 unless the value asks for nothing
    input          a string (one user message) or input items (``items.py``)
    kinds          UNSUPPORTED_TOOL_TYPES and UNSUPPORTED_TOOL_CHOICE_TYPES: 400s

Rules kept here, all through ``validation.parse_model`` (and ``body.py`` for nested parts): a bad
body is a 400 ``invalid_request_error`` whose ``param`` is the path of the value to fix, dotted
like every Zumik error (``input.2.content.0.type``, ``tools.1.type``); an unknown field is named
before any other problem; a message never repeats what was sent, except the spec's own name of a
kind that is refused; a spec field Zumik cannot honour is refused, never dropped in silence,
unless its value asks for nothing (null, false, empty, the spec's neutral value).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from zumik_serve.providers.hints import (
    MAX_SAFETY_IDENTIFIER_CHARS,
    PromptCacheOptions,
    ReasoningEffort,
    check_metadata,
)
from zumik_serve.responses.body import Unsupported, Wire, by_type, refuse_unsupported, validated
from zumik_serve.responses.items import InputItem, MessageItem, parse_input_items
from zumik_serve.validation import FieldRuleError, parse_model

MIN_OUTPUT_TOKENS = 16  # the spec's minimum for max_output_tokens

ToolChoiceMode = Literal["none", "auto", "required"]


UNSUPPORTED_FIELDS: Mapping[str, Unsupported] = {
    "background": Unsupported(
        "Background responses are not supported: a response runs while its request is open. "
        "Send false or omit 'background'."
    ),
    "context_management": Unsupported("Context management (compaction) is not supported; omit it."),
    "conversation": Unsupported(
        "Conversations are not supported: chain responses with 'previous_response_id'."
    ),
    "include": Unsupported(
        "'include' is not supported: a response carries no extra output data (no logprobs, "
        "sources or encrypted reasoning). Omit it or send []."
    ),
    "max_tool_calls": Unsupported(
        "'max_tool_calls' is not supported: there are no built-in tools, and your code runs the "
        "function calls, so it decides when to stop. Omit it."
    ),
    "moderation": Unsupported("Moderation is not supported; omit 'moderation'."),
    "prompt": Unsupported("Prompt templates are not supported: send 'instructions' and 'input'."),
    "service_tier": Unsupported(
        "Service tiers other than 'auto' and 'default' are not supported; choose a Zumik QoS class "
        "with the x-zumik-qos header.",
        accepted=("auto", "default"),
    ),
    "stream_options": Unsupported(
        "'stream_options' is not supported: stream events never carry obfuscation padding. Omit it.",
        name_key=True,
    ),
    "top_logprobs": Unsupported(
        "'top_logprobs' is not supported by /v1/responses, which returns no log probabilities; "
        "/v1/chat/completions returns them ('logprobs', 'top_logprobs').",
        accepted=(0,),
    ),
    "truncation": Unsupported(
        "'auto' truncation is not supported: an input longer than the model's context is a 400; "
        "shorten it, or send 'disabled'.",
        accepted=("disabled",),
    ),
}

# Provider hints, as /v1/chat/completions takes them (``providers/hints.py``): a provider route
# may get them; a self-hosted engine's prompt caching is Zumik's own (KV tiers).
HINT_FIELDS: Mapping[str, str] = {
    "prompt_cache_retention": "a provider route's prompt cache retention",
    "prompt_cache_options": "a provider route's prompt cache options",
}

# The spec's other kinds of tools and of tool choices: each a 400 naming its ``type``.
UNSUPPORTED_TOOL_TYPES = (
    "apply_patch", "code_interpreter", "computer", "computer_use_preview", "custom", "file_search",
    "image_generation", "local_shell", "mcp", "namespace", "programmatic_tool_calling", "shell",
    "tool_search", "web_search", "web_search_2025_08_26", "web_search_preview",
    "web_search_preview_2025_03_11",
)  # fmt: skip
UNSUPPORTED_TOOL_CHOICE_TYPES = (
    "allowed_tools", "apply_patch", "code_interpreter", "computer", "computer_use",
    "computer_use_preview", "custom", "file_search", "image_generation", "mcp",
    "programmatic_tool_calling", "shell", "web_search_preview", "web_search_preview_2025_03_11",
)  # fmt: skip


# --- tools and formats --------------------------------------------------------------------


class FunctionTool(Wire):
    """A function the model may call (``FunctionTool``): the only kind of tool Zumik runs."""

    UNSUPPORTED: ClassVar[Mapping[str, Unsupported]] = {
        "output_schema": Unsupported("Function output schemas are not supported; omit 'output_schema'."),
        "defer_loading": Unsupported("Deferred tool loading (tool search) is not supported; omit it."),
        "allowed_callers": Unsupported(
            "Programmatic tool calling is not supported; omit 'allowed_callers'.", accepted=(["direct"],)
        ),
    }

    type: Literal["function"]
    name: Annotated[StrictStr, Field(min_length=1)]
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None
    output_schema: None = None  # UNSUPPORTED
    defer_loading: None = None  # UNSUPPORTED
    allowed_callers: None = None  # UNSUPPORTED

    @field_validator(*UNSUPPORTED, mode="plain")
    @classmethod
    def _refuse(cls, value: Any, info: ValidationInfo) -> None:
        return refuse_unsupported(cls, value, info)


class FunctionChoice(Wire):
    """``tool_choice: {"type": "function", "name": ...}``: the model must call that function."""

    type: Literal["function"]
    name: Annotated[StrictStr, Field(min_length=1)]


ToolChoice = ToolChoiceMode | FunctionChoice
TOOL_CHOICE_MODES: tuple[ToolChoiceMode, ...] = ("none", "auto", "required")
_REFUSED_TOOLS = {
    kind: f"'{kind}' tools are not supported by this server; only 'function' tools are."
    for kind in UNSUPPORTED_TOOL_TYPES
}
_REFUSED_TOOL_CHOICES = {
    kind: f"tool_choice '{kind}' is not supported by this server; choose 'none', 'auto', 'required' "
    "or a function."
    for kind in UNSUPPORTED_TOOL_CHOICE_TYPES
}


class PlainTextFormat(Wire):
    type: Literal["text"]


class JsonObjectFormat(Wire):
    type: Literal["json_object"]


class JsonSchemaFormat(Wire):
    """Structured output: the answer is JSON that ``schema`` describes."""

    type: Literal["json_schema"]
    name: Annotated[StrictStr, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    schema_: dict[str, Any] = Field(alias="schema")
    description: StrictStr | None = None
    strict: StrictBool | None = None


TextFormat = PlainTextFormat | JsonObjectFormat | JsonSchemaFormat
FORMAT_TYPES: Mapping[str, type[TextFormat]] = {
    "text": PlainTextFormat,
    "json_object": JsonObjectFormat,
    "json_schema": JsonSchemaFormat,
}


class TextConfig(Wire):
    """``text``: the answer's format. ``verbosity`` is a provider hint, as in chat
    (``providers/hints.py``): no effect on a self-hosted engine."""

    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None

    @field_validator("format", mode="plain")
    @classmethod
    def _format(cls, value: Any) -> TextFormat | None:
        return None if value is None else by_type(value, "format", FORMAT_TYPES, {})


_NO_SUMMARY = (
    "Reasoning summaries are not supported: a response carries no reasoning items. Omit "
    "'reasoning.{name}' or send null."
)


class ReasoningConfig(Wire):
    """``reasoning``: ``effort`` runs (chat's ``reasoning_effort``: vLLM's own for a self-hosted
    engine, the provider's for a provider route); summaries and modes are not supported."""

    UNSUPPORTED: ClassVar[Mapping[str, Unsupported]] = {
        "summary": Unsupported(_NO_SUMMARY.format(name="summary")),
        "generate_summary": Unsupported(_NO_SUMMARY.format(name="generate_summary")),
        "mode": Unsupported("Reasoning modes are not supported; omit 'reasoning.mode'."),
        "context": Unsupported(
            "Reasoning context modes are not supported: no reasoning item is carried to a later "
            "turn. Omit 'reasoning.context' or send 'auto'.",
            accepted=("auto",),
        ),
    }

    effort: ReasoningEffort | None = None
    summary: None = None  # UNSUPPORTED
    generate_summary: None = None  # UNSUPPORTED
    mode: None = None  # UNSUPPORTED
    context: None = None  # UNSUPPORTED

    @field_validator(*UNSUPPORTED, mode="plain")
    @classmethod
    def _refuse(cls, value: Any, info: ValidationInfo) -> None:
        return refuse_unsupported(cls, value, info)


# --- the request --------------------------------------------------------------------------


class ResponsesRequest(Wire):
    """A checked ``POST /v1/responses`` body.

    ``store``, ``stream`` and ``parallel_tool_calls`` sent as null take the spec's default. The
    fields of ``HINT_FIELDS`` are provider hints (as in chat); those of ``UNSUPPORTED_FIELDS``
    hold None once parsed (a value that asked for anything was refused).
    """

    HINTS: ClassVar[Mapping[str, str]] = {
        "model": "'model' is required: the id of a served model or alias (GET /v1/models).",
    }
    UNSUPPORTED: ClassVar[Mapping[str, Unsupported]] = UNSUPPORTED_FIELDS

    model: Annotated[StrictStr, Field(min_length=1)]
    input: StrictStr | tuple[InputItem, ...]
    instructions: StrictStr | None = None
    previous_response_id: Annotated[StrictStr, Field(min_length=1)] | None = None
    store: StrictBool = True
    stream: StrictBool = False
    tools: tuple[FunctionTool, ...] = ()
    tool_choice: ToolChoice = "auto"
    parallel_tool_calls: StrictBool = True
    temperature: Annotated[float, Field(strict=True, ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(strict=True, ge=0, le=1)] | None = None
    max_output_tokens: Annotated[StrictInt, Field(ge=MIN_OUTPUT_TOKENS)] | None = None
    text: TextConfig | None = None
    metadata: dict[StrictStr, StrictStr] | None = None
    reasoning: ReasoningConfig | None = None
    user: StrictStr | None = None
    prompt_cache_key: StrictStr | None = None
    safety_identifier: Annotated[StrictStr, Field(max_length=MAX_SAFETY_IDENTIFIER_CHARS)] | None = None
    # HINT_FIELDS
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    prompt_cache_options: PromptCacheOptions | None = None
    # UNSUPPORTED_FIELDS
    background: None = None
    context_management: None = None
    conversation: None = None
    include: None = None
    max_tool_calls: None = None
    moderation: None = None
    prompt: None = None
    service_tier: None = None
    stream_options: None = None
    top_logprobs: None = None
    truncation: None = None

    @field_validator(*UNSUPPORTED_FIELDS, mode="plain")
    @classmethod
    def _refuse(cls, value: Any, info: ValidationInfo) -> None:
        return refuse_unsupported(cls, value, info)

    @field_validator("store", "stream", "parallel_tool_calls", mode="before")
    @classmethod
    def _null_is_default(cls, value: Any, info: ValidationInfo) -> Any:
        return cls.model_fields[str(info.field_name)].default if value is None else value

    @field_validator("input", mode="plain")
    @classmethod
    def _input(cls, value: Any) -> str | tuple[InputItem, ...]:
        return value if isinstance(value, str) else parse_input_items(value)

    @field_validator("tools", mode="plain")
    @classmethod
    def _tools(cls, value: Any) -> tuple[FunctionTool, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            raise FieldRuleError("tools", "'tools' must be an array of function tools.")
        return tuple(
            by_type(tool, f"tools.{i}", {"function": FunctionTool}, _REFUSED_TOOLS)
            for i, tool in enumerate(value)
        )

    @field_validator("tool_choice", mode="plain")
    @classmethod
    def _tool_choice(cls, value: Any) -> ToolChoice:
        if value is None:
            return "auto"
        for mode in TOOL_CHOICE_MODES:
            if value == mode:
                return mode
        if isinstance(value, str):
            raise FieldRuleError(
                "tool_choice", "'tool_choice' must be 'none', 'auto', 'required' or a function."
            )
        return by_type(value, "tool_choice", {"function": FunctionChoice}, _REFUSED_TOOL_CHOICES)

    @field_validator("text", mode="plain")
    @classmethod
    def _text(cls, value: Any) -> TextConfig | None:
        return None if value is None else validated(TextConfig, value, "text")

    @field_validator("reasoning", mode="plain")
    @classmethod
    def _reasoning(cls, value: Any) -> ReasoningConfig | None:
        return None if value is None else validated(ReasoningConfig, value, "reasoning")

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        check_metadata(value)
        return value

    @model_validator(mode="after")
    def _tool_choice_fits_the_tools(self) -> ResponsesRequest:
        choice = self.tool_choice
        if choice == "required" and not self.tools:
            raise FieldRuleError("tool_choice", "tool_choice 'required' needs at least one tool in 'tools'.")
        if isinstance(choice, FunctionChoice) and choice.name not in {tool.name for tool in self.tools}:
            raise FieldRuleError("tool_choice.name", "tool_choice names a function that is not in 'tools'.")
        return self

    def input_items(self) -> tuple[InputItem, ...]:
        """The input as items: a string is one user message."""
        if isinstance(self.input, str):
            return (MessageItem(role="user", content=self.input),)
        return self.input


def parse_request(body: Any) -> ResponsesRequest:
    """A parsed JSON body as a ``ResponsesRequest``, or a 400 ``InvalidRequestError``."""
    return parse_model(ResponsesRequest, body)
