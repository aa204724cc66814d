"""The parsing rules every part of a Responses body shares (``request.py``, ``items.py``).

- A part is a frozen pydantic model (``Wire``) that forbids unknown fields.
- A part chosen by its ``type`` (an input item, a content part, a tool) is parsed by ``by_type``:
  a kind the spec defines and Zumik does not run is refused with its own message, naming
  ``<path>.type``; an unknown kind lists the supported ones.
- A nested part's problem is a ``FieldRuleError`` whose ``param`` is its path from the body's
  root (``input.2.content.0.type``), worded as ``validation.invalid_request`` words it.
- A spec field Zumik does not implement (``Unsupported``) passes only when its value asks for
  nothing; it is never dropped in silence.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo

from zumik_serve.validation import MAX_NAME_CHARS, FieldRuleError, invalid_request

W = TypeVar("W", bound="Wire")


@dataclass(frozen=True)
class Unsupported:
    """A field of the spec that Zumik does not implement.

    A value that asks for nothing passes and has no effect: null, false, an empty array, an object
    whose values all ask for nothing, or one of ``accepted`` (the spec's neutral values, such as
    ``truncation: "disabled"``). Any other value is a 400 with ``reason`` as the message, naming
    the field, or with ``name_key`` (an object of options) the first key inside it that asks for
    something (``reasoning.effort``).
    """

    reason: str
    accepted: tuple[object, ...] = ()
    name_key: bool = False

    def accepts(self, value: Any) -> bool:
        return asks_nothing(value) or any(type(value) is type(ok) and value == ok for ok in self.accepted)


def asks_nothing(value: Any) -> bool:
    """Null, false, an empty array, or an object whose values all ask for nothing."""
    if isinstance(value, dict):
        return all(asks_nothing(inner) for inner in value.values())
    return value is None or value is False or (isinstance(value, list) and not value)


class Wire(BaseModel):
    """A part of the request body. ``HINTS`` words, per field, the 400 for a missing or mistyped
    value; ``UNSUPPORTED`` lists the spec fields the model refuses unless they ask for nothing."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    HINTS: ClassVar[Mapping[str, str]] = {}
    UNSUPPORTED: ClassVar[Mapping[str, Unsupported]] = {}


def refuse_unsupported(model: type[Wire], value: Any, info: ValidationInfo) -> None:
    """The plain validator of an ``UNSUPPORTED`` field: None when the value asks for nothing."""
    name = str(info.field_name)
    rule = model.UNSUPPORTED[name]
    if rule.accepts(value):
        return None
    param = name
    if rule.name_key and isinstance(value, dict):
        param = next((f"{name}.{key}" for key, inner in value.items() if not asks_nothing(inner)), name)
    raise FieldRuleError(param[:MAX_NAME_CHARS], rule.reason)


def validated(model: type[W], value: Any, where: str) -> W:
    """``value`` validated as ``model``; a problem is a ``FieldRuleError`` whose param is the path
    from the body's root (``where`` + the path inside ``value``), worded by ``invalid_request``."""
    if not isinstance(value, Mapping):
        raise FieldRuleError(where, f"'{where}' must be an object.")
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        error = invalid_request(model, exc)
        message = error.message
        for name, field in model.model_fields.items():  # fields as the body spells them
            if field.alias and field.alias != name:
                message = message.replace(name, field.alias)
        if not error.param:
            raise FieldRuleError(where, message) from None
        param = f"{where}.{error.param}"[:MAX_NAME_CHARS]
        # The message names the field as the model saw it; name it from the body's root.
        raise FieldRuleError(param, message.replace(f"'{error.param}'", f"'{param}'")) from None


def by_type(
    value: Any,
    where: str,
    kinds: Mapping[str, type[W]],
    refused: Mapping[str, str],
    default: str | None = None,
) -> W:
    """``value`` validated as the model its ``type`` names (``default`` when it has none).

    A type in ``refused`` is a 400 with that message; any other unknown type is a 400 listing
    the supported ones. Either names ``<where>.type``.
    """
    if not isinstance(value, Mapping):
        raise FieldRuleError(where, f"'{where}' must be an object.")
    kind = value.get("type", default)
    if isinstance(kind, str) and kind in kinds:
        return validated(kinds[kind], value, where)
    param = f"{where}.type"
    if isinstance(kind, str) and kind in refused:
        raise FieldRuleError(param, refused[kind])
    raise FieldRuleError(param, f"'{param}' must be one of: {', '.join(kinds)}.")
