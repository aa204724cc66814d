"""The bodies of the /v2 purge routes, as pydantic models; a body that is not one is a 400
``InvalidRequestError`` whose ``param`` names the field and whose message never repeats a value.

    POST /v2/purge          PurgeRequest
    GET  /v2/receipts/{id}  (no body)
    GET  /v2/keys           (no body)
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, StrictStr, ValidationError

from zumik_serve.errors import InvalidRequestError
from zumik_serve.validation import MAX_NAME_CHARS, invalid_request


class PurgeRequest(BaseModel):
    """``POST /v2/purge``: ``target`` is the id of the object to purge (``art_``, ``bnd_``,
    ``ses_``, ``brn_`` or ``snp_``); which ids can be purged is the service's to say (404)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: StrictStr


def parse_purge_request(body: dict[str, Any]) -> PurgeRequest:
    """``body`` as a ``PurgeRequest``, or the 400 for it. As this route always answered, an
    unknown field is named first (the first by name), then a missing ``target``; any other
    problem is worded by ``zumik_serve/validation.py``."""
    try:
        return PurgeRequest.model_validate(body)
    except ValidationError as exc:
        errors = exc.errors(include_input=False, include_url=False)
        unknown = sorted(str(error["loc"][0]) for error in errors if error["type"] == "extra_forbidden")
        if unknown:
            name = unknown[0][:MAX_NAME_CHARS]
            allowed = ", ".join(PurgeRequest.model_fields)
            raise InvalidRequestError(
                f"unknown field '{name}'; allowed fields: {allowed}", param=name
            ) from None
        if any(error["type"] == "missing" for error in errors):
            raise InvalidRequestError(
                "'target' is required: the id of the object to purge.", param="target"
            ) from None
        raise invalid_request(PurgeRequest, exc) from None
