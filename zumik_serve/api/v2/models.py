"""Request models of ``/v2`` generation bodies (``extra="forbid"``: an unknown field is a 400
naming it). The models of state, routing and purge bodies live with their features."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, StrictBool, field_validator

from zumik_serve.validation import parse_model

__all__ = ["GenerateBody", "InputMessage", "WarmBody", "parse_model"]

SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "stop", "seed")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputMessage(_Body):
    role: str
    content: str


class GenerateBody(_Body):
    model: str | None = None  # an alias or the served model; None: the served model
    input: list[InputMessage] | None = None  # a string is one user message
    snapshot: str | None = None  # a snapshot whose messages come before ``input``
    stream: StrictBool = False  # server-sent events: text deltas, then the whole answer (``generate.py``)
    # QoS and deadline are checked by admission (their errors name the field there).
    qos: Any = None
    timeout_s: Any = None
    # Sampling goes to the engine as sent; vLLM's own checks answer a bad value with a 400.
    max_tokens: Any = None
    temperature: Any = None
    top_p: Any = None
    stop: Any = None
    seed: Any = None

    def engine_fields(self) -> dict[str, Any]:
        """The engine body's fields: sampling as sent (only those present) and ``messages``."""
        fields = {name: getattr(self, name) for name in SAMPLING_FIELDS if name in self.model_fields_set}
        fields["messages"] = self.messages()
        if self.stream:  # the usage chunk settles the rate and fills the final event's usage
            fields.update(stream=True, stream_options={"include_usage": True})
        return fields

    @field_validator("input", mode="before")
    @classmethod
    def _input_messages(cls, value: Any) -> Any:
        if value is None or isinstance(value, list) and all(_is_message(m) for m in value):
            return value
        if isinstance(value, str):
            return [{"role": "user", "content": value}]
        raise ValueError('\'input\' must be a string or an array of {"role", "content"} messages.')

    def messages(self) -> list[dict[str, Any]]:
        return [{"role": m.role, "content": m.content} for m in self.input or []]


def _is_message(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and set(value) == {"role", "content"}
        and isinstance(value["role"], str)
        and isinstance(value["content"], str)
    )


class WarmBody(_Body):
    """The optional body of ``/v2/snapshots/{id}/warm`` and ``/compile``: their admission."""

    qos: Any = None
    timeout_s: Any = None
