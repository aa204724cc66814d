"""StateService (``state/service.py``) over a real redis-server: typed bodies in, /v2 JSON out.

Invariants held here:
- the JSON bodies keep their keys and key order: a create answers in field order, a read of an
  artifact or a bundle (and a replay under an Idempotency-Key) serves the stored record, keys
  sorted; a branch has ``parent`` and ``at_turn``, a session neither (absent, not null);
- a request model and the same body as a mapping give the same answer (callers that still pass
  parsed JSON keep working);
- content limits are 413s; rules that need the store (unknown artifacts, turns that do not
  exist) name the field; handles are tenant-scoped and a revoked one is 404;
- an Idempotency-Key replays the first result for the same body and is a 422 for another;
- a snapshot is frozen (later appends do not change it), compiles the same way twice, pins its
  compilation once, and still reaches an artifact revoked after it was made.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from zumik_serve.engines.hf_tokenizer import HfChatTokenizer
from zumik_serve.errors import (
    IdempotencyConflictError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    UnprocessableError,
)
from zumik_serve.model.tiny import build_tiny_model
from zumik_serve.state.objects import ArtifactRole, ObjectKind, TurnRole
from zumik_serve.state.requests import (
    AppendTurn,
    CreateArtifact,
    CreateBranch,
    CreateBundle,
    CreateSession,
    CreateSnapshot,
)
from zumik_serve.state.service import MAX_TURN_CONTENT_BYTES, StateService
from zumik_serve.state.store import RedisStateStore
from zumik_serve.store.local_redis import LocalRedis

pytestmark = pytest.mark.redis

TENANT = "ten_a"
MAX_ARTIFACT_BYTES = 1024


@pytest.fixture
async def state(module_redis: LocalRedis) -> AsyncIterator[StateService]:
    client = aioredis.from_url(module_redis.url)
    admin = aioredis.from_url(module_redis.admin_url)  # FLUSHALL is not the gateway's to run
    await admin.flushall()
    await admin.aclose()
    yield StateService(RedisStateStore(client), max_artifact_bytes=MAX_ARTIFACT_BYTES)
    await client.aclose()


def make_artifact(content: str, role: ArtifactRole = ArtifactRole.DOCUMENT) -> CreateArtifact:
    return CreateArtifact(role=role, content=content)


def user(content: str) -> AppendTurn:
    return AppendTurn(role=TurnRole.USER, content=content)


def keys(body: dict[str, Any]) -> list[str]:
    return list(body)


async def test_artifact_bodies_keep_their_keys_and_order(state: StateService) -> None:
    created = await state.create_artifact(TENANT, make_artifact("policy"), None)
    assert keys(created) == ["id", "object", "role", "media_type", "digest", "size_bytes", "created_at"]
    assert created["object"] == "artifact" and created["media_type"] == "text/plain; charset=utf-8"
    assert created["size_bytes"] == len("policy") and created["id"].startswith("art_")
    # The same content again is the stored record (content-addressed), served keys sorted.
    again = await state.create_artifact(TENANT, make_artifact("policy"), None)
    assert again == created and keys(again) == sorted(created)
    read = await state.read(TENANT, ObjectKind.ARTIFACTS, created["id"])
    assert read == {**created, "content": "policy"} and keys(read) == [*sorted(created), "content"]
    raw = await state.create_artifact(
        TENANT,
        CreateArtifact(
            role=ArtifactRole.DOCUMENT, content_b64="AAECAwT/", media_type="application/octet-stream"
        ),
        None,
    )
    assert (await state.read(TENANT, ObjectKind.ARTIFACTS, raw["id"]))["content_b64"] == "AAECAwT/"


async def test_bundle_session_branch_and_turn_bodies(state: StateService) -> None:
    first = (await state.create_artifact(TENANT, make_artifact("one"), None))["id"]
    second = (await state.create_artifact(TENANT, make_artifact("two"), None))["id"]
    bundle = await state.create_bundle(TENANT, CreateBundle(artifacts=(second, first)), None)
    assert keys(bundle) == ["id", "object", "artifacts", "created_at"] and bundle["artifacts"] == [
        second,
        first,
    ]
    read_bundle = await state.read(TENANT, ObjectKind.BUNDLES, bundle["id"])
    assert read_bundle == bundle and keys(read_bundle) == sorted(bundle)

    session = await state.create_session(TENANT, CreateSession(bundle=bundle["id"]), None)
    assert keys(session) == ["id", "object", "bundle", "created_at", "head"]
    assert (session["object"], session["bundle"], session["head"]) == ("session", bundle["id"], 0)
    turns = [await state.append_turn(TENANT, session["id"], user(f"p{i}"), None) for i in range(3)]
    assert turns[0] == {"object": "turn", "session": session["id"], "seq": 1, "role": "user"}
    assert [turn["seq"] for turn in turns] == [1, 2, 3]

    branch = await state.create_branch(TENANT, session["id"], CreateBranch(at_turn=2), None)
    assert keys(branch) == ["id", "object", "bundle", "created_at", "head", "parent", "at_turn"]
    assert (branch["object"], branch["parent"], branch["at_turn"], branch["head"]) == (
        "branch", session["id"], 2, 2,
    )  # fmt: skip
    turn = AppendTurn(role=TurnRole.ASSISTANT, content="b")
    assert (await state.append_turn(TENANT, branch["id"], turn, None))["seq"] == 3
    read_branch = await state.read(TENANT, ObjectKind.BRANCHES, branch["id"])
    assert keys(read_branch) == [*keys(branch), "turns"] and read_branch["head"] == 3
    assert [(t["seq"], t["content"]) for t in read_branch["turns"]] == [(1, "p0"), (2, "p1"), (3, "b")]
    assert keys(read_branch["turns"][0]) == ["seq", "role", "content", "created_at"]
    read_session = await state.read(TENANT, ObjectKind.SESSIONS, session["id"])
    assert "parent" not in read_session and "at_turn" not in read_session
    assert [t["content"] for t in read_session["turns"]] == ["p0", "p1", "p2"]


async def test_snapshot_is_frozen_and_compiles_once(state: StateService, tmp_path: Path) -> None:
    system = await state.create_artifact(TENANT, make_artifact("You are terse.", ArtifactRole.SYSTEM), None)
    bundle = (await state.create_bundle(TENANT, CreateBundle(artifacts=(system["id"],)), None))["id"]
    session = (await state.create_session(TENANT, CreateSession(), None))["id"]
    await state.append_turn(TENANT, session, user("first"), None)
    snapshot = await state.create_snapshot(TENANT, CreateSnapshot(bundle=bundle, session=session), None)
    assert keys(snapshot) == [
        "id", "object", "bundle", "artifacts", "session", "upto_turn", "created_at", "num_turns",
        "compilations",
    ]  # fmt: skip
    assert (snapshot["upto_turn"], snapshot["num_turns"], snapshot["compilations"]) == (1, 1, [])
    await state.append_turn(TENANT, session, user("second"), None)
    assert await state.read(TENANT, ObjectKind.SNAPSHOTS, snapshot["id"]) == snapshot

    tokenizer = HfChatTokenizer(build_tiny_model(tmp_path / "tiny"))
    compiled = await state.compile_snapshot(TENANT, snapshot["id"], tokenizer)
    again = await state.compile_snapshot(TENANT, snapshot["id"], tokenizer)
    assert compiled.token_ids == again.token_ids
    assert [m["content"] for m in compiled.messages] == ["You are terse.", "first"]
    pinned = (await state.read(TENANT, ObjectKind.SNAPSHOTS, snapshot["id"]))["compilations"]
    assert pinned == [compiled.compilation.record()] and keys(pinned[0]) == sorted(pinned[0])

    # Frozen: an artifact revoked later still belongs to the snapshot.
    await state.revoke(TENANT, ObjectKind.ARTIFACTS, system["id"])
    messages = await state.snapshot_messages(TENANT, snapshot["id"])
    assert messages[0] == {"role": "system", "content": "You are terse."}


async def test_content_limits_are_413(state: StateService) -> None:
    with pytest.raises(PayloadTooLargeError):
        await state.create_artifact(TENANT, make_artifact("x" * (MAX_ARTIFACT_BYTES + 1)), None)
    session = (await state.create_session(TENANT, CreateSession(), None))["id"]
    with pytest.raises(PayloadTooLargeError):
        await state.append_turn(TENANT, session, user("x" * (MAX_TURN_CONTENT_BYTES + 1)), None)


async def test_rules_that_need_the_store_name_the_field(state: StateService) -> None:
    mine = (await state.create_artifact(TENANT, make_artifact("mine"), None))["id"]
    foreign = (await state.create_artifact("ten_b", make_artifact("theirs"), None))["id"]
    with pytest.raises(UnprocessableError) as unknown:
        await state.create_bundle(TENANT, CreateBundle(artifacts=(mine, foreign)), None)
    assert unknown.value.param == "artifacts[1]" and unknown.value.code == "unknown_artifact"

    session = (await state.create_session(TENANT, CreateSession(), None))["id"]
    await state.append_turn(TENANT, session, user("one"), None)
    for at_turn in (-1, 2):
        with pytest.raises(InvalidRequestError) as fork:
            await state.create_branch(TENANT, session, CreateBranch(at_turn=at_turn), None)
        assert fork.value.param == "at_turn"
    with pytest.raises(InvalidRequestError) as upto:
        await state.create_snapshot(TENANT, CreateSnapshot(session=session, upto_turn=7), None)
    assert upto.value.param == "upto_turn"
    with pytest.raises(NotFoundError) as bundle:
        await state.create_session(TENANT, CreateSession(bundle="bnd_" + "x" * 26), None)
    assert bundle.value.param == "bundle"


async def test_handles_are_tenant_scoped_and_revocation_is_final(state: StateService) -> None:
    artifact = await state.create_artifact(TENANT, make_artifact("secret"), None)
    session = (await state.create_session(TENANT, CreateSession(), None))["id"]
    with pytest.raises(NotFoundError):
        await state.read("ten_b", ObjectKind.ARTIFACTS, artifact["id"])
    with pytest.raises(NotFoundError):
        await state.append_turn("ten_b", session, user("x"), None)
    with pytest.raises(NotFoundError):
        await state.read(TENANT, ObjectKind.SESSIONS, artifact["id"])  # a handle of another kind
    with pytest.raises(NotFoundError):
        await state.read(TENANT, ObjectKind.BRANCHES, session)

    assert await state.revoke(TENANT, ObjectKind.SESSIONS, session) == {"id": session, "revoked": True}
    with pytest.raises(NotFoundError):
        await state.revoke(TENANT, ObjectKind.SESSIONS, session)
    with pytest.raises(NotFoundError):
        await state.append_turn(TENANT, session, user("x"), None)
    with pytest.raises(NotFoundError):
        await state.use_session(TENANT, session)
    await state.revoke(TENANT, ObjectKind.ARTIFACTS, artifact["id"])
    again = await state.create_artifact(TENANT, make_artifact("secret"), None)
    assert again["id"] != artifact["id"]


async def test_idempotency_key_replays_the_first_result(state: StateService) -> None:
    first = await state.create_session(TENANT, CreateSession(), "key-1")
    replayed = await state.create_session(TENANT, CreateSession(), "key-1")
    assert json.dumps(replayed) == json.dumps(dict(sorted(first.items())))  # served as stored
    with pytest.raises(IdempotencyConflictError):
        await state.create_snapshot(TENANT, CreateSnapshot(session=first["id"]), "key-1")

    seqs = [(await state.append_turn(TENANT, first["id"], user("once"), "key-2"))["seq"] for _ in range(3)]
    assert seqs == [1, 1, 1]
    assert len((await state.read(TENANT, ObjectKind.SESSIONS, first["id"]))["turns"]) == 1
    with pytest.raises(IdempotencyConflictError):
        await state.append_turn(TENANT, first["id"], user("other"), "key-2")
    with pytest.raises(IdempotencyConflictError):  # a create's key is not a turn's
        await state.append_turn(TENANT, first["id"], user("once"), "key-1")


async def test_a_branch_chain_deeper_than_python_recursion_reads_and_snapshots(state: StateService) -> None:
    """Branches of branches as deep as a tenant makes them: reading the deepest one walks its
    parents in a loop (it once recursed, and 1,100 levels gave a 500); its turns are each
    level's own, in order, and a limit stops inside the chain."""
    service = state
    tenant = "ten_deep"
    head = (await service.create_session(tenant, CreateSession(), None))["id"]
    await service.append_turn(tenant, head, user("turn 1"), None)
    depth = 1_100
    for level in range(depth):
        head = (await service.create_branch(tenant, head, CreateBranch(at_turn=level + 1), None))["id"]
        await service.append_turn(
            tenant, head, AppendTurn(role=TurnRole.USER, content=f"turn {level + 2}"), None
        )
    read = await service.read(tenant, ObjectKind.BRANCHES, head)
    assert [turn["content"] for turn in read["turns"]] == [f"turn {n}" for n in range(1, depth + 2)]
    assert [turn.content for turn in await service.conversation(tenant, head, 3)] == [
        "turn 1",
        "turn 2",
        "turn 3",
    ]
    snapshot = await service.create_snapshot(tenant, CreateSnapshot(session=head, upto_turn=5), None)
    assert snapshot["upto_turn"] == 5
