"""The /v1 wire format: OpenAI request checks in, official-schema OpenAI objects out.

Rule kept here: a /v1 body carries only fields of the official OpenAI schema. Requests are
checked against the fields the spec defines (an unknown field is a 400, as OpenAI answers);
responses are rebuilt field by field from the engine's output, so no engine extension
(``prompt_token_ids``, ``kv_transfer_params``, ``stop_reason``, ``token_ids``, ``reasoning``...)
and no Zumik field can reach a client. Zumik's own data travels in ``x-zumik-*`` headers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from zumik_serve.engines.protocol import EngineCall
from zumik_serve.errors import EngineError, InvalidRequestError, ModelNotFoundError
from zumik_serve.providers.hints import NO_HINTS, REASONING_EFFORTS, ProviderHints, parse_hints

# Fields of CreateChatCompletionRequest that the engine implements.
CHAT_FIELDS = frozenset(
    {
        "messages",
        "model",
        "stream",
        "stream_options",
        "n",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "stop",
        "seed",
        "logprobs",
        "top_logprobs",
        "response_format",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "user",
        "reasoning_effort",
    }
)
# Fields of CreateCompletionRequest that the engine implements.
COMPLETION_FIELDS = frozenset(
    {
        "model",
        "prompt",
        "stream",
        "stream_options",
        "n",
        "max_tokens",
        "temperature",
        "top_p",
        "stop",
        "seed",
        "logprobs",
        "echo",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "user",
    }
)
# Spec fields that only hosted providers act on (``providers/hints.py`` checks them and says
# which provider route gets which). They never reach a self-hosted engine.
HINT_FIELDS = ProviderHints.FIELDS
# Spec fields this server cannot honour: a clear 400 rather than a silent difference.
UNSUPPORTED_FIELDS = frozenset(
    {
        "audio",
        "modalities",
        "prediction",
        "web_search_options",
        "functions",
        "function_call",
        "best_of",
        "suffix",
    }
)
# Never forwarded from a client: Zumik sets the cache salt itself (tenant isolation).
IGNORED_CLIENT_FIELDS = frozenset({"cache_salt"})

# CompletionUsage.completion_tokens_details in the spec: the counts a response may carry.
COMPLETION_TOKEN_DETAILS = (
    "reasoning_tokens", "accepted_prediction_tokens", "rejected_prediction_tokens", "audio_tokens",
    "text_tokens",
)  # fmt: skip
# The tiers a provider may say it served a request on (ServiceTier in the spec).
SERVICE_TIERS = frozenset({"auto", "default", "flex", "scale", "priority", "fast"})
FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "content_filter", "function_call"})
MAX_JSON_DEPTH = 64


@dataclass(frozen=True)
class PreparedRequest:
    """A checked /v1 request: what goes to the engine, and what shapes the response."""

    call: EngineCall
    engine_body: dict[str, Any]
    model: str
    stream: bool
    include_usage: bool
    hints: ProviderHints = NO_HINTS  # what a provider route may get besides the engine body


class NonFiniteNumberError(ValueError):
    """A number no JSON encoder sends on: ``NaN`` and the infinities (Python's parser takes them,
    JSON does not) or a fraction past a double's range (``1e400``, which Python reads as
    infinity)."""


def _refuse_constant(name: str) -> Any:
    raise NonFiniteNumberError(f"{name}, which JSON does not allow")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: valid JSON, but past a double's range
        raise NonFiniteNumberError(f"the number {text[:40]}, beyond a double's range")
    return value


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """A request's body as a JSON object, or ``InvalidRequestError`` saying what is wrong with it.

    Strict JSON: ``NaN``, the infinities and fractions past a double's range (``1e400``) are
    refused here. Python's parser takes them, and a provider route could not send them on
    (before, that encoding error counted on the route's breaker, shared by every tenant).
    Integers are left to Python's cap on digits: JSON can carry them, and a check per integer
    would triple the parse of a prompt given as token ids; where one is read as a float
    (``qos/deadline.py``), an integer too large for one is a 400 there."""
    if not raw.strip():
        raise InvalidRequestError(
            "The request body is empty; send a JSON object (Content-Type: application/json)."
        )
    try:
        body = json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float)
    except NonFiniteNumberError as exc:
        raise InvalidRequestError(
            f"The JSON body holds {exc.args[0]}; send finite numbers of a sensible size."
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise InvalidRequestError(
            "We could not parse the JSON body of your request. The body must be a valid JSON "
            "object; check quoting and commas."
        ) from None
    except ValueError:  # Python's cap on integer digits (sys.get_int_max_str_digits)
        raise InvalidRequestError(
            "The JSON body holds a number with too many digits; send numbers of a sensible size."
        ) from None
    if not isinstance(body, dict):
        raise InvalidRequestError("The request body must be a JSON object.")
    if _depth(body) > MAX_JSON_DEPTH:
        raise InvalidRequestError(f"The JSON body is nested deeper than {MAX_JSON_DEPTH} levels.")
    return body


def prepare_request(
    call: EngineCall, body: dict[str, Any], served_models: set[str] | frozenset[str] | None = None
) -> PreparedRequest:
    """Check a /v1 body against the spec's fields (and the served models, when given: the
    request pipeline checks the model itself, after resolving an alias to its release)."""
    allowed = CHAT_FIELDS if call is EngineCall.CHAT else COMPLETION_FIELDS
    engine_body: dict[str, Any] = {}
    for key, value in body.items():
        if key in allowed:
            engine_body[key] = value
        elif key in HINT_FIELDS or key in IGNORED_CLIENT_FIELDS:
            continue
        elif key in UNSUPPORTED_FIELDS:
            if value in (None, False, [], {}) or (key == "best_of" and value == 1):
                continue
            raise InvalidRequestError(f"'{key}' is not supported by this server.", param=key)
        else:
            raise InvalidRequestError(f"Unrecognized request argument supplied: {key}", param=key)

    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("you must provide a model parameter", param="model")
    if served_models is not None and model not in served_models:
        raise ModelNotFoundError(
            f"The model '{model}' does not exist or you do not have access to it. "
            f"GET /v1/models lists the models you can use.",
            param="model",
        )
    required = "messages" if call is EngineCall.CHAT else "prompt"
    if required not in body:
        raise InvalidRequestError(f"Missing required parameter: '{required}'.", param=required)
    if call is EngineCall.CHAT and (not isinstance(body["messages"], list) or not body["messages"]):
        raise InvalidRequestError("'messages' must be a non-empty array.", param="messages")

    stream = body.get("stream") is True
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequestError("'stream_options' must be an object.", param="stream_options")
    include_usage = bool(stream and options and options.get("include_usage") is True)
    if options is not None and not stream:
        raise InvalidRequestError(
            "'stream_options' is only allowed when 'stream' is true.", param="stream_options"
        )
    if stream:
        # The engine or provider always ends a stream with its usage: the rate settles on the
        # tokens used and the reuse figures count the cached ones. The client sees that chunk
        # only when it asked (``include_usage``; ``StreamRenderer``). Only the spec's keys:
        # vLLM's continuous_usage_stats never reaches the engine.
        engine_body["stream_options"] = {"include_usage": True}
    effort = engine_body.get("reasoning_effort")
    if effort is not None and not (isinstance(effort, str) and effort in REASONING_EFFORTS):
        raise InvalidRequestError(
            f"reasoning_effort must be one of: {', '.join(sorted(REASONING_EFFORTS))}.",
            param="reasoning_effort",
        )
    hints = parse_hints(body)
    if call is EngineCall.COMPLETION and hints is not NO_HINTS:  # the legacy endpoint has no hints
        hints = ProviderHints(prompt_cache_key=hints.prompt_cache_key)
    return PreparedRequest(
        call=call, engine_body=engine_body, model=model, stream=stream, include_usage=include_usage,
        hints=hints,
    )  # fmt: skip


def render_error(message: str, type_: str, param: str | None, code: str | None) -> dict[str, Any]:
    """The OpenAI error object: all four keys, ``code`` a string or null."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def render_stream_error(error: Mapping[str, Any]) -> dict[str, Any]:
    """An engine's in-stream error as an OpenAI error object, with OpenAI's type names.

    After the first byte the status is already 200, so the error type carries the meaning:
    a client fault stays ``invalid_request_error``, anything else is ``server_error``.
    """
    raw_type = str(error.get("type") or "")
    client_fault = raw_type in ("invalid_request_error", "BadRequestError") or error.get("code") == 400
    detail = str(error.get("message") or "no detail").strip()
    message = (
        detail
        if client_fault
        else f"The engine failed while streaming ({detail}); the output is incomplete. Retry the request."
    )
    return render_error(
        message=message,
        type_="invalid_request_error" if client_fault else "server_error",
        param=error.get("param") if isinstance(error.get("param"), str) else None,
        code=None if client_fault else "engine_error",
    )


