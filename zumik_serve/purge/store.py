"""Purges in Redis: what a target reaches, removing it, compacting Redis' files, jobs, receipts.

    z:{tenant}:purge:{prg}            JSON job: target, closure, exposed, steps done, status
    z:{tenant}:purge-target:{handle}  the purge id of a target (one purge per target)
    zumik:purges:pending              set of "{tenant}|{prg}" not finished (resumed at start)
    z:{tenant}:receipt:{prg}          a signed receipt (JSON), never changed
    z:{tenant}:receipts               list of receipt ids, oldest first (the tenant's log)
    z:{tenant}:receipt-head           {"seq", "hash"} of the newest receipt (the chain's head)
    zumik:receipt-signing-key         Ed25519 private key (PEM), created once
    zumik:receipt-public-keys         hash key_id → public key PEM (every key ever used)

Appending a receipt is one Lua script that checks the chain head it was built on, so two
purges of one tenant can never fork the chain. Compaction is ``BGREWRITEAOF`` started after the
deletes, awaited to completion (``aof_rewrites`` moved on, status ok), then a check that the
AOF folder holds only the files the new manifest names when that folder is reachable here.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from kvstore.tiers.redis_keyring import DESTROYED, TOMBSTONE_TTL_S, keyring_key
from zumik_serve.state.store import REVOKE, RedisStateStore, bydigest_key, derived_key, exposed_key

PENDING = "zumik:purges:pending"
SIGNING_KEY = "zumik:receipt-signing-key"
PUBLIC_KEYS = "zumik:receipt-public-keys"
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


@dataclass(frozen=True)
class Compaction:
    done: bool
    detail: str


class RedisPurgeStore:
    def __init__(self, client: aioredis.Redis, state: RedisStateStore) -> None:
        self._redis = client
        self._state = state

    # --- what a target reaches ---------------------------------------------------------------

    async def record_any(self, tenant: str, handle: str) -> dict[str, Any] | None:
        raw = await self._redis.get(_obj(tenant, handle))
        return json.loads(raw) if raw is not None else None

    async def closure(self, tenant: str, target: str) -> list[str]:
        """The target and everything built on it (bundles of an artifact, snapshots of a bundle
        or session, branches of a session, ...), and artifacts holding the same content: the
        target first, then breadth first."""
        seen = [target]
        frontier = [target]
        while frontier:
            async with self._redis.pipeline(transaction=False) as pipe:
                for handle in frontier:
                    pipe.smembers(derived_key(tenant, handle))
                    pipe.get(_obj(tenant, handle))
                replies = await pipe.execute()
            found: list[str] = []
            for index in range(len(frontier)):
                found.extend(_text(member) for member in replies[2 * index])
                raw = replies[2 * index + 1]
                record = json.loads(raw) if raw is not None else None
                if record is not None and record.get("object") == "artifact":
                    found.extend(
                        _text(m) for m in await self._redis.smembers(bydigest_key(tenant, record["digest"]))
                    )
            frontier = [handle for handle in dict.fromkeys(sorted(found)) if handle not in seen]
            seen.extend(frontier)
        return seen

    async def any_exposed(self, tenant: str, handles: list[str]) -> bool:
        flags = await self._redis.smismember(exposed_key(tenant), handles)
        return any(flags)

    # --- removal -----------------------------------------------------------------------------

    async def revoke_all(self, tenant: str, handles: list[str]) -> None:
        """Revoke every handle; purged content sent again gets a new handle, never the old one."""
        now = int(time.time())
        for handle in handles:
            record = await self.record_any(tenant, handle)
            await self._redis.eval(REVOKE, 1, _obj(tenant, handle), now)
            if record is not None and record.get("object") == "artifact":
                await self._state.bump_artifact_generation(tenant, f"{record['digest']}|{record['role']}")

    async def delete_objects(self, tenant: str, handles: list[str]) -> int:
        """Remove every key that holds these objects or their content; returns keys removed."""
        records = [await self.record_any(tenant, handle) for handle in handles]
        keys: list[str] = []
        for handle, record in zip(handles, records, strict=True):
            keys += [_obj(tenant, handle), derived_key(tenant, handle), f"z:{{{tenant}}}:turns:{handle}",
                     f"z:{{{tenant}}}:comp:{handle}"]  # fmt: skip
            if record is not None and record.get("object") == "artifact":
                keys += [f"z:{{{tenant}}}:blob:{record['digest']}", bydigest_key(tenant, record["digest"])]
        removed = int(await self._redis.unlink(*keys))
        await self._redis.srem(exposed_key(tenant), *handles)
        # Idempotency results name the objects they created; a retry must not resurrect them.
        marked = [handle.encode() for handle in handles]
        async for key in self._redis.scan_iter(match=f"z:{{{tenant}}}:idem:*", count=1000):
            value = await self._redis.get(key)
            if value is not None and any(handle in value for handle in marked):
                removed += int(await self._redis.unlink(key))
        return removed

    async def destroy_data_keys(self, scopes: list[str]) -> None:
        """Replace each scope's KV data key with a tombstone (``kvstore/tiers/redis_keyring.py``)."""
        async with self._redis.pipeline(transaction=True) as pipe:
            for scope in scopes:
                pipe.set(keyring_key(scope), DESTROYED, ex=TOMBSTONE_TTL_S)
            await pipe.execute()

    async def compact(self, *, timeout_s: float = COMPACTION_TIMEOUT_S) -> Compaction:
        """Rewrite Redis' persistence so that deleted values leave its files too."""
        config = await self._redis.config_get("appendonly")
        if _text(config.get("appendonly", "no")) != "yes":
            return Compaction(False, "Redis runs without an AOF; its RDB snapshots are not rewritten here")
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

    async def claim(self, tenant: str, target: str, job: dict[str, Any]) -> dict[str, Any]:
        """Start ``job`` for ``target`` unless a purge of it exists; returns the job that won."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(f"z:{{{tenant}}}:purge-target:{target}", job["id"], nx=True)
            pipe.get(f"z:{{{tenant}}}:purge-target:{target}")
            claimed, winner = await pipe.execute()
        if not claimed:
            existing = await self.job(tenant, _text(winner))
            if existing is not None:
                return existing
        await self.save_job(tenant, job)
        return job

    async def index_purged(self, tenant: str, handles: list[str], purge_id: str) -> None:
        """Remember which purge removes each handle: purging one of them later returns that
        purge's receipt instead of "not found"."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for handle in handles:
                pipe.set(f"z:{{{tenant}}}:purge-target:{handle}", purge_id, nx=True)
            await pipe.execute()

    async def job_for_target(self, tenant: str, target: str) -> dict[str, Any] | None:
        purge_id = await self._redis.get(f"z:{{{tenant}}}:purge-target:{target}")
        return None if purge_id is None else await self.job(tenant, _text(purge_id))

    async def job(self, tenant: str, purge_id: str) -> dict[str, Any] | None:
        raw = await self._redis.get(f"z:{{{tenant}}}:purge:{purge_id}")
        return json.loads(raw) if raw is not None else None

    async def save_job(self, tenant: str, job: dict[str, Any]) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(f"z:{{{tenant}}}:purge:{job['id']}", _dumps(job))
            if job["status"] == "done":
                pipe.srem(PENDING, f"{tenant}|{job['id']}")
            else:
                pipe.sadd(PENDING, f"{tenant}|{job['id']}")
            await pipe.execute()

    async def pending(self) -> list[tuple[str, str]]:
        members = sorted(_text(member) for member in await self._redis.smembers(PENDING))
        return [(tenant, purge_id) for tenant, _, purge_id in (m.partition("|") for m in members)]

    # --- receipts ----------------------------------------------------------------------------

    async def chain_head(self, tenant: str) -> dict[str, Any] | None:
        raw = await self._redis.get(f"z:{{{tenant}}}:receipt-head")
        return json.loads(raw) if raw is not None else None

    async def append_receipt(
        self,
        tenant: str,
        receipt: dict[str, Any],
        expected_head: dict[str, Any] | None,
        new_head: dict[str, Any],
    ) -> bool:
        """Store a receipt and move the chain head, only if the head is still ``expected_head``."""
        keys = [
            f"z:{{{tenant}}}:receipt-head",
            f"z:{{{tenant}}}:receipt:{receipt['id']}",
            f"z:{{{tenant}}}:receipts",
        ]
        expected = _dumps(expected_head) if expected_head is not None else ""
        reply = await self._redis.eval(
            APPEND_RECEIPT, len(keys), *keys, expected, _dumps(new_head), _dumps(receipt), receipt["id"]
        )
        return bool(reply)

    async def receipt(self, tenant: str, receipt_id: str) -> dict[str, Any] | None:
        raw = await self._redis.get(f"z:{{{tenant}}}:receipt:{receipt_id}")
        return json.loads(raw) if raw is not None else None

    async def receipt_ids(self, tenant: str) -> list[str]:
        return [_text(item) for item in await self._redis.lrange(f"z:{{{tenant}}}:receipts", 0, -1)]

    async def signing_key_pem(self, generate: Any) -> bytes:
        """The receipt signing key, created by ``generate()`` (PEM bytes) on first use."""
        await self._redis.set(SIGNING_KEY, generate(), nx=True)
        value = await self._redis.get(SIGNING_KEY)
        if value is None:
            raise RedisError("the receipt signing key vanished")
        return value if isinstance(value, bytes) else value.encode()

    async def publish_public_key(self, key_id: str, public_pem: bytes) -> None:
        await self._redis.hsetnx(PUBLIC_KEYS, key_id, public_pem)

    async def public_keys(self) -> dict[str, bytes]:
        return {
            _text(k): v if isinstance(v, bytes) else v.encode()
            for k, v in (await self._redis.hgetall(PUBLIC_KEYS)).items()
        }


def _obj(tenant: str, handle: str) -> str:
    return f"z:{{{tenant}}}:o:{handle}"


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True)
