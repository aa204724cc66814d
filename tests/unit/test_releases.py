"""Releases: what an alias meant at one moment, frozen.

Invariants held here:
- a release is immutable; moving an alias makes a new release that names the one it replaced,
  and leaves that one unchanged;
- ids are release handles (``rel_...``), and a release never replaces itself;
- a release pins the profile's model, every effective route with its declared price strings,
  the routing policy version and the profile fingerprint;
- a release round-trips through JSON, which holds strings, integers and nulls only;
- alias names outside ``^[a-z0-9][a-z0-9._-]{0,62}$`` fail with a message saying what is allowed.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from profiles import load_builtin
from profiles.model import RouteKind
from zumik_serve.routing.release import Release, RouteEntry, new_release_id, release_for, validate_alias_name

PROFILE = load_builtin("local-cpu-2x")


def make_release(alias: str = "prod", previous: str | None = None) -> Release:
    return release_for(PROFILE, alias, new_release_id(), created_at=1_700_000_000, previous=previous)


def test_release_pins_model_routes_prices_policy_and_fingerprint() -> None:
    release = make_release()
    assert release.id.startswith("rel_") and release.alias == "prod"
    assert release.model == "zumik-tiny"
    assert release.profile_name == "local-cpu-2x" and release.profile_fingerprint == PROFILE.fingerprint()
    assert release.policy_version == "v1"
    assert release.route_table == (
        RouteEntry("local", RouteKind.BYOC, replica_hour_usd="0.50", tokens_per_replica_hour=2_000_000),
        RouteEntry("managed", RouteKind.MANAGED, "0.15", "0.075", "0.60"),
        RouteEntry("byok", RouteKind.BYOK, "0.15", "0.075", "0.60"),
    )


def test_release_of_a_profile_without_routes_has_the_implicit_local_route() -> None:
    release = release_for(load_builtin("local-cpu"), "dev", new_release_id(), 1, None)
    assert [(entry.name, entry.kind) for entry in release.route_table] == [("local", RouteKind.BYOC)]


def test_moving_an_alias_makes_a_new_release_and_leaves_the_old_one() -> None:
    first = make_release()
    before = json.dumps(first.to_json(), sort_keys=True)
    second = make_release(previous=first.id)
    assert second.previous == first.id and second.id != first.id
    assert json.dumps(first.to_json(), sort_keys=True) == before
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.alias = "other"  # type: ignore[misc]


def test_release_ids_must_be_release_handles() -> None:
    with pytest.raises(ValueError, match="not a release handle"):
        release_for(PROFILE, "prod", "dec_aaaaaaaaaaaaaaaaaaaaaaaaaa", 1, None)
    with pytest.raises(ValueError, match="not a release handle"):
        make_release(previous="nope")
    release_id = new_release_id()
    with pytest.raises(ValueError, match="cannot replace itself"):
        release_for(PROFILE, "prod", release_id, 1, release_id)


def test_release_round_trips_through_json_of_strings_ints_and_nulls() -> None:
    release = make_release(previous=new_release_id())
    data = json.loads(json.dumps(release.to_json()))
    assert Release.from_json(data) == release

    def values(node: object) -> list[object]:
        if isinstance(node, dict):
            return [v for child in node.values() for v in values(child)]
        if isinstance(node, list):
            return [v for child in node for v in values(child)]
        return [node]

    assert all(value is None or type(value) in (str, int) for value in values(data))


@pytest.mark.parametrize("name", ["prod", "a", "agent-v2.1", "x_y", "0" * 63])
def test_alias_names_that_fit_the_pattern_pass(name: str) -> None:
    assert validate_alias_name(name) == name


@pytest.mark.parametrize("name", ["", "Prod", "-x", ".x", "a b", "a/b", "0" * 64, "é", "prod\n"])
def test_alias_names_outside_the_pattern_fail_clearly(name: str) -> None:
    with pytest.raises(ValueError, match="is not valid: use 1 to 63 characters of a-z, 0-9"):
        validate_alias_name(name)
    with pytest.raises(ValueError, match="alias name"):
        make_release(alias=name)
