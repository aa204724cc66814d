"""The body of every paged /v2 list (``GET /v2/decisions``, ``/v2/receipts``, ``/v2/{kind}``):
``{"object": "list", "data", "first_id", "last_id", "has_more"}``, newest first; a client asks
for the next page with ``after`` set to ``last_id`` (``validation.page_query``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fastapi.responses import JSONResponse


def page_response(data: Sequence[Mapping[str, Any]], *, has_more: bool) -> JSONResponse:
    """A page of items, each with its ``id``."""
    return JSONResponse({
        "object": "list",
        "data": list(data),
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    })  # fmt: skip
