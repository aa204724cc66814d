"""The /v2 routing request bodies: pydantic models that forbid unknown fields.

Rule kept here: a body that does not fit is a 400 ``InvalidRequestError`` whose ``param`` names
the offending field (an unknown one first, by name) and whose message says what is allowed,
never repeating a value the client sent (``zumik_serve/validation.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict

from zumik_serve.errors import InvalidRequestError
from zumik_serve.ids import HandleKind
from zumik_serve.routing.release import validate_alias_name
from zumik_serve.validation import page_query, parse_model


def alias_name(alias: str) -> str:
    """The alias name of a request path when it is valid; a 400 naming ``alias`` otherwise."""
    try:
        return validate_alias_name(alias)
    except ValueError as exc:
        raise InvalidRequestError(str(exc), param="alias") from None


class PublishRelease(BaseModel):
    """``POST /v2/aliases/{name}/releases`` (an empty body is ``{}``).

    ``model``: the model (or adapter) the release serves, one of those this deployment serves;
    absent or null, its first model. ``expected_release``: when sent, the publish is a compare-and-set:
    the alias must point at that release now (null: at none yet); when absent, the alias moves
    from wherever it points (``compare_and_set`` tells the two apart). ``routes``: the routes the
    release may take, by name, a subset of the profile's (absent or null: all of them); requests
    under it are routed among those only."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    model: str | None = None
    expected_release: str | None = None
    routes: list[str] | None = None

    @property
    def compare_and_set(self) -> bool:
        return "expected_release" in self.model_fields_set

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> PublishRelease:
        return parse_model(cls, body)


def decision_page_query(limit: str | None, after: str | None) -> tuple[int, str | None]:
    """``GET /v2/decisions``' query (``validation.page_query``)."""
    return page_query(limit, after, HandleKind.DECISION, "decision")
