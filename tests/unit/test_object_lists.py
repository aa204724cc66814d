"""``GET /v2/{kind}``: a tenant's live state objects, a page at a time. The production app over
real Redis.

Invariants:
- each kind lists the tenant's own live objects only, newest first, ``limit`` a page, ``after``
  the ``last_id`` of the page before, ``has_more`` while older ones follow;
- an item is what a read of it shows, without content (an artifact's bytes, a session's turns,
  a snapshot's compilations); a session's ``head`` is its last turn;
- a revoked or purged object leaves its list at once; as ``after`` it is a 404 naming ``after``,
  as is another tenant's handle; a bad ``limit`` or an ``after`` of another kind is a 400;
- objects stored before the lists existed are listed too (the index is filled once per tenant),
  revoked ones still not.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from tests.support.inprocess import make_gateway
from zumik_serve.store.client import gateway_client


async def _make(http: Any, path: str, body: dict[str, Any]) -> str:
    created = await http.post(path, json=body)
    assert created.status_code == 201, created.text
    await asyncio.sleep(0.003)  # newest first is by the millisecond each was stored
    return str(created.json().get("id"))  # a turn's answer has none


def _doc(content: str) -> dict[str, str]:
    return {"role": "document", "content": content}


async def _list(http: Any, kind: str, **params: str) -> dict[str, Any]:
    listed = await http.get(f"/v2/{kind}", params=params)
    assert listed.status_code == 200, listed.text
    page: dict[str, Any] = listed.json()
    return page


async def test_each_kind_lists_its_live_objects_newest_first_a_page_at_a_time(
    module_redis_url: str, tiny_model_dir: Path
) -> None:
    gateway = make_gateway(module_redis_url, tiny_model_dir)
    mine, theirs = await gateway.create_tenant("lists-mine"), await gateway.create_tenant("lists-theirs")
    async with gateway.client(mine) as http:
        arts = [
            await _make(http, "/v2/artifacts", {"role": "document", "content": f"doc {n}"}) for n in range(3)
        ]
        bundle = await _make(http, "/v2/bundles", {"artifacts": arts[:2]})
        session = await _make(http, "/v2/sessions", {"bundle": bundle})
        for text in ("one", "two"):
            await _make(http, f"/v2/sessions/{session}/turns", {"role": "user", "content": text})
        branch = await _make(http, f"/v2/sessions/{session}/branches", {"at_turn": 1})
        snapshot = await _make(http, "/v2/snapshots", {"session": session})

        first = await _list(http, "artifacts", limit="2")
        second = await _list(http, "artifacts", limit="2", after=first["last_id"])
        sessions, branches = await _list(http, "sessions"), await _list(http, "branches")
        snapshots, bundles = await _list(http, "snapshots"), await _list(http, "bundles")
        read_artifact = (await http.get(f"/v2/artifacts/{arts[2]}")).json()

        assert [item["id"] for item in first["data"]] == [arts[2], arts[1]] and first["has_more"]
        assert (first["first_id"], first["last_id"]) == (arts[2], arts[1])
        assert [item["id"] for item in second["data"]] == [arts[0]] and not second["has_more"]
        assert first["data"][0] == {k: v for k, v in read_artifact.items() if k != "content"}
        assert [item["id"] for item in bundles["data"]] == [bundle]
        assert [(s["id"], s["head"]) for s in sessions["data"]] == [(session, 2)]
        assert "turns" not in sessions["data"][0]
        (listed_branch,) = branches["data"]
        assert (listed_branch["id"], listed_branch["parent"], listed_branch["at_turn"]) == (
            branch,
            session,
            1,
        )
        assert listed_branch["head"] == 1
        (listed_snapshot,) = snapshots["data"]
        assert listed_snapshot["id"] == snapshot and listed_snapshot["num_turns"] == 2
        assert "compilations" not in listed_snapshot

        assert (await http.delete(f"/v2/artifacts/{arts[1]}")).status_code == 200
        purged = await http.post("/v2/purge", json={"target": arts[2]})
        assert purged.status_code == 200, purged.text
        assert [item["id"] for item in (await _list(http, "artifacts"))["data"]] == [arts[0]]
        gone = await http.get("/v2/artifacts", params={"after": arts[1]})
        assert (gone.status_code, gone.json()["error"]["param"]) == (404, "after")
        bad_limit = await http.get("/v2/sessions", params={"limit": "101"})
        assert (bad_limit.status_code, bad_limit.json()["error"]["param"]) == (400, "limit")
        wrong_kind = await http.get("/v2/artifacts", params={"after": snapshot})
        assert (wrong_kind.status_code, wrong_kind.json()["error"]["param"]) == (400, "after")

    async with gateway.client(theirs) as http:
        for kind in ("artifacts", "bundles", "sessions", "branches", "snapshots"):
            assert (await _list(http, kind))["data"] == []
        foreign = await http.get("/v2/artifacts", params={"after": arts[0]})
        assert foreign.status_code == 404


async def test_objects_stored_before_the_lists_existed_are_listed_and_revoked_ones_are_not(
    module_redis_url: str, tiny_model_dir: Path
) -> None:
    gateway = make_gateway(module_redis_url, tiny_model_dir)
    key = await gateway.create_tenant("lists-upgrade")
    async with gateway.client(key) as http:
        arts = []
        for n in range(3):
            arts.append(await _make(http, "/v2/artifacts", {"role": "document", "content": f"old {n}"}))
            await asyncio.sleep(1.05)  # the backfill orders by created_at, in whole seconds
        session = await _make(http, "/v2/sessions", {})
        assert (await http.delete(f"/v2/artifacts/{arts[0]}")).status_code == 200
    redis = gateway_client(module_redis_url)
    try:
        (object_key,) = [key async for key in redis.scan_iter(match=f"z:*:o:{session}")]
        tenant_id = object_key.decode().split("}")[0][3:]
        indexes = [key async for key in redis.scan_iter(match=f"z:{{{tenant_id}}}:idx*")]
        assert indexes  # the lists' keys, removed below as if an earlier version had stored these
        await redis.delete(*indexes)
    finally:
        await redis.aclose()
    async with gateway.client(key) as http:
        listed = await _list(http, "artifacts")
        sessions = await _list(http, "sessions")
    assert [item["id"] for item in listed["data"]] == [arts[2], arts[1]]  # newest first; arts[0] revoked
    assert [item["id"] for item in sessions["data"]] == [session]


async def test_a_member_revoked_by_an_earlier_version_is_skipped_and_paging_goes_on(
    module_redis_url: str, tiny_model_dir: Path
) -> None:
    """An earlier gateway revokes without touching the lists: the list skips what is no longer
    live, takes it out, and still fills its page from older objects."""
    gateway = make_gateway(module_redis_url, tiny_model_dir)
    key = await gateway.create_tenant("lists-stale")
    async with gateway.client(key) as http:
        arts = [
            await _make(http, "/v2/artifacts", {"role": "document", "content": f"s{n}"}) for n in range(5)
        ]
    redis = gateway_client(module_redis_url)
    try:
        for handle in arts[2:4]:  # the two newest but one, revoked as an earlier version did
            (object_key,) = [key async for key in redis.scan_iter(match=f"z:*:o:{handle}")]
            raw = await redis.get(object_key)
            await redis.set(object_key, b'{"revoked_at":1,' + raw[1:])
        async with gateway.client(key) as http:
            first = await _list(http, "artifacts", limit="2")
            second = await _list(http, "artifacts", limit="2", after=first["last_id"])
        index = object_key.decode().split(":o:")[0] + ":idx:art"
        remaining = {member.decode() for member in await redis.zrange(index, 0, -1)}
    finally:
        await redis.aclose()
    assert [item["id"] for item in first["data"]] == [arts[4], arts[1]] and first["has_more"]
    assert [item["id"] for item in second["data"]] == [arts[0]] and not second["has_more"]
    assert remaining == {arts[0], arts[1], arts[4]}  # the stale members were taken out
