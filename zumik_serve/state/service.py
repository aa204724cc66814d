"""StateService: the rules of artifacts, bundles, sessions, branches and snapshots, per tenant.

API handlers call this; it enforces the rules of ``state/objects.py`` over the store
(``store/state_store.py``, passed in) and raises Zumik errors a client can act on. Every write
takes an optional idempotency key: the same key with the same request returns the first result,
with another request it is a 422.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, TypeVar

from zumik_serve.errors import (
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
    compile_messages,
    snapshot_messages,
)
from zumik_serve.state.objects import ArtifactRole, FrozenTurn, ObjectKind, TurnRole, content_digest

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
SESSION_LIKE = (HandleKind.SESSION, HandleKind.BRANCH)
T = TypeVar("T")
TEXT_MEDIA_TYPE = "text/plain; charset=utf-8"
MAX_TURN_CONTENT_BYTES = 1024 * 1024


def request_hash(operation: str, body: Any) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{operation}\n{canonical}".encode()).hexdigest()


class StateService:
    def __init__(self, store: RedisStateStore, *, max_artifact_bytes: int) -> None:
        self._store = store
        self.max_artifact_bytes = max_artifact_bytes

    async def store_call(self, operation: Awaitable[T]) -> T:
        """Await a call of this service; a store outage becomes a 503 with Retry-After."""
        return await self._store.guard(operation)

    # --- writes -----------------------------------------------------------------------------

    async def create_artifact(
        self, tenant: str, body: dict[str, Any], idem_key: str | None
    ) -> dict[str, Any]:
        role = _enum(ArtifactRole, body.get("role"), "role")
        content, media_type = self._artifact_content(body)

        async def create() -> dict[str, Any]:
            digest = content_digest(content, media_type)
            address = f"{digest}|{role.value}"
            generation = await self._store.artifact_generation(tenant, address)
            secret = await self._store.handle_secret()
            handle = derive_handle(HandleKind.ARTIFACT, secret, tenant, address, str(generation))
            existing = await self._store.get_record(tenant, handle)
            if existing is not None:
                return existing
            record = {
                "id": handle, "object": "artifact", "role": role.value, "media_type": media_type,
                "digest": digest, "size_bytes": len(content), "created_at": int(time.time()),
            }  # fmt: skip
            await self._store.put_artifact(tenant, handle, record, content)
            return record

        return await self._idempotent(tenant, idem_key, request_hash("artifact", body), create)

    async def create_bundle(self, tenant: str, body: dict[str, Any], idem_key: str | None) -> dict[str, Any]:
        artifacts = body.get("artifacts")
        if not isinstance(artifacts, list) or not artifacts or not all(isinstance(a, str) for a in artifacts):
            raise InvalidRequestError(
                "'artifacts' must be a non-empty array of artifact ids.", param="artifacts"
            )
        _only_fields(body, {"artifacts"})

        async def create() -> dict[str, Any]:
            records = await self._store.get_records(tenant, list(artifacts))
            for index, (handle, record) in enumerate(zip(artifacts, records, strict=True)):
                if record is None or handle_kind(handle) is not HandleKind.ARTIFACT:
                    raise UnprocessableError(
                        f"artifacts[{index}] ({handle}) is not a live artifact of yours; create it "
                        "with POST /v2/artifacts first",
                        param=f"artifacts[{index}]",
                        code="unknown_artifact",
                    )
            handle = await self._new_handle(HandleKind.BUNDLE)
            record = {
                "id": handle,
                "object": "bundle",
                "artifacts": artifacts,
                "created_at": int(time.time()),
            }
            await self._store.put_record(tenant, handle, record, parents=artifacts)
            return record

        return await self._idempotent(tenant, idem_key, request_hash("bundle", body), create)

    async def create_session(self, tenant: str, body: dict[str, Any], idem_key: str | None) -> dict[str, Any]:
        _only_fields(body, {"bundle"})
        bundle = body.get("bundle")

        async def create() -> dict[str, Any]:
            if bundle is not None:
                await self._require(tenant, bundle, HandleKind.BUNDLE, param="bundle")
            handle = await self._new_handle(HandleKind.SESSION)
            record = {"id": handle, "object": "session", "bundle": bundle, "created_at": int(time.time())}
            await self._store.put_record(tenant, handle, record, parents=[bundle] if bundle else [])
            return {**record, "head": 0}

        return await self._idempotent(tenant, idem_key, request_hash("session", body), create)

    async def append_turn(
        self, tenant: str, session: str, body: dict[str, Any], idem_key: str | None
    ) -> dict[str, Any]:
        _only_fields(body, {"role", "content"})
        role = _enum(TurnRole, body.get("role"), "role")
        content = body.get("content")
        if not isinstance(content, str):
            raise InvalidRequestError("'content' must be a string.", param="content")
        if len(content.encode()) > MAX_TURN_CONTENT_BYTES:
            raise PayloadTooLargeError(f"a turn holds at most {MAX_TURN_CONTENT_BYTES} bytes of content")
        if handle_kind(session) not in SESSION_LIKE:
            raise _not_found(session)
        turn = {"role": role.value, "content": content, "created_at": int(time.time())}
        this_hash = request_hash(f"turn:{session}", body) if idem_key is not None else ""
        status, value = await self._store.append_turn(
            tenant, session, turn, idem_key=idem_key, request_hash=this_hash
        )
        if status == "missing":
            raise _not_found(session)
        if status == "idem":
            if value["hash"] != this_hash:
                raise _idempotency_conflict()
            seq = int(value["result"])
        else:
            seq = int(value)
        return {"object": "turn", "session": session, "seq": seq, "role": role.value}

    async def create_branch(
        self, tenant: str, session: str, body: dict[str, Any], idem_key: str | None
    ) -> dict[str, Any]:
        _only_fields(body, {"at_turn"})
        at_turn = body.get("at_turn")
        if not isinstance(at_turn, int) or isinstance(at_turn, bool):
            raise InvalidRequestError("'at_turn' must be an integer turn number.", param="at_turn")

        async def create() -> dict[str, Any]:
            parent = await self._require(tenant, session, *SESSION_LIKE)
            head = await self._head(tenant, parent)
            if not 0 <= at_turn <= head:
                raise InvalidRequestError(
                    f"turn {at_turn} does not exist in {session} (its turns are 1..{head}); fork at "
                    "a turn between 0 and the head",
                    param="at_turn",
                )
            handle = await self._new_handle(HandleKind.BRANCH)
            record = {
                "id": handle, "object": "branch", "bundle": parent.get("bundle"), "parent": session,
                "fork_at": at_turn, "created_at": int(time.time()),
            }  # fmt: skip
            await self._store.put_record(tenant, handle, record, parents=[session])
            return _public_session(record, head=at_turn)

        return await self._idempotent(tenant, idem_key, request_hash(f"branch:{session}", body), create)

    async def create_snapshot(
        self, tenant: str, body: dict[str, Any], idem_key: str | None
    ) -> dict[str, Any]:
        _only_fields(body, {"bundle", "session", "upto_turn"})
        bundle, session, upto = body.get("bundle"), body.get("session"), body.get("upto_turn")
        if bundle is None and session is None:
            raise InvalidRequestError("a snapshot needs a 'bundle', a 'session', or both.", param="bundle")
        if upto is not None and (session is None or not isinstance(upto, int) or isinstance(upto, bool)):
            raise InvalidRequestError("'upto_turn' must be an integer, with a 'session'.", param="upto_turn")

        async def create() -> dict[str, Any]:
            artifacts: list[str] = []
            if bundle is not None:
                artifacts = list(
                    (await self._require(tenant, bundle, HandleKind.BUNDLE, param="bundle"))["artifacts"]
                )
            turns: list[dict[str, Any]] = []
            upto_turn = 0
            if session is not None:
                record = await self._require(tenant, session, *SESSION_LIKE, param="session")
                all_turns = await self._turns(tenant, record)
                upto_turn = len(all_turns) if upto is None else upto
                if not 0 <= upto_turn <= len(all_turns):
                    raise InvalidRequestError(
                        f"turn {upto_turn} does not exist in {session} (its turns are 1..{len(all_turns)})",
                        param="upto_turn",
                    )
                turns = [{"role": t["role"], "content": t["content"]} for t in all_turns[:upto_turn]]
            handle = await self._new_handle(HandleKind.SNAPSHOT)
            record = {
                "id": handle, "object": "snapshot", "bundle": bundle, "artifacts": artifacts,
                "session": session, "upto_turn": upto_turn, "turns": turns, "created_at": int(time.time()),
            }  # fmt: skip
            parents = [p for p in (bundle, session) if p] + artifacts
            await self._store.put_record(tenant, handle, record, parents=parents)
            return _public_snapshot(record, compilations=[])

        return await self._idempotent(tenant, idem_key, request_hash("snapshot", body), create)

    async def revoke(self, tenant: str, kind: ObjectKind, handle: str) -> dict[str, Any]:
        record = await self._require(tenant, handle, KIND_HANDLES[kind])
        if not await self._store.revoke(tenant, handle):
            raise _not_found(handle)
        if kind is ObjectKind.ARTIFACTS:
            # The same content must not resolve to the revoked handle again: move its address on.
            await self._store.bump_artifact_generation(tenant, f"{record['digest']}|{record['role']}")
        return {"id": handle, "revoked": True}

    # --- reads ------------------------------------------------------------------------------

    async def read(self, tenant: str, kind: ObjectKind, handle: str) -> dict[str, Any]:
        record = await self._require(tenant, handle, KIND_HANDLES[kind])
        if kind is ObjectKind.ARTIFACTS:
            (content,) = await self._store.get_blobs(tenant, [record["digest"]])
            return {**record, **_content_fields(record["media_type"], content or b"")}
        if kind in (ObjectKind.SESSIONS, ObjectKind.BRANCHES):
            turns = await self._turns(tenant, record)
            return {**_public_session(record, head=len(turns)), "turns": turns}
        if kind is ObjectKind.SNAPSHOTS:
            return _public_snapshot(record, compilations=await self._store.compilations(tenant, handle))
        return record

    async def snapshot_messages(self, tenant: str, snapshot: str) -> list[Message]:
        """The snapshot's content as chat messages (see ``state/compiler.py``); 404 if not live.
        The snapshot counts as exposed to the engines from here on (see ``purge_service.py``)."""
        record = await self._require(tenant, snapshot, HandleKind.SNAPSHOT, param="snapshot")
        await self._store.mark_exposed(tenant, [snapshot])
        artifact_records = await self._store.get_records(tenant, record["artifacts"])
        # A snapshot is frozen: an artifact revoked later still belongs to it until purged.
        for index, artifact in enumerate(artifact_records):
            if artifact is None:
                artifact_records[index] = await self._store.get_record_any(tenant, record["artifacts"][index])
        digests = [artifact["digest"] for artifact in artifact_records if artifact is not None]
        blobs = await self._store.get_blobs(tenant, digests)
        contents = [
            ArtifactContent(ArtifactRole(a["role"]), a["media_type"], blob or b"")
            for a, blob in zip((a for a in artifact_records if a is not None), blobs, strict=True)
        ]
        turns = [FrozenTurn(TurnRole(t["role"]), t["content"]) for t in record["turns"]]
        return snapshot_messages(contents, turns)

    async def compile_snapshot(
        self, tenant: str, snapshot: str, tokenizer: ChatTokenizer
    ) -> CompiledSnapshot:
        compiled = compile_messages(await self.snapshot_messages(tenant, snapshot), tokenizer)
        await self._store.pin_compilation(
            tenant, snapshot, compiled.compilation.key, compiled.compilation.record()
        )
        return compiled

    async def use_session(self, tenant: str, session: str) -> None:
        """Check that ``session`` is live before a request appends to it; its content counts as
        exposed to the engines from here on."""
        await self._require(tenant, session, *SESSION_LIKE, param="session")
        await self._store.mark_exposed(tenant, [session])

    # --- helpers ----------------------------------------------------------------------------

    async def _require(
        self, tenant: str, handle: Any, *kinds: HandleKind, param: str | None = None
    ) -> dict[str, Any]:
        if not isinstance(handle, str) or handle_kind(handle) not in kinds:
            raise _not_found(str(handle), param=param)
        record = await self._store.get_record(tenant, handle)
        if record is None:
            raise _not_found(handle, param=param)
        return record

    async def _head(self, tenant: str, record: dict[str, Any]) -> int:
        return int(record.get("fork_at", 0)) + await self._store.own_turn_count(tenant, record["id"])

    async def _turns(
        self, tenant: str, record: dict[str, Any], limit: int | None = None
    ) -> list[dict[str, Any]]:
        """All turns of a session or branch, oldest first, with their seq numbers."""
        fork_at = int(record.get("fork_at", 0))
        inherited: list[dict[str, Any]] = []
        if record.get("parent"):
            parent = await self._store.get_record_any(tenant, record["parent"])
            if parent is not None:
                inherited = await self._turns(tenant, parent, limit=fork_at)
        own_limit = None if limit is None else max(0, limit - fork_at)
        own = await self._store.own_turns(tenant, record["id"], own_limit)
        numbered = [
            {
                "seq": fork_at + index + 1,
                "role": t["role"],
                "content": t["content"],
                "created_at": t["created_at"],
            }
            for index, t in enumerate(own)
        ]
        return inherited + numbered

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
        if previous is None:
            token = _IDEMPOTENT.set((tenant, key, this_hash))
            try:
                created = await operation()
            finally:
                _IDEMPOTENT.reset(token)
            previous = await self._store.remember_result(tenant, key, this_hash, created)
        if previous["hash"] != this_hash:
            raise _idempotency_conflict()
        result: dict[str, Any] = previous["result"]
        return result

    def _artifact_content(self, body: dict[str, Any]) -> tuple[bytes, str]:
        _only_fields(body, {"role", "content", "content_b64", "media_type"})
        if ("content" in body) == ("content_b64" in body):
            raise InvalidRequestError(
                "send exactly one of 'content' (text) or 'content_b64'.", param="content"
            )
        if "content" in body:
            if not isinstance(body["content"], str):
                raise InvalidRequestError("'content' must be a string.", param="content")
            content = body["content"].encode()
            media_type = body.get("media_type") or TEXT_MEDIA_TYPE
        else:
            try:
                content = base64.b64decode(body["content_b64"], validate=True)
            except (ValueError, TypeError):
                raise InvalidRequestError("'content_b64' is not valid base64.", param="content_b64") from None
            media_type = body.get("media_type")
            if not isinstance(media_type, str) or not media_type:
                raise InvalidRequestError("'media_type' is required with 'content_b64'.", param="media_type")
        if not isinstance(media_type, str) or len(media_type) > 255:
            raise InvalidRequestError("'media_type' must be a short string.", param="media_type")
        if len(content) > self.max_artifact_bytes:
            raise PayloadTooLargeError(
                f"the artifact is larger than the limit of {self.max_artifact_bytes} bytes; split it "
                "into several artifacts"
            )
        return content, media_type


def _public_session(record: dict[str, Any], *, head: int) -> dict[str, Any]:
    data = {key: record[key] for key in ("id", "object", "bundle", "created_at")}
    data["head"] = head
    if record.get("parent"):
        data["parent"] = record["parent"]
        data["at_turn"] = record["fork_at"]
    return data


def _public_snapshot(record: dict[str, Any], *, compilations: list[dict[str, Any]]) -> dict[str, Any]:
    data = {
        key: record[key]
        for key in ("id", "object", "bundle", "artifacts", "session", "upto_turn", "created_at")
    }
    data["num_turns"] = len(record["turns"])
    data["compilations"] = compilations
    return data


def _content_fields(media_type: str, content: bytes) -> dict[str, Any]:
    if media_type.startswith(("text/", "application/json")):
        try:
            return {"content": content.decode("utf-8")}
        except UnicodeDecodeError:
            pass
    return {"content_b64": base64.b64encode(content).decode()}


def _enum(enum_type: Any, value: Any, param: str) -> Any:
    try:
        return enum_type(value)
    except ValueError:
        allowed = ", ".join(member.value for member in enum_type)
        raise InvalidRequestError(f"'{param}' must be one of: {allowed}.", param=param) from None


def _only_fields(body: dict[str, Any], allowed: set[str]) -> None:
    for key in body:
        if key not in allowed:
            raise InvalidRequestError(
                f"unknown field '{key}'; allowed fields: {', '.join(sorted(allowed))}", param=key
            )


def _not_found(handle: str, param: str | None = None) -> NotFoundError:
    return NotFoundError(
        f"No object {handle!r} exists for you (unknown, revoked, or another tenant's). Create it "
        "first, or check the id.",
        param=param,
        code="object_not_found",
    )


def _idempotency_conflict() -> IdempotencyConflictError:
    return IdempotencyConflictError(
        "This Idempotency-Key was already used with a different request. Use a new key for a new "
        "request; resend the same body to get the first result."
    )
