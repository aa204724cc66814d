"""The bodies of the /v2 purge routes, as pydantic models; a body that is not one is a 400
``InvalidRequestError`` whose ``param`` names the field and whose message never repeats a value.

    POST /v2/purge          PurgeRequest
    GET  /v2/receipts/{id}  (no body)
    GET  /v2/keys           (no body)
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, StrictStr

from zumik_serve.validation import parse_model


class PurgeRequest(BaseModel):
    """``POST /v2/purge``: ``target`` is the id of the object to purge (``art_``, ``bnd_``,
    ``ses_``, ``brn_`` or ``snp_``); which ids can be purged is the service's to say (404)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    HINTS: ClassVar[dict[str, str]] = {"target": "'target' is required: the id of the object to purge."}

    target: StrictStr


def parse_purge_request(body: dict[str, Any]) -> PurgeRequest:
    """``body`` as a ``PurgeRequest``, or the 400 naming the field (``zumik_serve/validation.py``)."""
    return parse_model(PurgeRequest, body)
