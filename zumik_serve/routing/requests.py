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
from zumik_serve.ids import HandleKind, handle_kind
from zumik_serve.routing.release import validate_alias_name
from zumik_serve.validation import parse_model


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


MAX_DECISIONS_PER_PAGE = 100


def decision_page_query(limit: str | None, after: str | None) -> tuple[int, str | None]:
    """``GET /v2/decisions``' query: ``limit`` a whole number 1..100 (default 20), ``after`` the
    last id of the previous page (absent: from the newest). A 400 naming the parameter otherwise."""
    count = 20
    if limit is not None:
        if not (
            limit.isascii()
            and limit.isdigit()
            and len(limit) <= 3
            and 1 <= int(limit) <= MAX_DECISIONS_PER_PAGE
        ):
            raise InvalidRequestError(
                f"limit must be a whole number from 1 to {MAX_DECISIONS_PER_PAGE}.", param="limit"
            )
        count = int(limit)
    if after is not None and handle_kind(after) is not HandleKind.DECISION:
        raise InvalidRequestError(
            "after must be a decision id (dec_…): the last_id of the page before.", param="after"
        )
    return count, after
