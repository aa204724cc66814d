"""A release: what an alias meant at one moment, frozen (DESIGN.md section 5).

An alias moves by creating a new release whose ``previous`` is the release it replaces, never
by editing one; a response pins the release it was served under, so a decision made under it
can be replayed against the same model, route table and policy version.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter

from profiles.model import Profile, RouteKind
from zumik_serve.ids import HandleKind, handle_kind, new_handle

ALIAS_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


def validate_alias_name(name: str) -> str:
    """The name itself when it is a valid alias; ValueError saying what is allowed otherwise."""
    if not ALIAS_PATTERN.fullmatch(name):
        raise ValueError(
            f"alias name {name!r} is not valid: use 1 to 63 characters of a-z, 0-9, '.', '_' and "
            "'-', starting with a letter or digit"
        )
    return name


def new_release_id() -> str:
    return new_handle(HandleKind.RELEASE)


@dataclass(frozen=True)
class RouteEntry:
    """One route of a release's table, with the prices the profile declared (decimal strings:
    USD per million tokens for managed and byok, the replica-hour price for byoc)."""

    name: str
    kind: RouteKind
    input_usd_per_mtok: str | None = None
    cached_input_usd_per_mtok: str | None = None
    output_usd_per_mtok: str | None = None
    replica_hour_usd: str | None = None
    tokens_per_replica_hour: int | None = None


@dataclass(frozen=True)
class Release:
    """An immutable release. ``created_at`` is unix seconds; ``previous`` is the release this
    one replaced for the alias, None for the alias's first."""

    id: str
    alias: str
    model: str
    route_table: tuple[RouteEntry, ...]
    policy_version: str
    profile_name: str
    profile_fingerprint: str
    created_at: int
    previous: str | None = None

    def __post_init__(self) -> None:
        validate_alias_name(self.alias)
        for handle in (self.id, self.previous):
            if handle is not None and handle_kind(handle) is not HandleKind.RELEASE:
                raise ValueError(f"{handle!r} is not a release handle (rel_...)")
        if self.previous == self.id:
            raise ValueError("a release cannot replace itself")

    def to_json(self) -> dict[str, Any]:
        """The release as JSON: these fields in this order, ``kind`` as its value."""
        return _RELEASE.dump_python(self, mode="json")

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Release:
        """A release read back from its JSON; ``ValueError`` (a pydantic ``ValidationError``)
        names the first field that is not valid."""
        return _RELEASE.validate_python(data)

    def canonical_json(self) -> bytes:
        """The release as stored: sorted keys, no spaces, UTF-8."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


_RELEASE: TypeAdapter[Release] = TypeAdapter(Release)


@dataclass(frozen=True)
class AliasState:
    """An alias as stored: ``current``, the release it points at now (None only when that
    release is missing from the store, which publishing never leaves), and ``history``, every
    release it has pointed at, oldest first (``current`` is the last)."""

    name: str
    current: Release | None
    history: tuple[Release, ...]


def release_for(
    profile: Profile,
    alias: str,
    release_id: str,
    created_at: int,
    previous: str | None,
    model: str | None = None,
    routes: tuple[str, ...] | None = None,
) -> Release:
    """The release of ``alias`` serving ``profile``'s ``model`` (default: its first) now: every
    effective route (or those named in ``routes``, in the profile's order) with its prices, its
    routing policy version and its fingerprint."""
    table = []
    for route in profile.effective_routes():
        if routes is not None and route.name not in routes:
            continue
        prices = route.prices
        table.append(
            RouteEntry(
                name=route.name,
                kind=route.kind,
                input_usd_per_mtok=None if prices is None else prices.input,
                cached_input_usd_per_mtok=None if prices is None else prices.cached_input,
                output_usd_per_mtok=None if prices is None else prices.output,
                replica_hour_usd=route.replica_hour_usd,
                tokens_per_replica_hour=route.tokens_per_replica_hour,
            )
        )
    return Release(
        id=release_id,
        alias=alias,
        model=model or profile.model.served_name,
        route_table=tuple(table),
        policy_version=profile.routing.policy_version,
        profile_name=profile.name,
        profile_fingerprint=profile.fingerprint(),
        created_at=created_at,
        previous=previous,
    )
