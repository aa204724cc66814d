"""RoutingService: aliases and their immutable releases, and decision records with replay.

Rules kept here: a release never changes (moving an alias publishes a new one that names the
one before); an alias resolves to exactly one release per request; a decision is read back and
replayed from its recorded inputs only (no clock, no live state), so it compares equal after the
alias moved, after a restart and under another ``PYTHONHASHSEED``. Everything is per tenant:
another tenant's alias, release or decision is "not found".
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

from profiles import Profile
from zumik_serve.errors import ConflictError, InvalidRequestError, NotFoundError, RateLimitExceededError
from zumik_serve.ids import HandleKind, handle_kind
from zumik_serve.qos.quota import RateReservation
from zumik_serve.qos.store import RateAdmission
from zumik_serve.routing.release import AliasState, Release, new_release_id, release_for, validate_alias_name
from zumik_serve.routing.replay import Replayed, replay
from zumik_serve.routing.requests import PublishRelease, alias_name
from zumik_serve.routing.store import DecisionPage, RedisRoutingStore, StoredDecision


@dataclass(frozen=True)
class RequestRelease:
    """What a request's release lookup gives: the release it runs under (None: its model names
    no alias and no served model) and the tenant's salt epoch, read in the same round trip
    (``tenancy/salts.py``: the epoch is read for every request, never kept)."""

    release: Release | None
    salt_epoch: int
    admitted: RateReservation | RateLimitExceededError | None = None  # ``RequestLookup.admitted``


class RoutingService:
    def __init__(self, store: RedisRoutingStore, profile: Profile) -> None:
        self._store = store
        self.profile = profile

    # --- aliases and releases ----------------------------------------------------------------

    async def publish(self, tenant: str, alias: str, request: PublishRelease) -> Release:
        """Publish a release of the served model and point ``alias`` at it (see
        ``PublishRelease`` for the compare-and-set); ``ConflictError`` when the alias moved."""
        alias = alias_name(alias)
        served = self.profile.served_names()
        model = served[0] if request.model is None else request.model
        if model not in served:
            raise InvalidRequestError(
                f"this deployment serves {', '.join(repr(name) for name in served)}; a release of it "
                f"cannot name {model!r}",
                param="model",
            )
        if request.routes is not None and model != self.profile.model.served_name:
            raise InvalidRequestError(
                f"routes applies to releases of {self.profile.model.served_name!r}, whose requests take "
                f"this profile's routes; those of {model!r} go to the engines that serve it",
                param="routes",
            )
        if request.routes is not None:
            names = [route.name for route in self.profile.effective_routes()]
            unknown = [name for name in request.routes if name not in names]
            if unknown or not request.routes or len(set(request.routes)) != len(request.routes):
                found = f"{', '.join(map(repr, unknown))} is not one" if unknown else "got none or a repeat"
                raise InvalidRequestError(
                    f"routes must name some of this profile's routes, each once ({', '.join(names)}); "
                    f"{found}",
                    param="routes",
                )
        current = await self._store.current_release_id(tenant, alias)
        expected = request.expected_release if request.compare_and_set else current
        if expected != current:
            raise ConflictError(
                f"alias '{alias}' now points at {current}, not {expected}; read it again and retry",
                code="alias_moved",
            )
        release = release_for(
            self.profile, alias, new_release_id(), int(time.time()), current, model,
            None if request.routes is None else tuple(request.routes),
        )  # fmt: skip
        if not await self._store.publish(tenant, release, current):
            raise ConflictError(
                f"alias '{alias}' moved while publishing; read it again and retry", code="alias_moved"
            )
        return release

    async def alias(self, tenant: str, alias: str) -> AliasState:
        state = await self._store.alias(tenant, alias)
        if state is None:
            raise _alias_not_found(alias)
        return state

    async def release(self, tenant: str, release_id: str) -> Release | None:
        """The tenant's release ``release_id`` (releases are immutable and kept); None if none."""
        return await self._store.release(tenant, release_id)

    async def resolve(self, tenant: str, name: str) -> Release | None:
        """The current release of the tenant's alias ``name``; None when no such alias."""
        if not _is_alias_name(name):
            return None
        return await self._store.resolve(tenant, name)

    async def release_for_request(
        self, tenant: str, model: str | None, *, pinned: str | None = None,
        admission: RateAdmission | None = None, admission_epoch: int = 0,
    ) -> RequestRelease:  # fmt: skip
        """The release a request naming ``model`` runs under, and the tenant's salt epoch, read
        in one round trip: the ``pinned`` release (a stored conversation's) while it is a release
        of that same alias, else the tenant's alias of that name, or for a served model's (or
        adapter's) own name an implicit alias published on first use (so every response pins a
        release); no release when ``model`` is neither (or None). With ``admission``, the
        request's rate admission in the same round trip when ``admission_epoch`` is the epoch
        read (``RedisRoutingStore.lookup``)."""
        alias = model if model is not None and _is_alias_name(model) else None
        found = await self._store.lookup(
            tenant, alias, pinned if alias is not None else None, admission=admission,
            admission_epoch=admission_epoch,
        )  # fmt: skip
        if found.pinned is not None and found.pinned.alias == model:
            return RequestRelease(found.pinned, found.salt_epoch, found.admitted)
        release = found.current
        if release is None and model is not None and model in self.profile.served_names():
            with contextlib.suppress(ConflictError):  # another request published it first
                await self.publish(tenant, model, PublishRelease(model=model, expected_release=None))
            release = await self.resolve(tenant, model)
        return RequestRelease(release, found.salt_epoch, found.admitted)

    # --- decisions ---------------------------------------------------------------------------

    async def decision(self, tenant: str, decision_id: str) -> StoredDecision:
        stored = None
        if handle_kind(decision_id) is HandleKind.DECISION:
            stored = await self._store.decision(tenant, decision_id)
        if stored is None:
            raise NotFoundError(
                f"No decision {decision_id!r} exists for you. Decision ids come from the "
                "x-zumik-decision-id response header.",
                code="decision_not_found",
            )
        return stored

    async def decisions(self, tenant: str, *, limit: int, after: str | None) -> DecisionPage:
        """A page of the tenant's decisions (kept 30 days), newest first, after ``after``."""
        page = await self._store.decision_page(tenant, limit=limit, after=after)
        if page is None:
            raise InvalidRequestError(
                f"No decision {after!r} is in your list (expired, purged or unknown). List again "
                "without 'after'.",
                param="after",
            )
        return page

    async def replay(self, tenant: str, decision_id: str) -> Replayed:
        equal, recomputed = replay((await self.decision(tenant, decision_id)).record)
        return Replayed(decision_id=decision_id, equal=equal, record=recomputed)

    def describe_profile(self) -> dict[str, Any]:
        profile = self.profile
        return {
            "name": profile.name,
            "object": "profile",
            "model": profile.model.served_name,
            "models": list(profile.served_names()),
            "fingerprint": profile.fingerprint(),
            "routes": [
                {"name": r.name, "kind": r.kind.value, "model": r.model} for r in profile.effective_routes()
            ],
            "default_route": profile.effective_default_route(),
            "fallback_order": list(profile.effective_fallback_order()),
            "policy_version": profile.routing.policy_version,
            "purge_ceiling": profile.purge.ceiling,
        }


def _is_alias_name(name: str) -> bool:
    try:
        validate_alias_name(name)
    except ValueError:
        return False
    return True


def _alias_not_found(alias: str) -> NotFoundError:
    return NotFoundError(
        f"No alias '{alias}' exists for you. Publish a release with POST /v2/aliases/{alias}/releases.",
        code="alias_not_found",
    )
