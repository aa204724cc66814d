"""Purges in Redis: what a target reaches, removing it, compacting Redis' files, jobs, receipts.

    z:{tenant}:purge:{prg}            JSON job: target, closure, exposed, steps done, status
    z:{tenant}:purge-target:{handle}  the purge id of a target (one purge per target)
    zumik:purges:pending              set of "{tenant}|{prg}" not finished (resumed at start)
    z:{tenant}:receipt:{prg}          a signed receipt (JSON), never changed
    z:{tenant}:receipts               list of receipt ids, oldest first (the tenant's log; a
                                      page of it newest first: ``receipt_page``)
    z:{tenant}:receipt-head           {"seq", "hash"} of the newest receipt (the chain's head)

The signing keys are files, never in Redis (``purge/signing_keys.py``).

Jobs and chain heads are stored as sorted, compact JSON of their pydantic ``TypeAdapter`` form
(``purge/job.py`` describes a job's fields): the form the first version wrote, so what it left
behind still loads. Appending a receipt is one Lua script (registered once per store) that
checks, byte for byte, the chain head the receipt was built on, so two purges of one tenant can
never fork the chain. Compaction is ``BGREWRITEAOF`` started after the deletes, awaited to
completion (``aof_rewrites`` moved on, status ok), then a check that the AOF folder holds only
the files the new manifest names when that folder is reachable here. It is claimed only on a
server configured to keep deleted values out of its files (``durability_gap``: AOF on,
``appendfsync always``, RDB snapshots off, no RDB file left); otherwise the detail says why not.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from pydantic import TypeAdapter
from redis.exceptions import ResponseError

from kvstore.tiers.redis_keyring import DESTROYED, TOMBSTONE_TTL_S, keyring_key
from zumik_serve.purge.job import Compaction, PendingPurge, PurgeId, PurgeJob, PurgeStatus
from zumik_serve.purge.receipt import ChainHead
from zumik_serve.state.outcomes import PURGED_ENTRY
from zumik_serve.state.store import (
    RedisStateStore,
    blob_key,
    bydigest_key,
    compilations_key,
    derived_key,
    exposed_key,
    object_key,
    purge_mark_key,
    turns_key,
)
from zumik_serve.store.client import aof_gap

PENDING = "zumik:purges:pending"
COMPACTION_TIMEOUT_S = 120.0

# KEYS: head, receipt, log. ARGV: expected head JSON ("" for none), new head JSON, receipt JSON, id.
APPEND_RECEIPT = """
local head = redis.call('GET', KEYS[1]) or ''
if head ~= ARGV[1] then return 0 end
if not redis.call('SET', KEYS[2], ARGV[3], 'NX') then return 0 end
redis.call('RPUSH', KEYS[3], ARGV[4])
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""

_JOB: TypeAdapter[PurgeJob] = TypeAdapter(PurgeJob)
_HEAD: TypeAdapter[ChainHead] = TypeAdapter(ChainHead)


@dataclass(frozen=True)
class _ArtifactContent:
    """What a purged artifact record names: its content's digest and its role."""

    digest: str
    role: str

    @property
    def address(self) -> str:  # the content address ``RedisStateStore`` keeps a generation of
        return f"{self.digest}|{self.role}"


