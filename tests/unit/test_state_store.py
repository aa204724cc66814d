"""The state store (``state/store.py``) on a real redis-server: typed results, stored format.

Invariants held here:
- appending a turn answers a typed outcome: ``TurnAppended`` with the next seq (a branch's from
  ``fork_at + 1``), ``SessionNotLive`` for an unknown, revoked or other tenant's session,
  ``TurnReplayed`` (nothing appended) for an Idempotency-Key used before;
- the Lua scripts are registered once per store and survive the server losing its script cache;
- records, turns, compilations and idempotency entries are stored as canonical JSON (keys
  sorted, compact), and what earlier versions wrote (the same JSON, revoked marks, sessions with
  no ``fork_at``, turn entries written by Lua) still loads as the same values.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Literal

import pytest
import redis.asyncio as aioredis

from zumik_serve.state.objects import (
    Artifact,
    ArtifactRole,
    Bundle,
    Compilation,
    FrozenTurn,
    Session,
    Snapshot,
    Turn,
    TurnRole,
)
from zumik_serve.state.outcomes import (
    IdempotentEntry,
    ParentNotLive,
    SessionNotLive,
    TurnAppended,
    TurnReplayed,
)
from zumik_serve.state.store import RedisStateStore
from zumik_serve.store.local_redis import LocalRedis

pytestmark = pytest.mark.redis

TENANT = "ten_store"


@pytest.fixture
async def client(module_redis: LocalRedis) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(module_redis.url)
    admin = aioredis.from_url(module_redis.admin_url)  # FLUSHALL is not the gateway's to run
    await admin.flushall()
    await admin.aclose()
    yield client
    await client.aclose()


def make_session(
    handle: str = "ses_" + "a" * 26, *, parent: str | None = None, fork_at: int = 0, created_at_s: int = 1
) -> Session:
    """A session, or a branch when it has a ``parent``."""
    kind: Literal["session", "branch"] = "session" if parent is None else "branch"
    return Session(
        id=handle, object=kind, bundle=None, created_at_s=created_at_s, parent=parent, fork_at=fork_at
    )


def make_turn(content: str = "hi") -> Turn:
    return Turn(role=TurnRole.USER, content=content, created_at_s=7)


async def test_append_answers_consecutive_seqs(client: aioredis.Redis) -> None:
    store = RedisStateStore(client)
    session = make_session()
    await store.put_record(TENANT, session)
    first = await store.append_turn(TENANT, session.id, make_turn("a"), idem_key=None, request_hash="")
    second = await store.append_turn(TENANT, session.id, make_turn("b"), idem_key=None, request_hash="")
    assert (first, second) == (TurnAppended(seq=1), TurnAppended(seq=2))
    assert [turn.content for turn in await store.own_turns(TENANT, session.id)] == ["a", "b"]


async def test_append_to_a_branch_numbers_from_its_fork(client: aioredis.Redis) -> None:
    store = RedisStateStore(client)
    branch = make_session("brn_" + "b" * 26, parent="ses_" + "a" * 26, fork_at=2)
    await store.put_record(TENANT, branch)
    outcome = await store.append_turn(TENANT, branch.id, make_turn(), idem_key=None, request_hash="")
    assert outcome == TurnAppended(seq=3)


async def test_append_to_a_session_not_live_appends_nothing(client: aioredis.Redis) -> None:
    store = RedisStateStore(client)
    session = make_session()
    unknown = await store.append_turn(TENANT, session.id, make_turn(), idem_key=None, request_hash="")
    await store.put_record(TENANT, session)
    other_tenant = await store.append_turn(
        "ten_other", session.id, make_turn(), idem_key=None, request_hash=""
    )
    assert await store.revoke(TENANT, session.id)
    revoked = await store.append_turn(TENANT, session.id, make_turn(), idem_key=None, request_hash="")
    assert unknown == other_tenant == revoked == SessionNotLive()
    assert await store.own_turn_count(TENANT, session.id) == 0
    assert await store.own_turn_count("ten_other", session.id) == 0


async def test_append_under_a_used_key_replays_the_first(client: aioredis.Redis) -> None:
    store = RedisStateStore(client)
    session = make_session()
    await store.put_record(TENANT, session)
    first = await store.append_turn(TENANT, session.id, make_turn(), idem_key="k1", request_hash="h1")
    again = await store.append_turn(TENANT, session.id, make_turn(), idem_key="k1", request_hash="h2")
    assert first == TurnAppended(seq=1)
    assert again == TurnReplayed(first=IdempotentEntry(request_hash="h1", result=1))
    assert await store.own_turn_count(TENANT, session.id) == 1
    assert await store.idempotent_result(TENANT, "k1") == IdempotentEntry(request_hash="h1", result=1)


async def test_scripts_survive_a_lost_script_cache(client: aioredis.Redis) -> None:
    store = RedisStateStore(client)
    session = make_session()
    await store.put_record(TENANT, session)
    assert await store.append_turn(TENANT, session.id, make_turn(), idem_key=None, request_hash="") == (
        TurnAppended(seq=1)
    )
    await client.script_flush()  # what a server restart does to the cache
    assert await store.append_turn(TENANT, session.id, make_turn(), idem_key=None, request_hash="") == (
        TurnAppended(seq=2)
    )
    await client.script_flush()
    assert await store.revoke(TENANT, session.id)
    assert not await store.revoke(TENANT, session.id)


async def test_records_round_trip_as_values(client: aioredis.Redis) -> None:
    store = RedisStateStore(client)
    artifact = Artifact(
        id="art_" + "a" * 26, role=ArtifactRole.DOCUMENT, media_type="text/plain", digest="d" * 64,
        size_bytes=3, created_at_s=5,
    )  # fmt: skip
    bundle = Bundle(id="bnd_" + "b" * 26, artifacts=(artifact.id,), created_at_s=6)
    snapshot = Snapshot(
        id="snp_" + "c" * 26, bundle=bundle.id, artifacts=(artifact.id,), session=None, upto_turn=0,
        turns=(FrozenTurn(TurnRole.USER, "hi"),), created_at_s=7,
    )  # fmt: skip
    await store.put_artifact(TENANT, artifact, b"abc")
    for record in (bundle, snapshot, make_session()):
        assert await store.put_record(TENANT, record)
        assert not await store.put_record(TENANT, record)  # records never change
    handles = [artifact.id, bundle.id, snapshot.id, make_session().id, "art_unknown"]
    assert await store.get_records(TENANT, handles) == [artifact, bundle, snapshot, make_session(), None]
    assert await store.get_blobs(TENANT, [artifact.digest]) == [b"abc"]
    assert await store.revoke(TENANT, bundle.id)
    assert await store.get_record(TENANT, bundle.id) is None
    assert await store.get_record_any(TENANT, bundle.id) == bundle  # frozen objects still reach it


async def test_an_object_built_on_a_revoked_or_missing_one_is_not_written(client: aioredis.Redis) -> None:
    """The parents a new object reads are checked in the same step as its write: a purge that
    revoked one since leaves no record and no link (a purge's next read of what derives from
    the parent then finds everything built on it)."""
    store = RedisStateStore(client)
    session = make_session()
    assert await store.put_record(TENANT, session)
    branch = make_session("brn_" + "d" * 26, parent=session.id, fork_at=0)
    snapshot = Snapshot(
        id="snp_" + "d" * 26, bundle=None, artifacts=(), session=session.id, upto_turn=0, turns=(),
        created_at_s=7,
    )  # fmt: skip
    assert await store.revoke(TENANT, session.id)
    for record in (branch, snapshot):
        stored = await store.put_record(TENANT, record, parents=[session.id], live=[session.id])
        assert stored == ParentNotLive(session.id)
        assert await client.exists(f"z:{{{TENANT}}}:o:{record.id}") == 0
    assert await client.smembers(f"z:{{{TENANT}}}:derived:{session.id}") == set()
    missing = "ses_" + "9" * 26
    assert await store.put_record(TENANT, branch, parents=[missing], live=[missing]) == ParentNotLive(missing)
    # A parent it only links (a snapshot's revoked artifact: it freezes it) does not stop it.
    assert await store.put_record(TENANT, snapshot, parents=[session.id]) is True
    assert await client.smembers(f"z:{{{TENANT}}}:derived:{session.id}") == {snapshot.id.encode()}


async def test_records_are_stored_as_canonical_json(client: aioredis.Redis) -> None:
    store = RedisStateStore(client)
    bundle = Bundle(id="bnd_" + "b" * 26, artifacts=("art_2", "art_1"), created_at_s=6)
    await store.put_record(TENANT, bundle, parents=["art_2", "art_1"])
    stored = await client.get(f"z:{{{TENANT}}}:o:{bundle.id}")
    expected = f'{{"artifacts":["art_2","art_1"],"created_at":6,"id":"{bundle.id}","object":"bundle"}}'
    assert stored == expected.encode()
    assert await client.smembers(f"z:{{{TENANT}}}:derived:art_1") == {bundle.id.encode()}
    session, branch = make_session(), make_session("brn_" + "b" * 26, parent="ses_" + "a" * 26, fork_at=0)
    await store.put_record(TENANT, session)
    await store.put_record(TENANT, branch)
    assert await client.get(f"z:{{{TENANT}}}:o:{session.id}") == (
        f'{{"bundle":null,"created_at":1,"id":"{session.id}","object":"session"}}'.encode()
    )  # a session's record has no parent and no fork_at; a branch's has both
    assert json.loads(await client.get(f"z:{{{TENANT}}}:o:{branch.id}"))["fork_at"] == 0
    await store.append_turn(TENANT, session.id, make_turn("é"), idem_key=None, request_hash="")
    assert await client.lrange(f"z:{{{TENANT}}}:turns:{session.id}", 0, -1) == [
        '{"content":"é","created_at":7,"role":"user"}'.encode()
    ]


async def test_records_written_by_earlier_versions_load(client: aioredis.Redis) -> None:
    def dumps(value: object) -> str:  # how every earlier version wrote records
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True)

    session = {"id": "ses_" + "s" * 26, "object": "session", "bundle": None, "created_at": 3}
    branch = {
        "id": "brn_" + "r" * 26, "object": "branch", "bundle": "bnd_x", "parent": session["id"],
        "fork_at": 1, "created_at": 4,
    }  # fmt: skip
    snapshot = {
        "id": "snp_" + "p" * 26, "object": "snapshot", "bundle": None, "artifacts": [],
        "session": session["id"], "upto_turn": 1, "turns": [{"role": "user", "content": "hi"}],
        "created_at": 5,
    }  # fmt: skip
    revoked = '{"revoked_at":99,' + dumps(
        {"id": "art_" + "t" * 26, "object": "artifact", "role": "system", "media_type": "text/plain",
         "digest": "d" * 64, "size_bytes": 1, "created_at": 2}
    )[1:]  # fmt: skip
    for record in (session, branch, snapshot):
        await client.set(f"z:{{{TENANT}}}:o:{record['id']}", dumps(record))
    await client.set(f"z:{{{TENANT}}}:o:art_{'t' * 26}", revoked)
    turn = {"role": "user", "content": "hi", "created_at": 3}
    await client.rpush(f"z:{{{TENANT}}}:turns:{session['id']}", dumps(turn))
    compilation = {"compiler_version": "v", "tokenizer_fingerprint": "t", "chat_template_digest": "c",
                   "num_tokens": 4, "token_ids_digest": "i"}  # fmt: skip
    await client.hset(f"z:{{{TENANT}}}:comp:{snapshot['id']}", "v|t|c", dumps(compilation))
    await client.set(f"z:{{{TENANT}}}:idem:create", dumps({"hash": "h", "result": {"id": "x", "n": 0}}))
    await client.set(f"z:{{{TENANT}}}:idem:turn", '{"result":2,"hash":"h2"}')  # as Lua's cjson wrote it

    store = RedisStateStore(client)
    assert await store.get_record(TENANT, str(session["id"])) == make_session(
        str(session["id"]), created_at_s=3
    )
    loaded = await store.get_record(TENANT, str(branch["id"]))
    assert isinstance(loaded, Session) and loaded.is_branch
    assert (loaded.parent, loaded.fork_at) == (session["id"], 1)
    assert await store.get_record(TENANT, str(snapshot["id"])) == Snapshot(
        id=str(snapshot["id"]), bundle=None, artifacts=(), session=str(session["id"]), upto_turn=1,
        turns=(FrozenTurn(TurnRole.USER, "hi"),), created_at_s=5,
    )  # fmt: skip
    assert await store.get_record(TENANT, "art_" + "t" * 26) is None
    artifact = await store.get_record_any(TENANT, "art_" + "t" * 26)
    assert isinstance(artifact, Artifact) and artifact.role is ArtifactRole.SYSTEM
    assert await store.own_turns(TENANT, str(session["id"])) == [
        Turn(role=TurnRole.USER, content="hi", created_at_s=3)
    ]
    assert await store.compilations(TENANT, str(snapshot["id"])) == [Compilation("v", "t", "c", 4, "i")]
    assert await store.idempotent_result(TENANT, "create") == IdempotentEntry(
        request_hash="h", result={"id": "x", "n": 0}
    )
    assert await store.idempotent_result(TENANT, "turn") == IdempotentEntry(request_hash="h2", result=2)
    # A branch record of an earlier version still numbers appended turns from its fork.
    appended = await store.append_turn(TENANT, str(branch["id"]), make_turn(), idem_key=None, request_hash="")
    assert appended == TurnAppended(seq=2)


async def test_first_idempotent_result_wins(client: aioredis.Redis) -> None:
    store = RedisStateStore(client)
    first = await store.remember_result(TENANT, "k", "h1", {"id": "one"})
    second = await store.remember_result(TENANT, "k", "h2", {"id": "two"})
    assert first == second == IdempotentEntry(request_hash="h1", result={"id": "one"})
    assert await client.get(f"z:{{{TENANT}}}:idem:k") == b'{"hash":"h1","result":{"id":"one"}}'
