"""Bounds on what a bundle or snapshot expands to, checked where it is created and again where
it is used.

A bundle holds artifact handles, and one artifact may be named many times: 4 MiB of handles can
name one 2 MiB artifact ~120,000 times, a ~240 GiB prompt. So the size that counts is the
*expanded* one, every reference in full (a repeat each time), plus a snapshot's frozen turns:

    expanded(bundle)   = sum(size_bytes of each reference)              ≤ max_snapshot_bytes
    expanded(snapshot) = expanded(its artifacts) + UTF-8 bytes of turns ≤ max_snapshot_bytes
    references(bundle)                                                   ≤ max_bundle_artifacts

The reference count is checked on the request alone, before any store read, so a refused
bundle costs the store nothing; sizes come from the artifacts' records (small), never from
their content. A snapshot made before these bounds is checked the same way when it is used,
before any artifact content is read. Every refusal is a 413 that says which bound and what to
do instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from profiles.model import GatewaySpec
from zumik_serve.errors import PayloadTooLargeError
from zumik_serve.state.objects import FrozenTurn


@dataclass(frozen=True)
class SnapshotLimits:
    max_snapshot_bytes: int
    max_bundle_artifacts: int

    @classmethod
    def of(cls, gateway: GatewaySpec) -> SnapshotLimits:
        return cls(gateway.max_snapshot_bytes, gateway.max_bundle_artifacts)

    def check_references(self, count: int) -> None:
        """A bundle naming ``count`` artifacts (repeats included)."""
        if count > self.max_bundle_artifacts:
            raise PayloadTooLargeError(
                f"A bundle may name at most {self.max_bundle_artifacts} artifacts (repeats "
                f"included); this one names {count}. Put the content in fewer, larger artifacts "
                "or split it over several bundles.",
                param="artifacts",
                code="bundle_too_large",
            )

    def check_expanded(self, expanded_bytes: int, *, what: str, param: str | None = None) -> None:
        """``what`` (a bundle, a snapshot) expands to ``expanded_bytes``."""
        if expanded_bytes > self.max_snapshot_bytes:
            raise PayloadTooLargeError(
                f"This {what} expands to {expanded_bytes} bytes (each artifact reference counted in "
                f"full, a repeated artifact each time, plus its turns), above this server's limit "
                f"of {self.max_snapshot_bytes} bytes. Name each artifact once and keep the content "
                "it adds up to under the limit.",
                param=param,
                code=f"{what}_too_large",
            )


DEFAULT_LIMITS = SnapshotLimits.of(GatewaySpec())


def expanded_bytes(
    references: Sequence[str], sizes: Mapping[str, int], turns: Iterable[FrozenTurn] = ()
) -> int:
    """What ``references`` (artifact handles, repeats included; ``sizes`` by handle, a missing
    one counting 0) and ``turns`` expand to."""
    return sum(sizes.get(handle, 0) for handle in references) + turn_bytes(turns)


def turn_bytes(turns: Iterable[FrozenTurn]) -> int:
    return sum(len(turn.content.encode()) for turn in turns)