class RedisPurgeStore:
    def __init__(self, client: aioredis.Redis, state: RedisStateStore) -> None:
        self._redis = client
        self._state = state
        self._append_receipt = client.register_script(APPEND_RECEIPT)

    # --- what a target reaches ---------------------------------------------------------------

    async def exists(self, tenant: str, handle: str) -> bool:
        """Whether ``tenant`` holds a record of ``handle``, live or revoked."""
        return bool(await self._redis.exists(object_key(tenant, handle)))

    async def closure(self, tenant: str, target: str) -> tuple[str, ...]:
        """The target and everything built on it (bundles of an artifact, snapshots of a bundle
        or session, branches of a session, ...), and artifacts holding the same content: the
        target first, then breadth first."""
        seen = [target]
        frontier = [target]
        while frontier:
            async with self._redis.pipeline(transaction=False) as pipe:
                for handle in frontier:
                    pipe.smembers(derived_key(tenant, handle))
                    pipe.get(object_key(tenant, handle))
                replies = await pipe.execute()
            found: list[str] = []
            for index in range(len(frontier)):
                found.extend(_text(member) for member in replies[2 * index])
                content = _artifact_content(replies[2 * index + 1])
                if content is not None:
                    found.extend(
                        _text(m) for m in await self._redis.smembers(bydigest_key(tenant, content.digest))
                    )
            frontier = [handle for handle in dict.fromkeys(sorted(found)) if handle not in seen]
            seen.extend(frontier)
        return tuple(seen)

    async def any_exposed(self, tenant: str, handles: Sequence[str]) -> bool:
        flags = await self._redis.smismember(exposed_key(tenant), list(handles))
        return any(flags)

    async def _artifact(self, tenant: str, handle: str) -> _ArtifactContent | None:
        return _artifact_content(await self._redis.get(object_key(tenant, handle)))

    # --- removal -----------------------------------------------------------------------------

    async def revoke_all(self, tenant: str, handles: Sequence[str]) -> None:
        """Revoke every handle; purged content sent again gets a new handle, never the old one."""
        for handle in handles:
            content = await self._artifact(tenant, handle)
            await self._state.revoke(tenant, handle)
            if content is not None:
                await self._state.bump_artifact_generation(tenant, content.address)

    async def delete_objects(self, tenant: str, handles: Sequence[str]) -> int:
        """Remove every key that holds these objects or their content; returns keys removed."""
        keys: list[str] = []
        for handle in handles:
            content = await self._artifact(tenant, handle)
            keys += [object_key(tenant, handle), derived_key(tenant, handle), turns_key(tenant, handle),
                     compilations_key(tenant, handle)]  # fmt: skip
            if content is not None:
                keys += [blob_key(tenant, content.digest), bydigest_key(tenant, content.digest)]
        removed = await self._state.delete_keys(tenant, keys)  # gives their quota usage back
        await self._redis.srem(exposed_key(tenant), *handles)
        # Idempotency results name the objects they created: each becomes a tombstone for the
        # rest of its 24 h (no handle, no digest of the request), so that a retry gets 409, not
        # the purged handle made again (it derives from the key). A /v1 exchange's key names its
        # session and holds a digest of the request: removed (a retry finds no session).
        marked = [handle.encode() for handle in handles]
        async for key in self._redis.scan_iter(match=f"z:{{{tenant}}}:idem:*", count=1000):
            if any(handle in key for handle in marked):
                removed += int(await self._redis.unlink(key))
                continue
            value = await self._redis.get(key)
            if value is not None and any(handle in value for handle in marked):
                await self._redis.set(key, PURGED_ENTRY, keepttl=True, xx=True)
        return removed

    async def destroy_data_keys(self, scopes: Sequence[str]) -> None:
        """Replace each scope's KV data key with a tombstone (``kvstore/tiers/redis_keyring.py``)."""
        async with self._redis.pipeline(transaction=True) as pipe:
            for scope in scopes:
                pipe.set(keyring_key(scope), DESTROYED, ex=TOMBSTONE_TTL_S)
            await pipe.execute()

    async def compact(self, *, timeout_s: float = COMPACTION_TIMEOUT_S) -> Compaction:
        """Rewrite Redis' persistence so that deleted values leave its files too; ``done`` only
        when, besides, the server's configuration keeps them out (``durability_gap``)."""
        config = await self._durability_config()
        if config.get("appendonly") != "yes":
            return Compaction(False, "Redis runs without an AOF; its RDB snapshots are not rewritten here")
        rewritten = await self._rewrite_aof(timeout_s)
        gap = durability_gap(config)
        if rewritten.done and gap is not None:
            return Compaction(False, f"{rewritten.detail}; not claimed compacted: {gap}")
        return rewritten

    async def _durability_config(self) -> dict[str, str]:
        """The server settings ``durability_gap`` reads, and whether an RDB file is in its folder
        (``rdb_file``: "yes"/"no", "unknown" when that folder is not visible from here)."""
        config: dict[str, str] = {}
        for name in ("appendonly", "appendfsync", "save", "dir", "dbfilename"):
            reply = await self._redis.config_get(name)
            config[name] = _text(reply.get(name, ""))
        folder = Path(config["dir"])
        visible = bool(config["dir"]) and folder.is_dir()
        rdb_file = (folder / config["dbfilename"]).is_file() if visible else None
        config["rdb_file"] = "unknown" if rdb_file is None else ("yes" if rdb_file else "no")
        return config

    async def _rewrite_aof(self, timeout_s: float) -> Compaction:
        deadline = time.monotonic() + timeout_s
        before = await self._info_int("aof_rewrites")
        while True:
            try:
                await self._redis.bgrewriteaof()
                break
            except ResponseError as exc:  # a rewrite started before our deletes is running
                if "in progress" not in str(exc) and "scheduled" not in str(exc):
                    return Compaction(False, f"BGREWRITEAOF refused: {exc}")
            if time.monotonic() > deadline:
                return Compaction(False, "an earlier AOF rewrite did not finish in time")
            await asyncio.sleep(0.05)
        while True:
            info = await self._redis.info("persistence")
            finished = int(info.get("aof_rewrites", 0)) > before
            if finished and not info.get("aof_rewrite_in_progress") and not info.get("aof_rewrite_scheduled"):
                if info.get("aof_last_bgrewrite_status") != "ok":
                    return Compaction(False, "the AOF rewrite failed; see the Redis log")
                break
            if time.monotonic() > deadline:
                return Compaction(False, "the AOF rewrite did not finish in time")
            await asyncio.sleep(0.05)
        return await self._check_aof_folder(deadline)

    async def _check_aof_folder(self, deadline: float) -> Compaction:
        folder_config = await self._redis.config_get("dir")
        name_config = await self._redis.config_get("appenddirname")
        folder = Path(_text(folder_config.get("dir", ""))) / _text(name_config.get("appenddirname", ""))
        if not folder.is_dir():
            return Compaction(True, "AOF rewritten (its folder is not visible from here to check)")
        while True:  # Redis unlinks the replaced files in the background
            manifest = next(folder.glob("*.manifest"), None)
            named = set()
            if manifest is not None:
                named = {
                    line.split()[1] for line in manifest.read_text().splitlines() if line.startswith("file ")
                }
            left = sorted(p.name for p in folder.iterdir() if p.suffix != ".manifest" and p.name not in named)
            if not left:
                return Compaction(True, "AOF rewritten; only the new base and increment files remain")
            if time.monotonic() > deadline:
                return Compaction(False, f"old AOF files remain: {', '.join(left)}")
            await asyncio.sleep(0.05)

    async def _info_int(self, field: str) -> int:
        return int((await self._redis.info("persistence")).get(field, 0))

    # --- jobs --------------------------------------------------------------------------------

    async def claim(self, tenant: str, job: PurgeJob) -> PurgeJob:
        """Start ``job`` for its target unless a purge of it exists; returns the job that won."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(purge_mark_key(tenant, job.target), job.id, nx=True)
            pipe.get(purge_mark_key(tenant, job.target))
            claimed, winner = await pipe.execute()
        if not claimed:
            existing = await self.job(tenant, PurgeId(_text(winner)))
            if existing is not None:
                return existing
        await self.save_job(tenant, job)
        return job

    async def unfinished_scope_purge(self, tenant: str) -> PurgeJob | None:
        """The tenant's latest purge of its cache scope if it has not finished, else None."""
        current = await self._redis.get(_scope_purge(tenant))
        existing = None if current is None else await self.job(tenant, PurgeId(_text(current)))
        return existing if existing is not None and existing.status is not PurgeStatus.DONE else None

    async def start_scope_purge(self, tenant: str, job: PurgeJob) -> PurgeJob:
        """Store ``job``, a new purge of the tenant's cache scope, as its latest (the caller saw
        none unfinished: ``unfinished_scope_purge``). Two started at once both run; each is a
        whole purge."""
        await self.save_job(tenant, job)
        await self._redis.set(_scope_purge(tenant), job.id)
        return job

    async def take_purge_slot(
        self, tenant: str, per_minute: int, *, now_s: float | None = None
    ) -> int | None:
        """Count one new purge of ``tenant`` in this minute's window: None when it is within
        ``per_minute``, else the seconds until the next window (the count is taken back)."""
        now = time.time() if now_s is None else now_s
        window = int(now // 60)
        key = f"z:{{{tenant}}}:purge-rate:{window}"
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            pipe.expire(key, 120)
            count, _ = await pipe.execute()
        if int(count) <= per_minute:
            return None
        await self._redis.decr(key)
        return max(1, int((window + 1) * 60 - now + 0.999))

    async def index_purged(self, tenant: str, handles: Sequence[str], purge_id: PurgeId) -> None:
        """Remember which purge removes each handle: purging one of them later returns that
        purge's receipt instead of "not found"."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for handle in handles:
                pipe.set(purge_mark_key(tenant, handle), purge_id, nx=True)
            await pipe.execute()

    async def job_for_target(self, tenant: str, target: str) -> PurgeJob | None:
        purge_id = await self._redis.get(purge_mark_key(tenant, target))
        return None if purge_id is None else await self.job(tenant, PurgeId(_text(purge_id)))

    async def job(self, tenant: str, purge_id: PurgeId) -> PurgeJob | None:
        """The job, or None when there is none; pydantic's ValidationError (a ValueError) when
        the stored JSON is not a job."""
        raw = await self._redis.get(_job_key(tenant, purge_id))
        return None if raw is None else _JOB.validate_json(raw)

    async def save_job(self, tenant: str, job: PurgeJob) -> None:
        """Store ``job``; it stays in the pending set until it is done."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(_job_key(tenant, job.id), _dumps(_JOB.dump_python(job, mode="json", exclude_none=True)))
            if job.status is PurgeStatus.DONE:
                pipe.srem(PENDING, f"{tenant}|{job.id}")
            else:
                pipe.sadd(PENDING, f"{tenant}|{job.id}")
            await pipe.execute()

    async def pending(self) -> list[PendingPurge]:
        """Every purge not done, ordered by tenant then id."""
        members = sorted(_text(member) for member in await self._redis.smembers(PENDING))
        return [
            PendingPurge(tenant, PurgeId(purge_id))
            for tenant, _, purge_id in (member.partition("|") for member in members)
        ]

    async def drop_pending(self, tenant: str) -> int:
        """Forget every unfinished purge of ``tenant`` (its deletion removes them and their
        objects: nothing is left to resume); returns how many."""
        members = [m for m in map(_text, await self._redis.smembers(PENDING)) if m.startswith(f"{tenant}|")]
        return int(await self._redis.srem(PENDING, *members)) if members else 0

    # --- receipts ----------------------------------------------------------------------------

    async def chain_head(self, tenant: str) -> ChainHead | None:
        raw = await self._redis.get(_head_key(tenant))
        return None if raw is None else _HEAD.validate_json(raw)

    async def append_receipt(
        self, tenant: str, receipt: dict[str, Any], expected_head: ChainHead | None, new_head: ChainHead
    ) -> bool:
        """Store a receipt and move the chain head, only if the head is still ``expected_head``
        (None: the tenant has no receipt yet); False when another receipt moved it first."""
        keys = [_head_key(tenant), f"z:{{{tenant}}}:receipt:{receipt['id']}", f"z:{{{tenant}}}:receipts"]
        expected = "" if expected_head is None else _head_json(expected_head)
        args = [expected, _head_json(new_head), _dumps(receipt), receipt["id"]]
        return bool(await self._append_receipt(keys=keys, args=args))

    async def receipt(self, tenant: str, receipt_id: str) -> dict[str, Any] | None:
        raw = await self._redis.get(f"z:{{{tenant}}}:receipt:{receipt_id}")
        return json.loads(raw) if raw is not None else None

    async def receipt_ids(self, tenant: str) -> list[str]:
        return [_text(item) for item in await self._redis.lrange(f"z:{{{tenant}}}:receipts", 0, -1)]

    async def receipt_page(self, tenant: str, limit: int, after: str | None) -> ReceiptPage | None:
        """Up to ``limit`` of the tenant's receipts, newest first, from the one before ``after``
        (None: from the newest); None when ``after`` is not in the tenant's log. Two round trips:
        the log's slice (``LPOS`` from the end finds ``after``), then the receipts."""
        log = f"z:{{{tenant}}}:receipts"
        if after is None:
            end = int(await self._redis.llen(log))
        else:
            found = await self._redis.lpos(log, after, rank=-1)
            if not isinstance(found, int):  # None: not in the log (no COUNT: never a list)
                return None
            end = found
        start = max(0, end - limit)
        ids = [_text(item) for item in await self._redis.lrange(log, start, end - 1)] if end else []
        ids.reverse()
        raws = await self._redis.mget([f"z:{{{tenant}}}:receipt:{item}" for item in ids]) if ids else []
        receipts = [json.loads(raw) for raw in raws if raw is not None]
        return ReceiptPage(tuple(receipts), has_more=start > 0)


@dataclass(frozen=True)
class ReceiptPage:
    """A page of a tenant's receipt log, newest first; ``has_more``: older ones follow."""

    receipts: tuple[dict[str, Any], ...]
    has_more: bool


def durability_gap(config: dict[str, str]) -> str | None:
    """Why a completed AOF rewrite does not make deletes ``compacted`` on a server with this
    configuration (``CONFIG GET`` values), or None when it does: the AOF is on, every write is
    fsynced before the reply (``appendfsync always``: a delete acknowledged is a delete on disk,
    no second of writes to lose and replay) and no RDB snapshot is taken (``save ""``: a
    ``dump.rdb`` is a copy of the data as it was, which no AOF rewrite touches) or left behind."""
    gap = aof_gap(config)
    if gap is not None:
        return gap
    if config.get("save", "").strip():
        return f"RDB snapshots are on (save {config['save']!r}): a dump.rdb may hold the data as it was"
    if config.get("rdb_file") == "yes":
        return f"an RDB file ({config.get('dbfilename')}) from an earlier snapshot is in Redis' folder"
    return None


def _artifact_content(raw: bytes | str | None) -> _ArtifactContent | None:
    """The content an artifact record (``state/store.py``) names; None for another object."""
    record = json.loads(raw) if raw is not None else None
    if record is None or record.get("object") != "artifact":
        return None
    return _ArtifactContent(record["digest"], record["role"])


def _job_key(tenant: str, purge_id: str) -> str:
    return f"z:{{{tenant}}}:purge:{purge_id}"


def _scope_purge(tenant: str) -> str:
    """The latest purge of the tenant's cache scope."""
    return f"z:{{{tenant}}}:purge-scope"


def _head_key(tenant: str) -> str:
    return f"z:{{{tenant}}}:receipt-head"


def _head_json(head: ChainHead) -> str:
    # The script compares heads byte for byte: the same form as every head ever stored.
    return _dumps(_HEAD.dump_python(head, mode="json"))


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True)
