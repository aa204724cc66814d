"""Evidence levels of a reuse figure, ordered weakest first (DESIGN.md section 6).

    unknown < estimated < reported < observed

``estimated``: Zumik's own prediction (the opportunity index). ``reported``: a third party says
so (a managed provider's ``cached_tokens``). ``observed``: an engine Zumik runs counted it.
Combining figures reports the weakest level of the parts; a missing provider field is
``unknown``, never zero.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import IntEnum


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


def weakest(levels: Iterable[EvidenceLevel]) -> EvidenceLevel:
    """The level of a combination of figures: the weakest part (no parts: unknown)."""
    return min(levels, default=EvidenceLevel.UNKNOWN)
