"""Purge on the real stack (Redis, Ray Serve, vLLM on CPU with the KV connector and its tiers).

- A tenant's repeat hits its cache (positive control); after a purge of an object whose content
  reached the engine, the same prompt gets ``cached_tokens == 0`` (engine and every tier: the
  scope's salt moved on, its blocks and keys are gone), then hits again under the new scope.
- The purged handles stop resolving on both surfaces; the plaintext is in no Redis file.
- The receipt verifies offline with the key of ``GET /v2/keys`` (``zumik receipt verify``),
  and a changed copy does not; another tenant sees neither the receipt nor the target.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import RunningStack, _create_tenant

pytestmark = [pytest.mark.redis, pytest.mark.ray, pytest.mark.vllm]


@pytest.fixture(scope="module")
def tenant_http(running_stack: RunningStack):  # type: ignore[no-untyped-def]
    """A tenant of its own: a purge moves its cache scope on, which must not disturb others."""
    key = asyncio.run(_create_tenant(running_stack.redis_url, f"purger-{uuid.uuid4().hex[:8]}"))
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=running_stack.url, headers=headers, timeout=180) as client:
        yield client


def _chat(client: httpx.Client, model: str, content: str, **headers: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 1}
    return client.post("/v1/chat/completions", json=body, headers=headers)


def _cached(response: httpx.Response) -> int:
    assert response.status_code == 200, response.text
    return int(response.json()["usage"]["prompt_tokens_details"]["cached_tokens"])


def _files_containing(root: Path, needle: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_purge_closes_the_cache_scope_and_signs_a_verifiable_receipt(
    tenant_http: httpx.Client, other_http: httpx.Client, running_stack: RunningStack, tmp_path: Path
) -> None:
    model = running_stack.model
    canary = f"CANARY-{uuid.uuid4().hex} "
    artifact = tenant_http.post("/v2/artifacts", json={"role": "document", "content": canary * 40}).json()
    bundle = tenant_http.post("/v2/bundles", json={"artifacts": [artifact["id"]]}).json()
    snapshot = tenant_http.post("/v2/snapshots", json={"bundle": bundle["id"]}).json()
    prompt = f"{uuid.uuid4()} " + "A long stable prefix the agent sends on every turn. " * 15

    assert _cached(_chat(tenant_http, model, "hello", **{"x-zumik-snapshot": snapshot["id"]})) == 0
    assert _cached(_chat(tenant_http, model, "hello", **{"x-zumik-snapshot": snapshot["id"]})) > 0
    assert _cached(_chat(tenant_http, model, prompt)) == 0
    assert _cached(_chat(tenant_http, model, prompt)) > 0  # the positive control
    assert _files_containing(running_stack.home.redis_dir, canary.encode())  # it was on disk

    assert other_http.post("/v2/purge", json={"target": artifact["id"]}).status_code == 404
    response = tenant_http.post("/v2/purge", json={"target": artifact["id"]})
    assert response.status_code == 200, response.text
    receipt = response.json()["receipt"]
    assert set(receipt["purged"]) >= {artifact["id"], bundle["id"], snapshot["id"]}
    stores = {entry["store"]: entry for entry in receipt["stores"]}
    assert stores["redis_state"]["guarantee_class"] == "compacted"
    assert stores["kv_engine"]["guarantee_class"] == "unindexed"
    assert stores["kv_redis"]["guarantee_class"] == stores["kv_disk"]["guarantee_class"] == "crypto_erased"
    assert receipt["guarantee_class"] == "unindexed"  # engine memory is not zeroed: the weakest store

    # Nothing cached before the purge is reachable: not in the engine, not in any tier.
    assert _cached(_chat(tenant_http, model, prompt)) == 0
    assert _cached(_chat(tenant_http, model, prompt)) > 0  # the new scope caches again
    assert _files_containing(running_stack.home.redis_dir, canary.encode()) == []
    for kind, handle in (
        ("artifacts", artifact["id"]),
        ("bundles", bundle["id"]),
        ("snapshots", snapshot["id"]),
    ):
        assert tenant_http.get(f"/v2/{kind}/{handle}").status_code == 404
    used = _chat(tenant_http, model, "hello", **{"x-zumik-snapshot": snapshot["id"]})
    assert used.status_code == 404, used.text

    # The same request again returns the same receipt; it is readable by its tenant only.
    assert tenant_http.post("/v2/purge", json={"target": artifact["id"]}).json()["receipt"] == receipt
    assert tenant_http.get(f"/v2/receipts/{receipt['id']}").json() == receipt
    assert other_http.get(f"/v2/receipts/{receipt['id']}").status_code == 404

    keys = tenant_http.get("/v2/keys").json()["keys"]
    key = next(k for k in keys if k["key_id"] == receipt["key_id"])
    (tmp_path / "key.pem").write_text(key["public_key"])
    (tmp_path / "receipt.json").write_text(json.dumps(receipt))
    tampered = {**receipt, "guarantee_class": "crypto_erased"}
    (tmp_path / "tampered.json").write_text(json.dumps(tampered))
    verify = [sys.executable, "-m", "zumik_serve.cli", "receipt", "verify"]
    intact = subprocess.run(
        [*verify, str(tmp_path / "receipt.json"), "--public-key", str(tmp_path / "key.pem")]
    )
    changed = subprocess.run(
        [*verify, str(tmp_path / "tampered.json"), "--public-key", str(tmp_path / "key.pem")]
    )
    assert (intact.returncode, changed.returncode) == (0, 1)

    # The whole log, fetched and checked as a chain by the CLI; its head anchors the next check.
    api_key = tenant_http.headers["authorization"].removeprefix("Bearer ")
    log = [sys.executable, "-m", "zumik_serve.cli", "receipt", "log", "--url", running_stack.url,
           "--key", api_key, "--out", str(tmp_path / "log.json"), "--json"]  # fmt: skip
    fetched = subprocess.run(log, capture_output=True, text=True)
    assert fetched.returncode == 0, fetched.stdout + fetched.stderr
    result = json.loads(fetched.stdout.strip().splitlines()[-1])
    assert (result["ok"], result["receipts"], result["head"]["id"]) == (True, 1, receipt["id"])
    assert json.loads((tmp_path / "log.json").read_text()) == [receipt]
    anchored = subprocess.run([*log, "--anchor", result["head"]["hash"]], capture_output=True, text=True)
    lost = subprocess.run([*log, "--anchor", "0" * 64], capture_output=True, text=True)
    assert (anchored.returncode, lost.returncode) == (0, 1), anchored.stdout + lost.stdout
    assert "rewritten" in json.loads(lost.stdout.strip().splitlines()[-1])["reason"]


def test_purge_answers_clear_errors(tenant_http: httpx.Client) -> None:
    missing = tenant_http.post("/v2/purge", json={"target": "art_" + "a" * 26})
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    assert tenant_http.post("/v2/purge", json={}).status_code == 400
    assert tenant_http.post("/v2/purge", json={"target": "x", "extra": 1}).status_code == 400
    assert tenant_http.post("/v2/purge", content=b"{not json").status_code == 400
    assert tenant_http.get("/v2/receipts/prg_" + "b" * 26).status_code == 404
    assert httpx.post(f"{tenant_http.base_url}/v2/purge", json={"target": "x"}).status_code == 401


def test_a_purge_of_the_tenants_own_id_closes_what_its_plain_requests_cached(
    tenant_http: httpx.Client, other_http: httpx.Client, running_stack: RunningStack
) -> None:
    """Plain /v1 requests have no handle to purge: a purge of the tenant's own id closes its cache
    scope, so a prompt cached before it is a miss after it (engine and every tier), and caches
    again under the new scope; another tenant's cache is untouched."""
    model = running_stack.model
    prompt = f"{uuid.uuid4()} " + "A plain prompt of an agent, with no object behind it. " * 15
    theirs = f"{uuid.uuid4()} " + "Another tenant's own stable prefix, cached on its side. " * 15
    first = _chat(tenant_http, model, prompt)
    assert _cached(first) == 0 and _cached(_chat(tenant_http, model, prompt)) > 0  # the control
    assert _cached(_chat(other_http, model, theirs)) == 0 and _cached(_chat(other_http, model, theirs)) > 0
    decision = tenant_http.get(f"/v2/decisions/{first.headers['x-zumik-decision-id']}").json()
    tenant_id = decision["record"]["inputs"]["tenant"]

    response = tenant_http.post("/v2/purge", json={"target": tenant_id})
    assert response.status_code == 200, response.text
    receipt = response.json()["receipt"]
    assert (receipt["target"], receipt["purged"]) == (tenant_id, [tenant_id])
    stores = {entry["store"]: entry for entry in receipt["stores"]}
    assert stores["kv_engine"]["guarantee_class"] == "unindexed"
    assert stores["kv_redis"]["guarantee_class"] == stores["kv_disk"]["guarantee_class"] == "crypto_erased"

    assert _cached(_chat(tenant_http, model, prompt)) == 0
    assert _cached(_chat(tenant_http, model, prompt)) > 0  # the new scope caches again
    assert _cached(_chat(other_http, model, theirs)) > 0  # another tenant's scope stays
    assert other_http.post("/v2/purge", json={"target": tenant_id}).status_code == 404
    again = tenant_http.post("/v2/purge", json={"target": tenant_id}).json()["receipt"]
    assert again["id"] != receipt["id"] and again["seq"] == receipt["seq"] + 1  # a new purge each time