# --- responses ---------------------------------------------------------------------------


def render_chat_completion(body: Mapping[str, Any], model: str) -> dict[str, Any]:
    choices = []
    for choice in body.get("choices") or []:
        message = choice.get("message") or {}
        rendered_message: dict[str, Any] = {
            "role": "assistant",
            "content": message.get("content"),
            "refusal": message.get("refusal"),
        }
        tool_calls = [_tool_call(call) for call in message.get("tool_calls") or []]
        if tool_calls:
            rendered_message["tool_calls"] = tool_calls
        choices.append(
            {
                "index": choice.get("index", 0),
                "message": rendered_message,
                "logprobs": _chat_logprobs(choice.get("logprobs")),
                "finish_reason": _finish_reason(choice.get("finish_reason")),
            }
        )
    return _envelope(body, "chat.completion", model, choices)


def render_completion(body: Mapping[str, Any], model: str) -> dict[str, Any]:
    choices = [
        {
            "index": choice.get("index", 0),
            "text": choice.get("text") or "",
            "logprobs": _completion_logprobs(choice.get("logprobs")),
            "finish_reason": _finish_reason(choice.get("finish_reason")),
        }
        for choice in body.get("choices") or []
    ]
    return _envelope(body, "text_completion", model, choices)


def _envelope(body: Mapping[str, Any], object_name: str, model: str, choices: list[Any]) -> dict[str, Any]:
    """The fields a whole response shares around its choices."""
    response: dict[str, Any] = {
        "id": body["id"],
        "object": object_name,
        "created": body["created"],
        "model": model,
        "choices": choices,
    }
    usage = render_usage(body.get("usage"))
    if usage is not None:
        response["usage"] = usage
    if body.get("system_fingerprint"):
        response["system_fingerprint"] = body["system_fingerprint"]
    if _service_tier(body) is not None:  # the tier a provider served it on
        response["service_tier"] = _service_tier(body)
    return response


