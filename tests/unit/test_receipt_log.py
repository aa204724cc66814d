"""A tenant's receipt log: ``GET /v2/receipts`` and ``zumik receipt verify`` over it. The
production app over real Redis.

Invariants:
- the log lists the tenant's own receipts only, newest first, a page at a time (``limit``,
  ``after`` the ``last_id`` of the page before, ``has_more``), each as issued;
- a bad ``limit`` or ``after`` is a 400 naming it; another tenant's receipt as ``after`` is a 404;
- the pages put together verify as a chain; a receipt left out of the middle, or one whose
  ``prev_receipt_hash`` was rewritten and signed again with the real key, fails, naming the seq.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.support.inprocess import make_gateway, purge_new_artifact
from zumik_serve.cli import main
from zumik_serve.purge.classes import GuaranteeClass
from zumik_serve.purge.log_cli import check_anchor
from zumik_serve.purge.receipt import (
    ReceiptSigner,
    StoreEntry,
    StoreResult,
    build_receipt,
    receipt_hash,
    verify_chain,
)


async def test_the_log_pages_newest_first_and_verifies_as_a_chain(
    module_redis_url: str, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway = make_gateway(module_redis_url, tiny_model_dir)
    mine, theirs = await gateway.create_tenant("log-mine"), await gateway.create_tenant("log-theirs")
    async with gateway.client(mine) as http:
        issued = [await purge_new_artifact(http, f"document {n}") for n in range(3)]
        first = (await http.get("/v2/receipts", params={"limit": "2"})).json()
        second = (await http.get("/v2/receipts", params={"limit": "2", "after": first["last_id"]})).json()
        keys = (await http.get("/v2/keys")).json()
        bad_limit = await http.get("/v2/receipts", params={"limit": "0"})
        bad_after = await http.get("/v2/receipts", params={"after": "dec_x"})
    async with gateway.client(theirs) as http:
        own = (await http.get("/v2/receipts")).json()
        foreign = await http.get("/v2/receipts", params={"after": issued[0]["id"]})

    assert [r["id"] for r in first["data"]] == [issued[2]["id"], issued[1]["id"]] and first["has_more"]
    assert (first["first_id"], first["last_id"]) == (issued[2]["id"], issued[1]["id"])
    assert second["data"] == [issued[0]] and not second["has_more"]
    assert own == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}
    assert (bad_limit.status_code, bad_limit.json()["error"]["param"]) == (400, "limit")
    assert (bad_after.status_code, bad_after.json()["error"]["param"]) == (400, "after")
    assert (foreign.status_code, foreign.json()["error"]["code"]) == (404, "receipt_not_found")

    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps(keys))
    log = tmp_path / "log.json"
    log.write_text(json.dumps(first))  # one page, as the API sends it: the newest two
    capsys.readouterr()
    assert main(["receipt", "verify", str(log), "--public-key", str(keys_file)]) == 0
    assert "seq 2..3 (earlier ones not given)" in capsys.readouterr().out
    log.write_text(json.dumps(first["data"] + second["data"]))  # the pages put together: the whole log
    assert main(["receipt", "verify", str(log), "--public-key", str(keys_file), "--json"]) == 0
    assert "3 receipts" in json.loads(capsys.readouterr().out)["reason"]

    log.write_text(json.dumps([issued[0], issued[2]]))  # the middle one left out
    assert main(["receipt", "verify", str(log), "--public-key", str(keys_file)]) == 1
    assert "seq 2 is missing" in capsys.readouterr().out


def _signed(signer: ReceiptSigner, seq: int, prev: dict[str, Any] | None, **changes: str) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "receipt_id": f"prg_{seq}", "tenant": "ten_x", "target": f"art_{seq}", "issued_at": 1,
        "profile": "p", "profile_ceiling": GuaranteeClass.COMPACTED,
        "stores": [StoreEntry("redis_state", "unlink", StoreResult.DONE, GuaranteeClass.DELETED, "x")],
        "seq": seq, "prev_receipt_hash": None if prev is None else receipt_hash(prev),
    }  # fmt: skip
    fields.update(changes)
    return signer.sign(build_receipt(**fields, purged=[fields["target"]]))


def test_a_receipt_rewritten_and_signed_again_breaks_the_chain() -> None:
    """Whoever holds the signing key can sign a new version of a receipt, but not without
    changing its hash, which the next receipt names: the log shows the rewrite."""
    signer = ReceiptSigner.generate()
    keys = {signer.key_id: signer.public_pem()}
    one = _signed(signer, 1, None)
    two = _signed(signer, 2, one)
    whole = verify_chain([two, one], keys)
    assert whole.ok and "2 receipts of tenant ten_x, seq 1..2 (from the first)" in whole.reason, whole.reason
    rewritten = _signed(signer, 1, None, target="art_other")
    broken = verify_chain([rewritten, two], keys)
    assert not broken.ok and "seq 2 does not follow seq 1" in broken.reason, broken.reason
    assert "two receipts have seq 1" in verify_chain([one, rewritten], keys).reason
    other = _signed(signer, 2, one, tenant="ten_y")
    assert "2 tenants" in verify_chain([one, other], keys).reason
    assert "none of the keys given" in verify_chain([one], {}).reason
    opens_late = _signed(signer, 1, two)  # seq 1 naming a previous receipt
    assert "opens the chain" in verify_chain([opens_late], keys).reason
    tampered = {**two, "target": "art_9"}
    assert "receipt 0" in verify_chain([tampered, one], keys).reason
    unlinked = _signed(signer, 2, None)  # a later receipt that names no previous one
    assert "names no previous receipt" in verify_chain([unlinked], keys).reason
    below = _signed(signer, 0, None)
    assert "below 1" in verify_chain([below], keys).reason


def test_a_file_nested_too_deep_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    signer = ReceiptSigner.generate()
    key = tmp_path / "key.pem"
    key.write_bytes(signer.public_pem())
    nested = tmp_path / "nested.json"
    nested.write_text("[" * 100_000 + "]" * 100_000)
    assert main(["receipt", "verify", str(nested), "--public-key", str(key)]) == 1
    assert "nested too deep" in capsys.readouterr().out


def test_the_anchor_kept_from_an_earlier_check_must_still_be_in_the_log() -> None:
    signer = ReceiptSigner.generate()
    one = _signed(signer, 1, None)
    two = _signed(signer, 2, one)
    kept = receipt_hash(one)
    assert check_anchor([one, two], kept).ok
    rewritten = _signed(signer, 1, None, target="art_other")  # the log rebuilt, every receipt signed again
    again = _signed(signer, 2, rewritten)
    keys = {signer.key_id: signer.public_pem()}
    assert verify_chain([rewritten, again], keys).ok  # a chain on its own...
    lost = check_anchor([rewritten, again], kept)  # ...that no longer leads to what was kept
    assert not lost.ok and "rewritten" in lost.reason
