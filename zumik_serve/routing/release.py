"""A release: what an alias meant at one moment, frozen (DESIGN.md section 5).

An alias moves by creating a new release whose ``previous`` is the release it replaces, never
by editing one; a response pins the release it was served under, so a decision made under it
can be replayed against the same model, route table and policy version.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

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

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind.value,
            "input_usd_per_mtok": self.input_usd_per_mtok,
            "cached_input_usd_per_mtok": self.cached_input_usd_per_mtok,
            "output_usd_per_mtok": self.output_usd_per_mtok,
            "replica_hour_usd": self.replica_hour_usd,
            "tokens_per_replica_hour": self.tokens_per_replica_hour,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RouteEntry:
        return cls(**{**data, "kind": RouteKind(data["kind"])})


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
        return {
            "id": self.id,
            "alias": self.alias,
            "model": self.model,
            "route_table": [entry.to_json() for entry in self.route_table],
            "policy_version": self.policy_version,
            "profile_name": self.profile_name,
            "profile_fingerprint": self.profile_fingerprint,
            "created_at": self.created_at,
            "previous": self.previous,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Release:
        return cls(
            id=data["id"],
            alias=data["alias"],
            model=data["model"],
            route_table=tuple(RouteEntry.from_json(entry) for entry in data["route_table"]),
            policy_version=data["policy_version"],
            profile_name=data["profile_name"],
            profile_fingerprint=data["profile_fingerprint"],
            created_at=data["created_at"],
            previous=data["previous"],
        )


def release_for(
    profile: Profile, alias: str, release_id: str, created_at: int, previous: str | None
) -> Release:
    """The release of ``alias`` serving ``profile`` now: its model, every effective route with
    its prices, its routing policy version and its fingerprint."""
    table = []
    for route in profile.effective_routes():
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
        model=profile.model.served_name,
        route_table=tuple(table),
        policy_version=profile.routing.policy_version,
        profile_name=profile.name,
        profile_fingerprint=profile.fingerprint(),
        created_at=created_at,
        previous=previous,
    )
