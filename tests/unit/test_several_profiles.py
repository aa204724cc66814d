"""One gateway serving several profiles (issue #17: "a cluster can serve several profiles"), on
real parts: redis-server, the production wiring (``make_gateway_app`` with ``more``), one fake
engine per profile.

Invariants held here:
- without ``x-zumik-profile`` a request runs on the first profile; with a served profile's name
  it runs on that profile's own engines, decision and all; a name served nowhere here is a 404
  naming every served profile; a profile outside the tenant's policy is a 403 even when served;
- ``GET /v2/profiles`` lists every served profile the tenant may use, and only those;
- a purge through any profile sweeps every served profile's KV tiers (one profile's blocks are
  not left behind because the request named another); profiles whose tiers live in different
  places cannot share a gateway;
- several profiles need the separate placement (a colocated gateway is one engine's).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from kvstore.keys import scope_id
from kvstore.tier import BlockAddress, BlockKey, ScopeId
from kvstore.tiers.build import build_tiers
from profiles import GatewayPlacement, Profile, load_builtin
from tests.support.fake_engine import FakeEngine
from tests.support.inprocess import DEV_KEY, gateway_settings, shared_secrets_dir
from zumik_serve.app.context import ServedProfile, make_gateway_app, purge_tier_config
from zumik_serve.server_secrets import generate_missing, load_server_secrets
from zumik_serve.store.client import gateway_client
from zumik_serve.tenancy.store import RedisTenantStore
from zumik_serve.tenancy.tenant import TenantId, cache_salt

MODEL = "zumik-tiny"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4}
COMPAT = "c" * 64


def _profiles() -> tuple[Profile, Profile]:
    first = load_builtin("local-cpu")
    first = first.model_copy(
        update={"gateway": first.gateway.model_copy(update={"placement": GatewayPlacement.SEPARATE})}
    )
    second = first.model_copy(update={"name": "local-cpu-second", "description": "the second profile"})
    return first, second


class Served:
    def __init__(self, app: FastAPI, engines: tuple[FakeEngine, FakeEngine], redis_url: str) -> None:
        self.app, self.engines, self.redis_url = app, engines, redis_url

    def client(self, key: str = DEV_KEY) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://zumik.test",
            headers={"Authorization": f"Bearer {key}"},
        )  # fmt: skip

    async def tenant(self, name: str, **options: Any) -> tuple[str, str]:
        client = gateway_client(self.redis_url)
        try:
            tenant, key = await RedisTenantStore(client).create_tenant(name, **options)
        finally:
            await client.aclose()
        return str(tenant.id), key


def _serve(redis_url: str, model_dir: Path, first_tiers: dict[str, Any] | None = None) -> Served:
    secrets = shared_secrets_dir()
    generate_missing(secrets)
    first, second = _profiles()
    engines = (FakeEngine(replica_id="first-r0"), FakeEngine(replica_id="second-r0"))
    settings_first = gateway_settings(redis_url, model_dir, first, secrets)
    if first_tiers is not None:
        settings_first = type(settings_first)(**{**vars(settings_first), "kv_tiers": first_tiers})
    settings_second = gateway_settings(redis_url, model_dir, second, secrets)
    app = make_gateway_app(
        settings_first, {"r0": engines[0]}, more=[ServedProfile(settings_second, {"r0": engines[1]})]
    )
    return Served(app, engines, redis_url)


async def test_the_header_picks_the_profile_and_its_engines(
    module_redis_url: str, tiny_model_dir: Path
) -> None:
    served = _serve(module_redis_url, tiny_model_dir)
    first, second = served.engines
    _, key = await served.tenant("several-any")
    async with served.client(key) as http:
        plain = await http.post("/v1/chat/completions", json=CHAT)
        named = await http.post(
            "/v1/chat/completions", json=CHAT, headers={"x-zumik-profile": "local-cpu-second"}
        )
        generated = await http.post(
            "/v2/generate",
            json={"input": "Say hi", "max_tokens": 4},
            headers={"x-zumik-profile": "local-cpu-second"},
        )
        nowhere = await http.post(
            "/v1/chat/completions", json=CHAT, headers={"x-zumik-profile": "llama-8b-h100"}
        )
        decision = (await http.get(f"/v2/decisions/{named.headers['x-zumik-decision-id']}")).json()
    assert plain.status_code == named.status_code == generated.status_code == 200, (plain.text, named.text)
    assert len(first.calls) == 1 and len(second.calls) == 2  # each profile's own engines
    assert decision["record"]["inputs"]["profile_name"] == "local-cpu-second"
    assert nowhere.status_code == 404
    error = nowhere.json()["error"]
    assert error["code"] == "profile_not_found" and error["param"] == "x-zumik-profile"
    assert "'local-cpu'" in error["message"] and "'local-cpu-second'" in error["message"]
    assert len(first.calls) + len(second.calls) == 3  # the 404 reached no engine


async def test_policy_and_the_profile_list_follow_the_tenant(
    module_redis_url: str, tiny_model_dir: Path
) -> None:
    served = _serve(module_redis_url, tiny_model_dir)
    _, limited = await served.tenant("several-limited", profiles=frozenset({"local-cpu"}))
    _, anyone = await served.tenant("several-all")
    async with served.client(limited) as http:
        refused = await http.post(
            "/v1/chat/completions", json=CHAT, headers={"x-zumik-profile": "local-cpu-second"}
        )
        allowed = await http.post("/v1/chat/completions", json=CHAT)
        mine = (await http.get("/v2/profiles")).json()["data"]
    async with served.client(anyone) as http:
        every = (await http.get("/v2/profiles")).json()["data"]
    assert refused.status_code == 403 and refused.json()["error"]["type"] == "permission_error"
    assert allowed.status_code == 200
    assert sum(len(engine.calls) for engine in served.engines) == 1  # the 403 reached no engine
    assert [p["name"] for p in mine] == ["local-cpu"]
    assert [p["name"] for p in every] == ["local-cpu", "local-cpu-second"]


@pytest.mark.redis
async def test_a_purge_through_one_profile_sweeps_the_others_tiers(
    module_redis_url: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    tiers = {"compat_digest": COMPAT, "disk_root": str(tmp_path / "disk"), "disk_capacity_bytes": 1 << 20}
    served = _serve(module_redis_url, tiny_model_dir, first_tiers=tiers)  # the second has no tiers
    tenant, key = await served.tenant("several-purge")
    secret = load_server_secrets(shared_secrets_dir()).cache_salt_secret
    scope = ScopeId(scope_id(cache_salt(secret, TenantId(tenant), 0)))
    (disk,) = build_tiers(tiers)
    for index in range(3):  # the first profile's engines stored these blocks of the tenant's
        assert disk.store(BlockAddress(COMPAT, BlockKey(f"{index:032x}"), scope), b"block")
    second = {"x-zumik-profile": "local-cpu-second"}
    async with served.client(key) as http:
        art = (await http.post("/v2/artifacts", json={"role": "document", "content": "policy"})).json()["id"]
        bnd = (await http.post("/v2/bundles", json={"artifacts": [art]})).json()["id"]
        snp = (await http.post("/v2/snapshots", json={"bundle": bnd})).json()["id"]
        ran = await http.post(
            "/v2/generate", json={"snapshot": snp, "input": "q", "max_tokens": 2}, headers=second
        )
        assert ran.status_code == 200, ran.text
        purged = await http.post("/v2/purge", json={"target": snp}, headers=second)
    assert purged.status_code == 200, purged.text
    stores = {entry["store"]: entry for entry in purged.json()["receipt"]["stores"]}
    assert "kv_disk" in stores, sorted(stores)
    assert stores["kv_disk"]["result"] == "done"
    assert list((tmp_path / "disk").rglob("*.kv")) == []


def test_tier_configs_merge_and_different_places_are_refused(tmp_path: Path) -> None:
    host = {"compat_digest": "a", "host_capacity_bytes": 1 << 20, "seal": False}
    disk = {"compat_digest": "b", "disk_root": str(tmp_path / "d"), "disk_capacity_bytes": 4096, "seal": True}
    merged = purge_tier_config([host, None, disk])
    assert merged is not None
    assert merged["host_capacity_bytes"] == 1 << 20 and merged["disk_root"] == str(tmp_path / "d")
    assert merged["seal"] is True  # sealed anywhere: the purge treats the tiers as sealed
    assert purge_tier_config([None, None]) is None
    unbounded = purge_tier_config([{"disk_root": "/x", "disk_capacity_bytes": None}, {"disk_root": "/x"}])
    assert unbounded is not None and unbounded["disk_capacity_bytes"] is None  # not a zero budget
    with pytest.raises(ValueError, match="disk KV tier in different places"):
        purge_tier_config([disk, {**disk, "disk_root": str(tmp_path / "elsewhere")}])
    with pytest.raises(ValueError, match="redis KV tier"):
        purge_tier_config([{"redis_url": "redis://a:1"}, {"redis_url": "redis://b:1"}])


def test_several_profiles_need_the_separate_placement(tmp_path: Path) -> None:
    from zumik_serve.app.application import build_serve_app
    from zumik_serve.home import ZumikHome

    colocated = load_builtin("local-cpu")  # colocated
    _, second = _profiles()
    assert colocated.gateway.placement is GatewayPlacement.COLOCATED
    with pytest.raises(ValueError, match="colocated placement"):
        build_serve_app(
            colocated, model_dir=tmp_path, redis_url="redis://127.0.0.1:1", dev_key=None,
            home=ZumikHome(tmp_path), more=[(second, tmp_path)],
        )  # fmt: skip


def test_a_profile_keeping_kv_in_redis_needs_a_kv_redis_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KV blocks never share the state Redis (it does not evict: they would grow until its memory
    limit, and every tenant's writes would fail): without a KV Redis the build is refused, naming
    the profiles and what to set; a profile whose tiers leave Redis out needs none."""
    from zumik_serve.app import application
    from zumik_serve.app.application import build_serve_app
    from zumik_serve.home import ZumikHome

    class Asked(Exception):
        """The build went past the check, to asking the state Redis."""

    def ask(url: str) -> None:
        raise Asked(url)

    monkeypatch.setattr(application, "check_access", ask)
    in_redis = load_builtin("local-cpu")
    assert in_redis.kv_tiers.enabled and in_redis.kv_tiers.redis
    with pytest.raises(
        ValueError, match=r"local-cpu keep KV blocks in Redis.*ZUMIK_KV_REDIS_URL.*kv_tiers.redis: false"
    ):
        build_serve_app(
            in_redis,
            model_dir=tmp_path,
            redis_url="redis://127.0.0.1:1",
            dev_key=None,
            home=ZumikHome(tmp_path),
        )
    tiers = in_redis.kv_tiers.model_copy(update={"redis": False})
    without = in_redis.model_copy(update={"kv_tiers": tiers})
    with pytest.raises(Asked):
        build_serve_app(
            without,
            model_dir=tmp_path,
            redis_url="redis://127.0.0.1:1",
            dev_key=None,
            home=ZumikHome(tmp_path),
        )


def test_serve_takes_several_profiles_and_names_a_bad_one(capsys: pytest.CaptureFixture[str]) -> None:
    from zumik_serve.cli import _parser, main

    args = _parser().parse_args(["serve", "--profile", "local-cpu-separate", "--profile", "local-cpu-2x"])
    assert args.profile == ["local-cpu-separate", "local-cpu-2x"]
    assert _parser().parse_args(["serve"]).profile is None  # local-cpu, as before
    assert main(["serve", "--profile", "local-cpu-separate", "--profile", "no-such-profile"]) == 2
    assert "no-such-profile" in capsys.readouterr().err