def render_usage(usage: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not usage:
        return None
    rendered: dict[str, Any] = {
        "prompt_tokens": int(usage.get("prompt_tokens") or 0),
        "completion_tokens": int(usage.get("completion_tokens") or 0),
        "total_tokens": int(usage.get("total_tokens") or 0),
    }
    details = usage.get("prompt_tokens_details")
    if isinstance(details, Mapping) and details.get("cached_tokens") is not None:
        rendered["prompt_tokens_details"] = {"cached_tokens": int(details["cached_tokens"])}
    output = usage.get("completion_tokens_details")
    if isinstance(output, Mapping):  # a provider's reasoning tokens: what a reasoning model bills
        kept = {name: int(output[name]) for name in COMPLETION_TOKEN_DETAILS if _is_int(output.get(name))}
        if kept:
            rendered["completion_tokens_details"] = kept
    return rendered


def _service_tier(body: Mapping[str, Any]) -> str | None:
    """The tier a provider says it served on, when it is one of the spec's."""
    tier = body.get("service_tier")
    return tier if isinstance(tier, str) and tier in SERVICE_TIERS else None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def cached_tokens(usage: Mapping[str, Any] | None) -> int | None:
    """``usage.prompt_tokens_details.cached_tokens`` of a rendered usage object, if present."""
    if not usage:
        return None
    details = usage.get("prompt_tokens_details")
    if not isinstance(details, Mapping) or details.get("cached_tokens") is None:
        return None
    return int(details["cached_tokens"])


class StreamRenderer:
    """Renders one engine stream chunk by chunk into official ``*.chunk`` objects.

    ``render(chunk)`` returns the object to send, or None for a chunk that carries nothing a
    client may see. With ``include_usage``, every chunk carries ``usage: null`` except the final
    usage chunk (choices ``[]``), as the spec describes.
    """

    def __init__(self, call: EngineCall, model: str, include_usage: bool) -> None:
        self._call = call
        self._model = model
        self._include_usage = include_usage

    def render(self, chunk: Mapping[str, Any]) -> dict[str, Any] | None:
        raw_choices = chunk.get("choices") or []
        choices = [
            self._chat_choice(choice) if self._call is EngineCall.CHAT else self._text_choice(choice)
            for choice in raw_choices
        ]
        usage = render_usage(chunk.get("usage")) if self._include_usage else None
        if not choices and usage is None:
            return None
        rendered: dict[str, Any] = {
            "id": chunk["id"],
            "object": "chat.completion.chunk" if self._call is EngineCall.CHAT else "text_completion",
            "created": chunk["created"],
            "model": self._model,
            "choices": choices,
        }
        if chunk.get("system_fingerprint"):
            rendered["system_fingerprint"] = chunk["system_fingerprint"]
        if _service_tier(chunk) is not None:
            rendered["service_tier"] = _service_tier(chunk)
        if self._include_usage:
            rendered["usage"] = usage if not choices else None
        return rendered

    def _chat_choice(self, choice: Mapping[str, Any]) -> dict[str, Any]:
        delta = choice.get("delta") or {}
        rendered_delta: dict[str, Any] = {}
        if delta.get("role"):
            rendered_delta["role"] = delta["role"]
        if delta.get("content") is not None:
            rendered_delta["content"] = delta["content"]
        if delta.get("refusal") is not None:
            rendered_delta["refusal"] = delta["refusal"]
        if delta.get("tool_calls"):
            rendered_delta["tool_calls"] = [_tool_call_delta(call) for call in delta["tool_calls"]]
        return {
            "index": choice.get("index", 0),
            "delta": rendered_delta,
            "logprobs": _chat_logprobs(choice.get("logprobs")),
            "finish_reason": _finish_reason(choice.get("finish_reason"), allow_none=True),
        }

    def _text_choice(self, choice: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "index": choice.get("index", 0),
            "text": choice.get("text") or "",
            "logprobs": _completion_logprobs(choice.get("logprobs")),
            "finish_reason": _finish_reason(choice.get("finish_reason"), allow_none=True),
        }


class EngineAbortedError(EngineError):
    """The engine ended a choice without a valid finish reason (aborted or failed)."""


def _finish_reason(value: Any, *, allow_none: bool = False) -> str | None:
    if value is None and allow_none:
        return None
    if value in FINISH_REASONS:
        return str(value)
    raise EngineAbortedError(
        f"The engine stopped the generation abnormally (finish reason {value!r}). Retry the "
        "request; if it keeps failing, check the server logs."
    )


def _tool_call(call: Mapping[str, Any]) -> dict[str, Any]:
    function = call.get("function") or {}
    return {
        "id": call.get("id"),
        "type": "function",
        "function": {"name": function.get("name"), "arguments": function.get("arguments") or ""},
    }


def _tool_call_delta(call: Mapping[str, Any]) -> dict[str, Any]:
    rendered: dict[str, Any] = {"index": call.get("index", 0)}
    if call.get("id"):
        rendered["id"] = call["id"]
        rendered["type"] = "function"
    function = call.get("function") or {}
    rendered_function = {key: function[key] for key in ("name", "arguments") if function.get(key) is not None}
    if rendered_function:
        rendered["function"] = rendered_function
    return rendered


def _chat_logprobs(logprobs: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not logprobs:
        return None

    def token(entry: Mapping[str, Any]) -> dict[str, Any]:
        return {"token": entry["token"], "logprob": entry["logprob"], "bytes": entry.get("bytes")}

    content = [
        {**token(entry), "top_logprobs": [token(top) for top in entry.get("top_logprobs") or []]}
        for entry in logprobs.get("content") or []
    ]
    return {"content": content, "refusal": None}


def _completion_logprobs(logprobs: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not logprobs:
        return None
    return {
        "text_offset": list(logprobs.get("text_offset") or []),
        "token_logprobs": list(logprobs.get("token_logprobs") or []),
        "tokens": list(logprobs.get("tokens") or []),
        "top_logprobs": list(logprobs.get("top_logprobs") or []),
    }


def _depth(value: Any, limit: int = MAX_JSON_DEPTH + 1) -> int:
    """Nesting depth of a parsed JSON value, counted without recursion, stopping past ``limit``."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                return deepest
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
    return deepest
