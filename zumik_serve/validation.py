"""Request bodies into typed models: a pydantic ``ValidationError`` becomes Zumik's 400.

Rules kept here, for every body of every surface:

- the error names the field (``param``: its location joined with ".", e.g. ``input.0.role``, at
  most ``MAX_NAME_CHARS``), and never echoes the rejected value (a body may hold secrets or
  megabytes);
- an unknown field is named before any other problem (the first by name, so the answer does not
  depend on the order a client sent its keys), with the allowed fields;
- otherwise the first problem, worded by the model's ``HINTS`` for that field when it has one,
  by a validator's ``FieldRuleError`` or ``ValueError``, else by pydantic's own message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from zumik_serve.errors import InvalidRequestError

M = TypeVar("M", bound=BaseModel)
MAX_NAME_CHARS = 64


class FieldRuleError(ValueError):
    """Raised by a validator when a rule across fields is broken: ``param`` is the field to fix,
    ``message`` what to send instead."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


def parse_model(model: type[M], data: Any) -> M:
    """``data`` (a parsed JSON body) validated into ``model``, or an ``InvalidRequestError``."""
    if not isinstance(data, Mapping):
        raise InvalidRequestError("The request body must be a JSON object.")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid_request(model, exc) from None


def invalid_request(model: type[BaseModel], exc: ValidationError) -> InvalidRequestError:
    errors = exc.errors(include_url=False, include_input=False)
    unknown = sorted(_param(error) or "" for error in errors if error["type"] == "extra_forbidden")
    if unknown:
        name, allowed = unknown[0], ", ".join(sorted(model.model_fields))
        return InvalidRequestError(f"unknown field '{name}'; allowed fields: {allowed}", param=name)
    error = errors[0]
    rule = error.get("ctx", {}).get("error")
    if isinstance(rule, FieldRuleError):
        return InvalidRequestError(rule.message, param=rule.param)
    param = _param(error)
    if param is None:
        return InvalidRequestError("The request body must be a JSON object.")
    hints: Mapping[str, str] = getattr(model, "HINTS", {})
    hint = hints.get(str(error["loc"][0]))
    if hint is not None:
        return InvalidRequestError(hint, param=param)
    if error["type"] == "missing":
        return InvalidRequestError(f"'{param}' is required.", param=param)
    if error["type"] == "value_error" and rule is not None:  # a validator's own words
        return InvalidRequestError(str(rule), param=param)
    return InvalidRequestError(f"Invalid value for '{param}': {error['msg']}.", param=param)


def _param(error: ErrorDetails) -> str | None:
    return ".".join(str(part) for part in error["loc"])[:MAX_NAME_CHARS] or None
