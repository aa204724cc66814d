"""Evidence levels of a reuse figure, ordered weakest first (DESIGN.md section 6): the one
definition, used by the reuse figures and by the scheduler's escalation alike.

    unknown < estimated < reported < observed

``estimated``: Zumik's own prediction (the opportunity index). ``reported``: a third party says
so (a managed provider's ``cached_tokens``). ``observed``: an engine Zumik runs counted it.
Combining figures reports the weakest level of the parts; a missing provider field is
``unknown``, never zero. In JSON (records, reports, headers) a level is its lower-case label.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import IntEnum
from typing import Any

from pydantic import GetCoreSchemaHandler
from pydantic_core import core_schema


class EvidenceLevel(IntEnum):
    UNKNOWN = 0
    ESTIMATED = 1
    REPORTED = 2
    OBSERVED = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, value: str) -> EvidenceLevel:
        try:
            return cls[value.upper()]
        except KeyError:
            names = ", ".join(level.label for level in cls)
            raise ValueError(f"unknown evidence level {value!r}; levels: {names}") from None

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        """Pydantic reads a level from its label (or a member) and writes it as its label."""
        return core_schema.no_info_plain_validator_function(
            _level_of,
            serialization=core_schema.plain_serializer_function_ser_schema(
                _label_of, return_schema=core_schema.str_schema()
            ),
        )


def weakest(levels: Iterable[EvidenceLevel]) -> EvidenceLevel:
    """The level of a combination of figures: the weakest part (no parts: unknown)."""
    return min(levels, default=EvidenceLevel.UNKNOWN)


def _level_of(value: Any) -> EvidenceLevel:
    if isinstance(value, EvidenceLevel):
        return value
    if isinstance(value, str):
        return EvidenceLevel.parse(value)
    raise ValueError("an evidence level is one of the labels unknown, estimated, reported, observed")


def _label_of(level: EvidenceLevel) -> str:
    return level.label
