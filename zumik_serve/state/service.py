"""StateService: the rules of artifacts, bundles, sessions, branches and snapshots, per tenant.

API handlers call this with validated request bodies (``state/requests.py``); it enforces the
rules of ``state/objects.py`` over the store (``state/store.py``, passed in), raises Zumik errors
a client can act on, and answers with the bodies of ``state/responses.py``. Every write takes an
optional idempotency key: the same key with the same request returns the first result, with
another request it is a 422.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, TypeVar

from zumik_serve.errors import (
    ConflictError,
    IdempotencyConflictError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    UnprocessableError,
)
from zumik_serve.ids import HandleKind, derive_handle, handle_kind, new_handle
from zumik_serve.state.compiler import (
    ArtifactContent,
    ChatTokenizer,
    CompiledSnapshot,
    Message,
    snapshot_messages,
)
from zumik_serve.state.limits import DEFAULT_LIMITS, SnapshotLimits, expanded_bytes
from zumik_serve.state.objects import (
    Artifact,
    Bundle,
    FrozenTurn,
    ObjectKind,
    Session,
    Snapshot,
    Turn,
    artifact_address,
    content_digest,
    stored_json,
)
from zumik_serve.state.outcomes import HandlePurged, ParentNotLive, SessionNotLive, TurnAppended, TurnReplayed
from zumik_serve.state.requests import (
    AppendTurn,
    CreateArtifact,
    CreateBranch,
    CreateBundle,
    CreateSession,
    CreateSnapshot,
    StateRequest,
)
from zumik_serve.state.responses import (
    AppendedTurnBody,
    ObjectPage,
    RevokedBody,
    SessionBody,
    SnapshotBody,
    artifact_read_body,
    bundle_read_body,
    created_body,
    listed_body,
)
from zumik_serve.state.tokenizing import Tokenization, default_tokenization

# (tenant, Idempotency-Key, request hash) of the create running in this task, if any.
_IDEMPOTENT: ContextVar[tuple[str, str, str] | None] = ContextVar("zumik_idempotent", default=None)

if TYPE_CHECKING:
    from zumik_serve.state.store import RedisStateStore

KIND_HANDLES = {
    ObjectKind.ARTIFACTS: HandleKind.ARTIFACT,
    ObjectKind.BUNDLES: HandleKind.BUNDLE,
    ObjectKind.SESSIONS: HandleKind.SESSION,
    ObjectKind.BRANCHES: HandleKind.BRANCH,
    ObjectKind.SNAPSHOTS: HandleKind.SNAPSHOT,
}
KIND_VALUES: dict[ObjectKind, type[Artifact | Bundle | Session | Snapshot]] = {
    ObjectKind.ARTIFACTS: Artifact,
    ObjectKind.BUNDLES: Bundle,
    ObjectKind.SESSIONS: Session,
    ObjectKind.BRANCHES: Session,
    ObjectKind.SNAPSHOTS: Snapshot,
}
SESSION_LIKE = (HandleKind.SESSION, HandleKind.BRANCH)
VALUE_HANDLES: dict[type[Any], tuple[HandleKind, ...]] = {
    Artifact: (HandleKind.ARTIFACT,),
    Bundle: (HandleKind.BUNDLE,),
    Session: SESSION_LIKE,
    Snapshot: (HandleKind.SNAPSHOT,),
}
T = TypeVar("T")
R = TypeVar("R", bound=StateRequest)
V = TypeVar("V", bound=Artifact | Bundle | Session | Snapshot)
MAX_TURN_CONTENT_BYTES = 1024 * 1024


def request_hash(operation: str, body: Any) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{operation}\n{canonical}".encode()).hexdigest()


class StateService:
    def __init__(
        self, store: RedisStateStore, *, max_artifact_bytes: int, limits: SnapshotLimits = DEFAULT_LIMITS,
        tokenization: Tokenization | None = None,
    ) -> None:  # fmt: skip
        """``limits``: what a bundle or snapshot may expand to (``state/limits.py``);
        ``tokenization``: where compilations run (``state/tokenizing.py``; default: the
        profile defaults' cap on a pool of its own)."""
        self._store = store
        self.max_artifact_bytes = max_artifact_bytes
        self.limits = limits
        self.tokenization = tokenization if tokenization is not None else default_tokenization()

    async def store_call(self, operation: Awaitable[T]) -> T:
        """Await a call of this service; a store outage becomes a 503 with Retry-After."""
        return await self._store.guard(operation)

    # --- writes -----------------------------------------------------------------------------
    #
    # Each write takes its request model; a plain mapping (a parsed JSON body) is validated into
    # the model first, with the same 400s.

    async def create_artifact(
        self, tenant: str, request: CreateArtifact, idem_key: str | None
    ) -> dict[str, Any]:
        content, media_type = request.content_bytes, request.content_media_type
        if len(content) > self.max_artifact_bytes:
            raise PayloadTooLargeError(
                f"the artifact is larger than the limit of {self.max_artifact_bytes} bytes; split it "
                "into several artifacts"
            )

        async def create() -> dict[str, Any]:
            digest = content_digest(content, media_type)
            address = artifact_address(digest, request.role)
            generation = await self._store.artifact_generation(tenant, address)
            secret = await self._store.handle_secret()
            handle = derive_handle(HandleKind.ARTIFACT, secret, tenant, address, str(generation))
            existing = await self._store.get_record(tenant, handle)
            if isinstance(existing, Artifact):
                return stored_json(existing)
            artifact = Artifact(
                id=handle, role=request.role, media_type=media_type, digest=digest,
                size_bytes=len(content), created_at_s=int(time.time()),
            )  # fmt: skip
            await self._store.put_artifact(tenant, artifact, content)
            return created_body(artifact)

        return await self._idempotent(tenant, idem_key, request_hash("artifact", request.sent()), create)

    async def create_bundle(self, tenant: str, request: CreateBundle, idem_key: str | None) -> dict[str, Any]:
        artifacts = request.artifacts
        self.limits.check_references(len(artifacts))  # before any store read

        async def create() -> dict[str, Any]:
            records = await self._store.get_records(tenant, artifacts)
            sizes: dict[str, int] = {}
            for index, (handle, record) in enumerate(zip(artifacts, records, strict=True)):
                if not isinstance(record, Artifact) or handle_kind(handle) is not HandleKind.ARTIFACT:
                    raise UnprocessableError(
                        f"artifacts[{index}] ({handle}) is not a live artifact of yours; create it "
                        "with POST /v2/artifacts first",
                        param=f"artifacts[{index}]",
                        code="unknown_artifact",
                    )
                sizes[handle] = record.size_bytes
            self.limits.check_expanded(expanded_bytes(artifacts, sizes), what="bundle", param="artifacts")
            handle = await self._new_handle(HandleKind.BUNDLE)
            bundle = Bundle(id=handle, artifacts=artifacts, created_at_s=int(time.time()))
            stored = await self._store.put_record(tenant, bundle, parents=artifacts, live=artifacts)
            if isinstance(stored, ParentNotLive):  # revoked since it was read
                index = artifacts.index(stored.handle)
                raise UnprocessableError(
                    f"artifacts[{index}] ({stored.handle}) is not a live artifact of yours; create it "
                    "with POST /v2/artifacts first",
                    param=f"artifacts[{index}]",
                    code="unknown_artifact",
                )
            if isinstance(stored, HandlePurged):
                raise _result_purged()
            return created_body(bundle)

        return await self._idempotent(tenant, idem_key, request_hash("bundle", request.sent()), create)

    async def create_session(
        self, tenant: str, request: CreateSession, idem_key: str | None
    ) -> dict[str, Any]:
        bundle = request.bundle

        async def create() -> dict[str, Any]:
            if bundle is not None:
                await self._require(tenant, bundle, Bundle, param="bundle")
            session = Session(
                id=await self._new_handle(HandleKind.SESSION), object="session", bundle=bundle,
                created_at_s=int(time.time()),
            )  # fmt: skip
            built_on = [bundle] if bundle else []
            await self._put(tenant, session, built_on, live=built_on, param="bundle")
            return SessionBody.of(session, head=0).body()

        return await self._idempotent(tenant, idem_key, request_hash("session", request.sent()), create)

    async def append_turn(
        self, tenant: str, session: str, request: AppendTurn, idem_key: str | None
    ) -> dict[str, Any]:
        """Append the turn ``request`` to the session or branch ``session``; 404 when it is not
        live."""
        _check_turn_size(request)
        if handle_kind(session) not in SESSION_LIKE:
            raise _not_found(session)
        this_hash = request_hash(f"turn:{session}", request.sent()) if idem_key is not None else ""
        appended = Turn(role=request.role, content=request.content, created_at_s=int(time.time()))
        outcome = await self._store.append_turn(
            tenant, session, appended, idem_key=idem_key, request_hash=this_hash
        )
        match outcome:
            case TurnAppended(seq=seq):
                pass
            case TurnReplayed(first=first):
                if first.request_hash != this_hash or not isinstance(first.result, int):
                    raise _idempotency_conflict()
                seq = first.result
            case SessionNotLive():
                raise _not_found(session)
        return AppendedTurnBody(object="turn", session=session, seq=seq, role=request.role).body()

    async def record_exchange(
        self, tenant: str, session: str, turns: Sequence[AppendTurn], request_body: Any
    ) -> int:
        """Record a /v1 exchange (its closing user or tool message, then the reply) on the session
        or branch ``session``: all its turns in one step, and once per request. The exchange is
        keyed by the request body, so a client's retry of the same request (the OpenAI SDK
        resends the body unchanged, with no idempotency key) records nothing more: the turns of
        the first are kept. The seq of the exchange's last turn; 404 when ``session`` is not live.
        The key names the session, so a purge of it removes the key too."""
        for turn in turns:
            _check_turn_size(turn)
        if handle_kind(session) not in SESSION_LIKE:
            raise _not_found(session)
        body_hash = request_hash(f"exchange:{session}", request_body)
        now = int(time.time())
        appended = [Turn(role=turn.role, content=turn.content, created_at_s=now) for turn in turns]
        outcome = await self._store.append_turns(
            tenant, session, appended, idem_key=f"exchange:{session}:{body_hash}", request_hash=body_hash
        )
        match outcome:
            case TurnAppended(seq=seq):
                return seq
            case TurnReplayed(first=first) if isinstance(first.result, int):
                return first.result
            case _:
                raise _not_found(session)

    async def create_branch(
        self, tenant: str, session: str, request: CreateBranch, idem_key: str | None
    ) -> dict[str, Any]:
        at_turn = request.at_turn

        async def create() -> dict[str, Any]:
            parent = await self._require(tenant, session, Session)
            head = await self._head(tenant, parent)
            if not 0 <= at_turn <= head:
                raise InvalidRequestError(
                    f"turn {at_turn} does not exist in {session} (its turns are 1..{head}); fork at "
                    "a turn between 0 and the head",
                    param="at_turn",
                )
            branch = Session(
                id=await self._new_handle(HandleKind.BRANCH), object="branch", bundle=parent.bundle,
                parent=session, fork_at=at_turn, created_at_s=int(time.time()),
            )  # fmt: skip
            await self._put(tenant, branch, [session], live=[session])
            return SessionBody.of(branch, head=at_turn).body()

        return await self._idempotent(
            tenant, idem_key, request_hash(f"branch:{session}", request.sent()), create
        )

    async def create_snapshot(
        self, tenant: str, request: CreateSnapshot, idem_key: str | None
    ) -> dict[str, Any]:
        bundle, session, upto = request.bundle, request.session, request.upto_turn

        async def create() -> dict[str, Any]:
            artifacts: tuple[str, ...] = ()
            if bundle is not None:
                artifacts = (await self._require(tenant, bundle, Bundle, param="bundle")).artifacts
            turns: list[FrozenTurn] = []
            upto_turn = 0
            if session is not None:
                record = await self._require(tenant, session, Session, param="session")
                all_turns = await self._turns(tenant, record)
                upto_turn = len(all_turns) if upto is None else upto
                if not 0 <= upto_turn <= len(all_turns):
                    raise InvalidRequestError(
                        f"turn {upto_turn} does not exist in {session} (its turns are 1..{len(all_turns)})",
                        param="upto_turn",
                    )
                turns = [FrozenTurn(turn.role, turn.content) for _, turn in all_turns[:upto_turn]]
            await self._check_snapshot_size(tenant, artifacts, turns)
            snapshot = Snapshot(
                id=await self._new_handle(HandleKind.SNAPSHOT), bundle=bundle, artifacts=artifacts,
                session=session, upto_turn=upto_turn, turns=tuple(turns), created_at_s=int(time.time()),
            )  # fmt: skip
            read = [p for p in (bundle, session) if p]  # its artifacts may be revoked: it freezes them
            await self._put(tenant, snapshot, read + list(artifacts), live=read)
            return SnapshotBody.of(snapshot, compilations=[]).body()

        return await self._idempotent(tenant, idem_key, request_hash("snapshot", request.sent()), create)

    async def revoke(self, tenant: str, kind: ObjectKind, handle: str) -> dict[str, Any]:
        record = await self._require(tenant, handle, KIND_VALUES[kind], kinds=(KIND_HANDLES[kind],))
        if not await self._store.revoke(tenant, handle):
            raise _not_found(handle)
        if isinstance(record, Artifact):
            # The same content must not resolve to the revoked handle again: move its address on.
            await self._store.bump_artifact_generation(tenant, record.address)
        return RevokedBody(id=handle, revoked=True).body()

    # --- reads ------------------------------------------------------------------------------

    async def list_page(self, tenant: str, kind: ObjectKind, limit: int, after: str | None) -> ObjectPage:
        """A page of the tenant's live objects of ``kind``, newest first (``limit``, ``after``: as
        ``validation.page_query`` checked them); 404 naming ``after`` when it is none of them."""
        page = await self._store.list_page(tenant, KIND_HANDLES[kind], limit, after)
        if page is None:
            raise NotFoundError(
                f"No live {KIND_HANDLES[kind].name.lower()} {after!r} exists for you: 'after' takes "
                "the last_id of the page before.",
                param="after",
            )
        records, has_more = page
        heads: dict[str, int] = {}
        sessions = [record for record in records if isinstance(record, Session)]
        counts = await self._store.own_turn_counts(tenant, [session.id for session in sessions])
        for session, count in zip(sessions, counts, strict=True):
            heads[session.id] = session.fork_at + count
        return ObjectPage([listed_body(record, heads.get(record.id, 0)) for record in records], has_more)

    async def read(self, tenant: str, kind: ObjectKind, handle: str) -> dict[str, Any]:
        record = await self._require(tenant, handle, KIND_VALUES[kind], kinds=(KIND_HANDLES[kind],))
        match record:
            case Artifact():
                (content,) = await self._store.get_blobs(tenant, [record.digest])
                return artifact_read_body(record, content or b"")
            case Bundle():
                return bundle_read_body(record)
            case Session():
                turns = await self._turns(tenant, record)
                return SessionBody.of(record, head=len(turns), turns=turns).body()
            case Snapshot():
                compilations = await self._store.compilations(tenant, handle)
                return SnapshotBody.of(record, compilations=compilations).body()

    async def snapshot_messages(self, tenant: str, snapshot: str) -> list[Message]:
        """The snapshot's content as chat messages (see ``state/compiler.py``); 404 if not live,
        413 if it expands beyond the limits (a snapshot made before them; checked on the
        artifacts' records, before any content is read). Each distinct artifact's content is
        read once. The snapshot counts as exposed to the engines from here on (see
        ``purge/service.py``)."""
        record = await self._require(tenant, snapshot, Snapshot, param="snapshot")
        records = await self._check_snapshot_size(tenant, record.artifacts, record.turns, param="snapshot")
        await self._expose(tenant, snapshot, param="snapshot")
        # A snapshot is frozen: an artifact revoked later still belongs to it until purged.
        artifacts = [records[handle] for handle in record.artifacts if handle in records]
        digests = list(dict.fromkeys(artifact.digest for artifact in artifacts))
        blobs = dict(zip(digests, await self._store.get_blobs(tenant, digests), strict=True))
        contents = [
            ArtifactContent(artifact.role, artifact.media_type, blobs[artifact.digest] or b"")
            for artifact in artifacts
        ]
        return snapshot_messages(contents, record.turns)

    async def compile_snapshot(
        self, tenant: str, snapshot: str, tokenizer: ChatTokenizer
    ) -> CompiledSnapshot:
        """The snapshot compiled with ``tokenizer`` (off the event loop, within the tokenizing
        cap: ``state/tokenizing.py``), its compilation pinned."""
        compiled = await self.tokenization.compile(await self.snapshot_messages(tenant, snapshot), tokenizer)
        await self._store.pin_compilation(tenant, snapshot, compiled.compilation)
        return compiled

    async def continue_conversation(
        self, tenant: str, after: tuple[str, int] | None, turns: Sequence[AppendTurn]
    ) -> tuple[str, int]:
        """Record ``turns`` as the continuation of turn ``upto`` of session or branch ``handle``
        (``after``; None: a new session): appended to it when ``upto`` is still its head, else
        on a new branch forked at ``upto`` (someone continued it first). Returns the session or
        branch that holds them and its head. 404 when ``handle`` is not live."""
        for turn in turns:
            _check_turn_size(turn)
        now = int(time.time())
        appended = [Turn(role=turn.role, content=turn.content, created_at_s=now) for turn in turns]
        if after is None:
            session = Session(
                id=await self._new_handle(HandleKind.SESSION), object="session", bundle=None, created_at_s=now
            )
            await self._store.put_record(tenant, session, parents=[])
            parent, upto = session, 0
        else:
            parent = await self._require(tenant, after[0], Session)
            upto = after[1]
        outcome = await self._store.append_turns_at(
            tenant, parent.id, appended, own_count=upto - parent.fork_at
        )
        holder = parent
        if outcome == "moved":
            holder = Session(
                id=await self._new_handle(HandleKind.BRANCH), object="branch", bundle=parent.bundle,
                parent=parent.id, fork_at=upto, created_at_s=now,
            )  # fmt: skip
            await self._put(tenant, holder, [parent.id], live=[parent.id])
            outcome = await self._store.append_turns_at(tenant, holder.id, appended, own_count=0)
        if not isinstance(outcome, int):
            raise _not_found(holder.id)
        await self._expose(tenant, holder.id)
        return holder.id, outcome

    async def conversation(self, tenant: str, session: str, upto: int) -> list[Turn]:
        """Turns 1..``upto`` of session or branch ``session`` (revoked or not: a stored
        conversation stays readable to its later turns until purged); 404 once purged."""
        record = await self._store.get_record_any(tenant, session)
        if not isinstance(record, Session):
            raise _not_found(session)
        return [turn for _, turn in await self._turns(tenant, record, limit=upto)]

    async def use_session(self, tenant: str, session: str) -> None:
        """Check that ``session`` is live before a request appends to it; its content counts as
        exposed to the engines from here on."""
        await self._require(tenant, session, Session, param="session")
        await self._expose(tenant, session, param="session")

    # --- helpers ----------------------------------------------------------------------------

    async def _expose(self, tenant: str, handle: str, *, param: str | None = None) -> None:
        """Mark ``handle``'s content exposed to the engines, before any of it is sent; 404 when
        a purge revoked it since it was read (the purge then never saw it exposed)."""
        refused = await self._store.mark_exposed(tenant, [handle])
        if refused is not None:
            raise _not_found(refused, param=param)

    async def _check_snapshot_size(
        self, tenant: str, artifacts: Sequence[str], turns: Sequence[FrozenTurn], param: str | None = None
    ) -> dict[str, Artifact]:
        """413 unless ``artifacts`` (references, repeats included) and ``turns`` stay within the
        limits (``state/limits.py``): the count first, with no store read, then the sizes from
        the records of the distinct artifacts (revoked ones too). Those records, by handle."""
        self.limits.check_references(len(artifacts))
        distinct = list(dict.fromkeys(artifacts))
        found = await self._store.get_records(tenant, distinct)
        records: dict[str, Artifact] = {}
        for handle, artifact in zip(distinct, found, strict=True):
            if artifact is None:
                artifact = await self._store.get_record_any(tenant, handle)
            if isinstance(artifact, Artifact):
                records[handle] = artifact
        sizes = {handle: artifact.size_bytes for handle, artifact in records.items()}
        self.limits.check_expanded(expanded_bytes(artifacts, sizes, turns), what="snapshot", param=param)
        return records

    async def _put(
        self,
        tenant: str,
        record: Bundle | Session | Snapshot,
        parents: Sequence[str],
        *,
        live: Sequence[str],
        param: str | None = None,
    ) -> None:
        """Store ``record`` built on ``parents``; 404 naming the first of ``live`` that a purge
        (or a revoke) took since this request read it: nothing is stored then."""
        stored = await self._store.put_record(tenant, record, parents=parents, live=live)
        if isinstance(stored, ParentNotLive):
            raise _not_found(stored.handle, param=param)
        if isinstance(stored, HandlePurged):  # a create retried under its key, after a purge of it
            raise _result_purged()

    async def _require(
        self,
        tenant: str,
        handle: str,
        value_type: type[V],
        *,
        kinds: tuple[HandleKind, ...] | None = None,
        param: str | None = None,
    ) -> V:
        """The live ``value_type`` object ``handle`` (a handle of one of ``kinds``; default: any
        kind of that type); 404 naming ``param`` when it is unknown, revoked, another tenant's,
        or of another kind."""
        if handle_kind(handle) not in (kinds or VALUE_HANDLES[value_type]):
            raise _not_found(handle, param=param)
        record = await self._store.get_record(tenant, handle)
        if not isinstance(record, value_type):
            raise _not_found(handle, param=param)
        return record

    async def _head(self, tenant: str, session: Session) -> int:
        return session.fork_at + await self._store.own_turn_count(tenant, session.id)

    async def _turns(self, tenant: str, session: Session, limit: int | None = None) -> list[tuple[int, Turn]]:
        """The turns of a session or branch with their seq numbers, oldest first (a branch's
        begin with its parent's turns 1..fork_at); the first ``limit`` of them (None: all).
        The chain of parents is walked in a loop, not by recursion: a branch of a branch of ...
        as deep as a tenant makes it reads like any other (it once raised past Python's
        recursion limit, a 500)."""
        levels: list[tuple[Session, int | None]] = [(session, limit)]  # each with its turns' limit
        while (child := levels[-1][0]).parent is not None:
            parent = await self._store.get_record_any(tenant, child.parent)
            if not isinstance(parent, Session):
                break
            child_limit = levels[-1][1]
            levels.append((parent, child.fork_at if child_limit is None else min(child_limit, child.fork_at)))
        turns: list[tuple[int, Turn]] = []
        for level, level_limit in reversed(levels):
            own_limit = None if level_limit is None else max(0, level_limit - level.fork_at)
            own = await self._store.own_turns(tenant, level.id, own_limit)
            turns += [(level.fork_at + index + 1, turn) for index, turn in enumerate(own)]
        return turns

    async def _new_handle(self, kind: HandleKind) -> str:
        """A new object's handle; under an Idempotency-Key it is derived from the key and the
        request, so a retry after a crash between the object's write and the key's result
        finishes the same object instead of creating a second one."""
        idempotent = _IDEMPOTENT.get()
        if idempotent is None:
            return new_handle(kind)
        return derive_handle(kind, await self._store.handle_secret(), "idempotent", *idempotent)

    async def _idempotent(
        self, tenant: str, key: str | None, this_hash: str, operation: Callable[[], Awaitable[dict[str, Any]]]
    ) -> dict[str, Any]:
        if key is None:
            return await operation()
        previous = await self._store.idempotent_result(tenant, key)
        if previous is not None and previous.purged:
            raise _result_purged()
        if previous is None:
            token = _IDEMPOTENT.set((tenant, key, this_hash))
            try:
                created = await operation()
            finally:
                _IDEMPOTENT.reset(token)
            previous = await self._store.remember_result(tenant, key, this_hash, created)
        if previous.request_hash != this_hash or not isinstance(previous.result, dict):
            raise _idempotency_conflict()
        return previous.result


def _check_turn_size(turn: AppendTurn) -> None:
    if len(turn.content.encode()) > MAX_TURN_CONTENT_BYTES:
        raise PayloadTooLargeError(f"a turn holds at most {MAX_TURN_CONTENT_BYTES} bytes of content")


def _not_found(handle: str, param: str | None = None) -> NotFoundError:
    return NotFoundError(
        f"No object {handle!r} exists for you (unknown, revoked, or another tenant's). Create it "
        "first, or check the id.",
        param=param,
        code="object_not_found",
    )


def _result_purged() -> ConflictError:
    return ConflictError(
        "The object this Idempotency-Key created was purged. Send the request with a new "
        "Idempotency-Key to create it again.",
        code="idempotent_result_purged",
    )


def _idempotency_conflict() -> IdempotencyConflictError:
    return IdempotencyConflictError(
        "This Idempotency-Key was already used with a different request. Use a new key for a new "
        "request; resend the same body to get the first result."
    )
