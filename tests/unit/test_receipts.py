"""Signed purge receipts (API.md Receipts, DESIGN.md section 7).

Invariants held here:

- Guarantee classes rank revoked = provider_expiry < unindexed < deleted < compacted < crypto_erased,
  with stable string values; ``weakest`` is the minimum (provider_expiry wins the rank-0 tie) and
  ``capped`` never returns a class above its ceiling, for every pair.
- A receipt's class is never above the profile ceiling, and never above any store that held the
  data, for every mix of store classes and results (done / failed / not_held) and every ceiling.
- Canonical bytes are exactly ``json.dumps(sort_keys, compact separators, ensure_ascii=False)``;
  floats are refused anywhere, nested too; non-ASCII text is written unescaped.
- Sign then verify is ok; every single-field change or deletion, top-level or inside a store
  entry, fails verification; so does a signed receipt whose class its stores do not support,
  and a check with another key.
- An independent verifier (plain json + cryptography, no zumik code) agrees with ``verify_receipt``.
- ``run_verify`` exits 0 for an intact file, 1 for a tampered one, 2 for a file it cannot read.
- A receipt built and signed now has the exact canonical bytes (and signature) the first version
  produced for the same inputs, and that version's receipts still verify; store entries go to and
  from their JSON through one schema, which refuses a missing, extra or mistyped field by name.
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from zumik_serve.purge.classes import GuaranteeClass, capped, weakest
from zumik_serve.purge.receipt import (
    RECEIPT_FIELDS,
    ReceiptSigner,
    StoreEntry,
    StoreResult,
    build_receipt,
    canonical_bytes,
    parse_store_entries,
    public_key_record,
    receipt_class,
    receipt_hash,
    store_entries_json,
    verify_receipt,
)
from zumik_serve.purge.verify_cli import run_verify, verify_file

G = GuaranteeClass
NON_PROVIDER = [G.REVOKED, G.UNINDEXED, G.DELETED, G.COMPACTED, G.CRYPTO_ERASED]
RESULTS = ["done", "failed", "not_held"]
PREV_HASH = "ab" * 32


@pytest.fixture(scope="module")
def signer() -> ReceiptSigner:
    return ReceiptSigner.generate()


def make_stores() -> list[StoreEntry]:
    return [
        StoreEntry("redis_state", "unlink+aof_rewrite", "done", G.COMPACTED),
        StoreEntry("kv_engine", "salt_epoch_rotated", "done", G.UNINDEXED, detail="epoch 4"),
        StoreEntry("kv_disk", "key_destroyed+unlink", "done", G.CRYPTO_ERASED),
        StoreEntry("kv_redis", "unlink", "not_held", G.DELETED),
        StoreEntry("provider:acme", "delete_file", "done", G.PROVIDER_EXPIRY, expires_at=1_700_003_600),
    ]


def make_unsigned(
    *,
    stores: list[StoreEntry] | None = None,
    ceiling: GuaranteeClass = G.CRYPTO_ERASED,
    tenant: str = "acme",
    target: str = "art_0123456789abcdefghijklmnop",
    prev_receipt_hash: str | None = None,
    seq: int = 0,
) -> dict[str, Any]:
    return build_receipt(
        receipt_id="prg_aaaaaaaaaaaaaaaaaaaaaaaaaa",
        tenant=tenant,
        target=target,
        issued_at=1_700_000_000,
        profile="dedicated",
        profile_ceiling=ceiling,
        stores=make_stores() if stores is None else stores,
        purged=[target, "snp_bbbbbbbbbbbbbbbbbbbbbbbbbb"],
        seq=seq,
        prev_receipt_hash=prev_receipt_hash,
    )


def make_receipt(signer: ReceiptSigner, **kwargs: Any) -> dict[str, Any]:
    return signer.sign(make_unsigned(**kwargs))


def independent_verify(receipt: dict[str, Any], public_pem: bytes) -> bool:
    """Signature check with plain json and cryptography only: what an auditor would write."""
    key = serialization.load_pem_public_key(public_pem)
    assert isinstance(key, Ed25519PublicKey)
    try:
        body = {name: value for name, value in receipt.items() if name != "signature"}
        payload = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        key.verify(base64.b64decode(receipt["signature"], validate=True), payload)
    except (InvalidSignature, KeyError, ValueError, binascii.Error, TypeError):
        return False
    return True


# -- classes -----------------------------------------------------------------------------------


def test_guarantee_class_values_and_order_are_stable() -> None:
    assert [(cls.value, cls.rank) for cls in G] == [
        ("revoked", 0),
        ("unindexed", 1),
        ("deleted", 2),
        ("compacted", 3),
        ("crypto_erased", 4),
        ("provider_expiry", 0),
    ]
    assert sorted(NON_PROVIDER, key=lambda cls: cls.rank) == NON_PROVIDER
    assert G.PROVIDER_EXPIRY.rank == G.REVOKED.rank


@pytest.mark.parametrize(("a", "b"), list(itertools.product(G, G)))
def test_weakest_and_capped_for_every_pair(a: GuaranteeClass, b: GuaranteeClass) -> None:
    low = weakest([a, b])
    assert low.rank == min(a.rank, b.rank)
    assert low in (a, b)
    if {a, b} == {G.REVOKED, G.PROVIDER_EXPIRY}:
        assert low is G.PROVIDER_EXPIRY
    assert weakest([a, b]) is weakest([b, a])

    result = capped(a, b)
    assert result.rank <= b.rank
    assert result is (a if a.rank <= b.rank else b)


def test_weakest_of_nothing_raises() -> None:
    with pytest.raises(ValueError):
        weakest([])


# -- the class a receipt states ------------------------------------------------------------------


def _contribution(cls: GuaranteeClass, result: str) -> GuaranteeClass | None:
    return {"done": cls, "failed": G.REVOKED, "not_held": None}[result]


@pytest.mark.parametrize("ceiling", NON_PROVIDER)
def test_receipt_class_never_above_ceiling_or_any_holding_store(ceiling: GuaranteeClass) -> None:
    outcomes = list(itertools.product(G, RESULTS))
    for n in (0, 1, 2, 3):
        for combo in itertools.product(outcomes, repeat=n):
            stores = [StoreEntry(f"s{i}", "act", result, cls) for i, (cls, result) in enumerate(combo)]
            stated = G(make_unsigned(stores=stores, ceiling=ceiling)["guarantee_class"])
            assert stated.rank <= ceiling.rank, (combo, ceiling)
            held = [c for c in (_contribution(cls, result) for cls, result in combo) if c is not None]
            for contributed in held:
                assert stated.rank <= contributed.rank, (combo, ceiling)
            expected = capped(weakest(held), ceiling) if held else G.REVOKED
            assert stated is expected, (combo, ceiling)


def test_failed_store_pulls_the_class_down_to_revoked() -> None:
    stores = [
        StoreEntry("kv_disk", "key_destroyed+unlink", "done", G.CRYPTO_ERASED),
        StoreEntry("kv_redis", "unlink", "failed", G.DELETED, detail="timeout"),
    ]
    assert receipt_class(stores, G.CRYPTO_ERASED) is G.REVOKED


def test_not_held_store_neither_weakens_nor_strengthens() -> None:
    done = StoreEntry("kv_disk", "key_destroyed+unlink", "done", G.CRYPTO_ERASED)
    not_held = StoreEntry("kv_redis", "unlink", "not_held", G.REVOKED)
    assert receipt_class([done, not_held], G.CRYPTO_ERASED) is G.CRYPTO_ERASED
    assert receipt_class([not_held], G.CRYPTO_ERASED) is G.REVOKED
    assert receipt_class([], G.CRYPTO_ERASED) is G.REVOKED


def test_build_receipt_refuses_a_purged_list_without_the_target() -> None:
    with pytest.raises(ValueError, match="target"):
        build_receipt(
            receipt_id="prg_x",
            tenant="acme",
            target="art_x",
            issued_at=1,
            profile="p",
            profile_ceiling=G.DELETED,
            stores=[],
            purged=["snp_y"],
            seq=0,
            prev_receipt_hash=None,
        )


def test_store_entry_refuses_an_unknown_result() -> None:
    with pytest.raises(ValueError, match="result"):
        StoreEntry("kv_disk", "unlink", "maybe", G.DELETED)


# -- canonical bytes ---------------------------------------------------------------------------


def test_canonical_bytes_equal_the_json_dumps_form() -> None:
    obj = {"b": [1, {"z": None, "a": True}], "a": "x", "ü": "ß"}
    expected = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert canonical_bytes(obj) == expected
    assert canonical_bytes(obj) == '{"a":"x","b":[1,{"a":true,"z":null}],"ü":"ß"}'.encode()


@pytest.mark.parametrize(
    "obj",
    [1.0, {"a": 0.5}, [1, 2.0], {"a": {"b": [{"c": float("nan")}]}}, {"stores": [{"expires_at": 1e9}]}],
)
def test_canonical_bytes_reject_floats_anywhere(obj: Any) -> None:
    with pytest.raises(TypeError, match="float"):
        canonical_bytes(obj)


def test_canonical_bytes_keep_non_ascii_unescaped(signer: ReceiptSigner) -> None:
    receipt = make_receipt(signer, tenant="zürich-測試", target="art_ünïcode")
    data = canonical_bytes(receipt)
    assert "zürich-測試".encode() in data
    assert "art_ünïcode".encode() in data
    assert b"\\u" not in data
    assert verify_receipt(receipt, signer.public_pem()).ok
    assert independent_verify(receipt, signer.public_pem())
    # An escaped (ASCII) file parses to the same values, so it verifies too.
    assert verify_receipt(json.loads(json.dumps(receipt)), signer.public_pem()).ok


# -- signing and verification ------------------------------------------------------------------


def test_sign_then_verify_is_ok(signer: ReceiptSigner) -> None:
    receipt = make_receipt(signer)
    assert set(receipt) == RECEIPT_FIELDS
    assert receipt["key_id"] == signer.key_id
    assert receipt["guarantee_class"] == "provider_expiry"
    result = verify_receipt(receipt, signer.public_pem())
    assert result.ok, result.reason
    assert independent_verify(receipt, signer.public_pem())


def test_key_id_is_sha256_prefix_of_raw_public_key(signer: ReceiptSigner) -> None:
    key = serialization.load_pem_public_key(signer.public_pem())
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert signer.key_id == "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]
    assert public_key_record(signer) == {
        "key_id": signer.key_id,
        "algorithm": "ed25519",
        "public_key": signer.public_pem().decode(),
        "status": "current",
    }


def test_signer_round_trips_through_pem(signer: ReceiptSigner) -> None:
    again = ReceiptSigner.from_pem(signer.private_pem())
    assert again.key_id == signer.key_id
    assert verify_receipt(again.sign(make_unsigned()), signer.public_pem()).ok


def test_signing_twice_is_refused(signer: ReceiptSigner) -> None:
    with pytest.raises(ValueError, match="already signed"):
        signer.sign(make_receipt(signer))


def _changed(value: Any) -> list[Any]:
    """Every single-value change the tamper test applies."""
    if value is None:
        return [PREV_HASH, "x", 0]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value - 1, str(value)]
    if isinstance(value, str):
        others = [cls.value for cls in G if cls.value != value] if value in set(G) else []
        return [value + "x", value[:-1], "", *others]
    if isinstance(value, list):
        return [[*value, copy.deepcopy(value[-1])], value[:-1], list(reversed(value))]
    raise AssertionError(f"no change defined for {value!r}")


def _tampered_copies(receipt: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    copies: list[tuple[str, dict[str, Any]]] = []
    for name in receipt:
        for new in _changed(receipt[name]):
            if new == receipt[name]:
                continue
            changed = copy.deepcopy(receipt)
            changed[name] = new
            copies.append((f"{name}={new!r}", changed))
        deleted = copy.deepcopy(receipt)
        del deleted[name]
        copies.append((f"del {name}", deleted))
    # A valid-base64 signature with one bit flipped.
    raw = bytearray(base64.b64decode(receipt["signature"]))
    raw[0] ^= 1
    flipped = copy.deepcopy(receipt)
    flipped["signature"] = base64.b64encode(bytes(raw)).decode()
    copies.append(("signature bit flipped", flipped))
    for index, entry in enumerate(receipt["stores"]):
        for name in [*entry, *(["expires_at"] if "expires_at" not in entry else [])]:
            for new in _changed(entry.get(name)):
                if new == entry.get(name):
                    continue
                changed = copy.deepcopy(receipt)
                changed["stores"][index][name] = new
                copies.append((f"stores[{index}].{name}={new!r}", changed))
            if name in entry:
                deleted = copy.deepcopy(receipt)
                del deleted["stores"][index][name]
                copies.append((f"del stores[{index}].{name}", deleted))
    return copies


@pytest.mark.parametrize("prev_receipt_hash", [None, PREV_HASH])
def test_every_single_field_change_fails_verification(
    signer: ReceiptSigner, prev_receipt_hash: str | None
) -> None:
    receipt = make_receipt(
        signer, prev_receipt_hash=prev_receipt_hash, seq=0 if prev_receipt_hash is None else 3
    )
    public_pem = signer.public_pem()
    assert verify_receipt(receipt, public_pem).ok
    copies = _tampered_copies(receipt)
    assert len(copies) > 100
    for label, tampered in copies:
        result = verify_receipt(tampered, public_pem)
        assert not result.ok, label
        assert result.reason, label
        assert not independent_verify(tampered, public_pem), label
    assert verify_receipt(receipt, public_pem).ok  # the original was not touched


def test_independent_verifier_agrees_on_a_json_file_round_trip(signer: ReceiptSigner, tmp_path: Path) -> None:
    path = tmp_path / "receipt.json"
    path.write_text(json.dumps(make_receipt(signer, tenant="Ærø"), ensure_ascii=False), encoding="utf-8")
    loaded = json.loads(path.read_text(encoding="utf-8"))
    assert verify_receipt(loaded, signer.public_pem()).ok
    assert independent_verify(loaded, signer.public_pem())


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("guarantee_class", "crypto_erased", "above the profile ceiling"),
        ("guarantee_class", "deleted", "not what its stores show"),
        ("guarantee_class", "revoked", "not what its stores show"),
        ("guarantee_class", "forgotten", "not a known guarantee class"),
        ("profile_ceiling", "obliterated", "not a known guarantee class"),
        ("issued_at", 1.5, "float"),
        ("purged", [], "target"),
    ],
)
def test_a_validly_signed_but_false_claim_fails(
    signer: ReceiptSigner, field: str, value: Any, reason: str
) -> None:
    stores = [StoreEntry("kv_disk", "unlink", "done", G.COMPACTED)]
    unsigned = make_unsigned(stores=stores, ceiling=G.COMPACTED)
    assert unsigned["guarantee_class"] == "compacted"
    unsigned[field] = value
    body = {**unsigned, "key_id": signer.key_id}
    private = serialization.load_pem_private_key(signer.private_pem(), password=None)
    assert isinstance(private, Ed25519PrivateKey)
    signature = private.sign(
        json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    )
    receipt = {**body, "signature": base64.b64encode(signature).decode()}
    result = verify_receipt(receipt, signer.public_pem())
    assert not result.ok
    assert reason in result.reason


def test_verification_with_another_key_fails(signer: ReceiptSigner) -> None:
    other = ReceiptSigner.generate()
    receipt = make_receipt(signer)
    result = verify_receipt(receipt, other.public_pem())
    assert not result.ok
    assert "key_id" in result.reason
    assert not independent_verify(receipt, other.public_pem())
    # Claiming the other key's id does not help: the signature is still this key's.
    forged = {**receipt, "key_id": other.key_id}
    assert not verify_receipt(forged, other.public_pem()).ok


@pytest.mark.parametrize("bad", [None, [], "receipt", 3, {"id": "prg_x"}])
def test_verify_never_raises_on_garbage(signer: ReceiptSigner, bad: Any) -> None:
    assert not verify_receipt(bad, signer.public_pem()).ok


def test_verify_with_a_bad_public_key_fails(signer: ReceiptSigner) -> None:
    result = verify_receipt(make_receipt(signer), b"not a pem")
    assert not result.ok


def test_receipts_chain_by_hash(signer: ReceiptSigner) -> None:
    first = make_receipt(signer)
    second = make_receipt(signer, prev_receipt_hash=receipt_hash(first), seq=1)
    assert second["prev_receipt_hash"] == receipt_hash(first)
    assert len(receipt_hash(first)) == 64
    assert receipt_hash(first) != receipt_hash(second)
    assert receipt_hash(first) == receipt_hash(copy.deepcopy(first))
    assert receipt_hash({**first, "seq": 1}) != receipt_hash(first)


# -- the CLI entry -----------------------------------------------------------------------------


def _files(signer: ReceiptSigner, tmp_path: Path, receipt: dict[str, Any]) -> tuple[Path, Path]:
    receipt_path = tmp_path / "receipt.json"
    receipt_path.write_text(json.dumps(receipt, ensure_ascii=False), encoding="utf-8")
    key_path = tmp_path / "key.pem"
    key_path.write_bytes(signer.public_pem())
    return receipt_path, key_path


def test_run_verify_exits_0_for_an_intact_receipt(
    signer: ReceiptSigner, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    receipt_path, key_path = _files(signer, tmp_path, make_receipt(signer))
    assert verify_file(receipt_path, key_path).ok
    assert run_verify(receipt_path, key_path, as_json=False) == 0
    assert capsys.readouterr().out.startswith("OK ")
    assert run_verify(receipt_path, key_path, as_json=True) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


def test_run_verify_exits_1_for_a_tampered_receipt(
    signer: ReceiptSigner, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    receipt = make_receipt(signer)
    receipt["tenant"] = "mallory"
    receipt_path, key_path = _files(signer, tmp_path, receipt)
    assert run_verify(receipt_path, key_path, as_json=False) == 1
    assert capsys.readouterr().out.startswith("FAILED ")
    assert run_verify(receipt_path, key_path, as_json=True) == 1
    assert json.loads(capsys.readouterr().out)["ok"] is False


def test_run_verify_exits_1_for_bytes_that_are_not_a_receipt(signer: ReceiptSigner, tmp_path: Path) -> None:
    receipt_path, key_path = _files(signer, tmp_path, make_receipt(signer))
    text = receipt_path.read_text(encoding="utf-8")
    receipt_path.write_text(text[:-5], encoding="utf-8")
    assert run_verify(receipt_path, key_path, as_json=False) == 1
    # A repeated key is refused rather than resolved last-wins.
    receipt_path.write_text(text[:-1] + ', "tenant": "acme"}', encoding="utf-8")
    assert run_verify(receipt_path, key_path, as_json=False) == 1


def test_run_verify_exits_2_when_a_file_cannot_be_read(
    signer: ReceiptSigner, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    receipt_path, key_path = _files(signer, tmp_path, make_receipt(signer))
    assert run_verify(tmp_path / "missing.json", key_path, as_json=False) == 2
    assert "check the path" in capsys.readouterr().err
    assert run_verify(receipt_path, tmp_path / "missing.pem", as_json=True) == 2
    assert "error" in json.loads(capsys.readouterr().out)
    key_path.write_bytes(b"not a key")
    assert run_verify(receipt_path, key_path, as_json=False) == 2
    assert "GET /v2/keys" in capsys.readouterr().err


# -- bytes signed by the first version -----------------------------------------------------------
# A receipt as the first version (hand-written StoreEntry.to_json) built and signed it, with the
# key below: what is signed, stored and verified must stay these exact bytes.

FIRST_VERSION_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
FIRST_VERSION_CANONICAL = (
    '{"guarantee_class":"provider_expiry","id":"prg_aaaaaaaaaaaaaaaaaaaaaaaaaa","issued_at":1'
    '700000000,"key_id":"ed25519:56475aa75463474c","object":"receipt","prev_receipt_hash":"ab'
    'ababababababababababababababababababababababababababababababab","profile":"dedicated","p'
    'rofile_ceiling":"crypto_erased","purged":["art_0123456789abcdefghijklmnop","snp_bbbbbbbb'
    'bbbbbbbbbbbbbbbbbb"],"seq":7,"signature":"KKtMdj3JQFF45i6uV9eAJu3+kAGef7i5jHhMb5HczL1eg2'
    'Mxa7jieMJJOyKTRJYWwPhpwxk7ssgOJqhgYYG6Dg==","stores":[{"action":"unlink+aof_rewrite","de'
    'tail":"12 keys removed; AOF rewritten","guarantee_class":"compacted","result":"done","st'
    'ore":"redis_state"},{"action":"salt_epoch_rotated","detail":"epoch 4","guarantee_class":'
    '"unindexed","result":"done","store":"kv_engine"},{"action":"key_destroyed+unlink","detai'
    'l":"","guarantee_class":"crypto_erased","result":"failed","store":"kv_disk"},{"action":"'
    'unlink","detail":"","guarantee_class":"deleted","result":"not_held","store":"kv_redis"},'
    '{"action":"delete_file","detail":"","expires_at":1700003600,"guarantee_class":"provider_'
    'expiry","result":"done","store":"provider:acme"}],"target":"art_0123456789abcdefghijklmn'
    'op","tenant":"zürich-測試"}'
).encode()


def first_version_stores() -> list[StoreEntry]:
    return [
        StoreEntry(
            "redis_state", "unlink+aof_rewrite", "done", G.COMPACTED, detail="12 keys removed; AOF rewritten"
        ),
        StoreEntry("kv_engine", "salt_epoch_rotated", "done", G.UNINDEXED, detail="epoch 4"),
        StoreEntry("kv_disk", "key_destroyed+unlink", "failed", G.CRYPTO_ERASED),
        StoreEntry("kv_redis", "unlink", "not_held", G.DELETED),
        StoreEntry("provider:acme", "delete_file", "done", G.PROVIDER_EXPIRY, expires_at=1_700_003_600),
    ]


def test_receipt_signs_the_bytes_the_first_version_signed() -> None:
    target = "art_0123456789abcdefghijklmnop"
    unsigned = build_receipt(
        receipt_id="prg_aaaaaaaaaaaaaaaaaaaaaaaaaa", tenant="zürich-測試", target=target,
        issued_at=1_700_000_000, profile="dedicated", profile_ceiling=G.CRYPTO_ERASED,
        stores=first_version_stores(), purged=[target, "snp_bbbbbbbbbbbbbbbbbbbbbbbbbb"],
        seq=7, prev_receipt_hash=PREV_HASH,
    )  # fmt: skip
    receipt = ReceiptSigner(FIRST_VERSION_KEY).sign(unsigned)
    assert canonical_bytes(receipt) == FIRST_VERSION_CANONICAL
    assert receipt == json.loads(FIRST_VERSION_CANONICAL)
    assert receipt_hash(receipt) == "75ede14c389546b653ebbb36efc98458910b06151c57d2f4fa4737740e01f38b"
    # The signed store lines, key order included (the order a client sees in the JSON body).
    assert [list(entry) for entry in receipt["stores"]] == [
        ["store", "action", "result", "guarantee_class", "detail"]
    ] * 4 + [["store", "action", "result", "guarantee_class", "detail", "expires_at"]]


def test_receipt_of_the_first_version_verifies(tmp_path: Path) -> None:
    receipt = json.loads(FIRST_VERSION_CANONICAL)
    signer = ReceiptSigner(FIRST_VERSION_KEY)
    assert verify_receipt(receipt, signer.public_pem()).ok
    assert independent_verify(receipt, signer.public_pem())
    assert parse_store_entries(receipt["stores"]) == first_version_stores()
    receipt_path, key_path = _files(signer, tmp_path, receipt)
    assert run_verify(receipt_path, key_path, as_json=False) == 0


def test_store_entries_round_trip_through_their_json() -> None:
    stores = first_version_stores()
    assert parse_store_entries(store_entries_json(stores)) == stores
    assert all(isinstance(entry.result, StoreResult) for entry in stores)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda entry: entry.pop("detail"), "stores[0] lacks ['detail']"),
        (lambda entry: entry.update(expires_at=None), "stores[0].expires_at is not an integer"),
        (lambda entry: entry.update(expires_at=True), "stores[0].expires_at"),
        (lambda entry: entry.update(note="x"), "stores[0].note"),
        (lambda entry: entry.update(store=7), "stores[0].store"),
        (lambda entry: entry.update(result="maybe"), "stores[0].result"),
        (lambda entry: entry.update(guarantee_class="forgotten"), "stores[0].guarantee_class"),
    ],
)
def test_a_store_entry_that_is_not_one_is_refused_by_name(change: Any, reason: str) -> None:
    data = store_entries_json(first_version_stores()[:1])
    change(data[0])
    with pytest.raises(ValueError) as caught:
        parse_store_entries(data)
    assert reason in str(caught.value)
