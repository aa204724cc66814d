"""Request bodies into typed models: a pydantic ``ValidationError`` becomes Zumik's 400.

Rule kept here: the error names the field (``param``, dotted for nested ones, e.g.
``input.0.role``) and says what is expected, and never echoes the rejected value (a body may hold
secrets or megabytes); an unknown field lists the allowed ones.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from zumik_serve.errors import InvalidRequestError

M = TypeVar("M", bound=BaseModel)
MAX_NAME_CHARS = 64


def parse_model(model: type[M], data: Any) -> M:
    """``data`` (a parsed JSON body) validated into ``model``, or an ``InvalidRequestError``."""
    if not isinstance(data, dict):
        raise InvalidRequestError("The request body must be a JSON object.")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid_request(model, exc) from None


def invalid_request(model: type[BaseModel], exc: ValidationError) -> InvalidRequestError:
    first = exc.errors(include_input=False, include_url=False)[0]
    param = ".".join(str(part) for part in first["loc"])[:MAX_NAME_CHARS] or None
    if first["type"] == "extra_forbidden":
        allowed = ", ".join(model.model_fields)
        return InvalidRequestError(f"unknown field '{param}'; allowed fields: {allowed}", param=param)
    if first["type"] == "missing":
        return InvalidRequestError(f"'{param}' is required.", param=param)
    if first["type"] == "value_error":  # a validator's own message says what is expected
        return InvalidRequestError(str(first.get("ctx", {}).get("error") or first["msg"]), param=param)
    return InvalidRequestError(f"Invalid value for '{param}': {first['msg']}.", param=param)
