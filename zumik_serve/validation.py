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
from zumik_serve.ids import HandleKind, handle_kind

M = TypeVar("M", bound=BaseModel)
MAX_NAME_CHARS = 64
MAX_PER_PAGE = 100
DEFAULT_PER_PAGE = 20


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


def page_query(limit: str | None, after: str | None, kind: HandleKind, noun: str) -> tuple[int, str | None]:
    """A list endpoint's query: ``limit`` a whole number 1..``MAX_PER_PAGE`` (default
    ``DEFAULT_PER_PAGE``), ``after`` the last id of the previous page, a ``kind`` handle (absent:
    from the newest). A 400 naming the parameter otherwise."""
    count = DEFAULT_PER_PAGE
    if limit is not None:
        if not (limit.isascii() and limit.isdigit() and len(limit) <= 3 and 1 <= int(limit) <= MAX_PER_PAGE):
            message = f"limit must be a whole number from 1 to {MAX_PER_PAGE}."
            raise InvalidRequestError(message, param="limit")
        count = int(limit)
    if after is not None and handle_kind(after) is not kind:
        raise InvalidRequestError(
            f"after must be a {noun} id ({kind.value}_…): the last_id of the page before.", param="after"
        )
    return count, after
