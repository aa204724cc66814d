"""Signed purge receipts: canonical JSON, Ed25519, and a class that never claims more than was done.

A receipt (API.md, Receipts) is a JSON object with exactly these fields::

    id, object="receipt", tenant, target, purged, issued_at, profile, profile_ceiling,
    guarantee_class, stores, seq, prev_receipt_hash, key_id, signature

``signature`` is base64 (standard alphabet) of Ed25519 over ``canonical_bytes`` of every other
field, ``key_id`` included. ``prev_receipt_hash`` is ``receipt_hash`` of the tenant's previous
receipt (None for its first), so a tenant's receipts form a chain. Receipts hold no floats.
A node-tier store (``kv_host``, ``kv_disk``) may list its ``nodes`` (``NodeEntry``): then its
class is the weakest of theirs, and the verifier checks that too; receipts signed before nodes
were listed have none, and verify as they did.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NewType, TypedDict

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import ConfigDict, StrictInt, StrictStr, TypeAdapter, ValidationError

from zumik_serve.purge.classes import GuaranteeClass, capped, weakest

ReceiptHash = NewType("ReceiptHash", str)
KeyId = NewType("KeyId", str)

RECEIPT_OBJECT = "receipt"
ALGORITHM = "ed25519"
RECEIPT_FIELDS = frozenset(
    {
        "id",
        "object",
        "tenant",
        "target",
        "purged",
        "issued_at",
        "profile",
        "profile_ceiling",
        "guarantee_class",
        "stores",
        "seq",
        "prev_receipt_hash",
        "key_id",
        "signature",
    }
)
_STORE_FIELDS = ("store", "action", "result", "guarantee_class", "detail")  # expires_at: optional
_HASH_RE = re.compile(r"[0-9a-f]{64}")
_SIGNATURE_BYTES = 64


def canonical_bytes(obj: Any) -> bytes:
    """The canonical form: ``json.dumps(obj, sort_keys=True, separators=(",", ":"),
    ensure_ascii=False)`` encoded as UTF-8 (RFC 8785 for these value types).

    Raises TypeError for a float anywhere (their text form is not canonical across languages)
    and for a non-string object key (json.dumps would turn it into a string silently)."""
    _reject_non_canonical(obj, "$")
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _reject_non_canonical(obj: Any, path: str) -> None:
    if isinstance(obj, float):
        raise TypeError(f"float at {path}: receipts hold no floating-point values")
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, str):
                raise TypeError(f"non-string key {key!r} at {path}")
            _reject_non_canonical(value, f"{path}.{key}")
    elif isinstance(obj, list | tuple):
        for index, value in enumerate(obj):
            _reject_non_canonical(value, f"{path}[{index}]")


class StoreResult(StrEnum):
    """What happened at one store: ``done`` (the action completed), ``failed`` (it did not; the
    data may remain there), ``not_held`` (the store held nothing for the target)."""

    DONE = "done"
    FAILED = "failed"
    NOT_HELD = "not_held"


_CLASS_NAMES = frozenset(cls.value for cls in GuaranteeClass)


@dataclass(frozen=True)
class NodeEntry:
    """One node's line under a node-tier store (``kv_host``, ``kv_disk``): the purge swept that
    tier on each node of the cluster that may hold blocks.

    ``result``: ``done`` when the last sweep reached the node and its re-check found no block of
    the scope left; ``failed`` when not (the node was down or unreachable, the sweep failed or
    timed out there, blocks remained), and ``detail`` says why. ``guarantee_class`` is what holds
    on that node: the store's class when done; when failed, what holds without the sweep
    (``unindexed``: the blocks are unreachable under the rotated salt, or ``crypto_erased`` for
    blocks sealed under a destroyed, compacted key). ``removed_blocks``: removed there by the
    purge; ``remaining_blocks``: what the last re-check found, None (absent from the JSON) when
    the last sweep did not reach the node.
    """

    __pydantic_config__ = ConfigDict(extra="forbid")

    node_id: StrictStr
    hostname: StrictStr
    result: StoreResult
    guarantee_class: GuaranteeClass
    removed_blocks: StrictInt
    detail: StrictStr
    remaining_blocks: StrictInt | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.result, StoreResult):
            object.__setattr__(self, "result", StoreResult(self.result))
        if self.result is StoreResult.NOT_HELD:
            raise ValueError(f"node entry {self.node_id}: result is done or failed, not not_held")
        if not isinstance(self.guarantee_class, GuaranteeClass):
            raise ValueError(f"node entry {self.node_id}: guarantee_class must be a GuaranteeClass")


@dataclass(frozen=True)
class StoreEntry:
    """One store's line in a receipt.

    ``store`` names it (``redis_state``, ``kv_engine``, ``kv_host``, ``kv_redis``, ``kv_disk``,
    ``provider:<name>``); ``action`` says what was done (``unlink+aof_rewrite``,
    ``salt_epoch_rotated``, ``key_destroyed+unlink``); ``result`` is a ``StoreResult`` (its value
    is accepted too); ``guarantee_class`` is what the action achieves when done; ``expires_at``
    (unix seconds) is when a provider's retention ends, None when not applicable (then absent
    from the JSON). ``nodes``: for a node-tier store, each node's line (``NodeEntry``), the store's
    class being the weakest of theirs; None (absent from the JSON) for every other store and in
    receipts signed before nodes were listed. Its JSON form, the one signed, is ``STORE_ENTRIES``'s.
    """

    __pydantic_config__ = ConfigDict(extra="forbid")

    store: StrictStr
    action: StrictStr
    result: StoreResult
    guarantee_class: GuaranteeClass
    detail: StrictStr = ""
    expires_at: StrictInt | None = None
    nodes: tuple[NodeEntry, ...] | None = None

    def __post_init__(self) -> None:
        if not self.store:
            raise ValueError("store entry: store name is empty")
        if not isinstance(self.result, StoreResult):
            try:  # frozen: setting the enum for the value given is the only change ever made
                object.__setattr__(self, "result", StoreResult(self.result))
            except ValueError:
                raise ValueError(
                    f"store entry {self.store}: result {self.result!r} is not one of done/failed/not_held"
                ) from None
        if not isinstance(self.guarantee_class, GuaranteeClass):
            raise ValueError(f"store entry {self.store}: guarantee_class must be a GuaranteeClass")
        if self.expires_at is not None and (
            isinstance(self.expires_at, bool) or not isinstance(self.expires_at, int)
        ):
            raise ValueError(f"store entry {self.store}: expires_at must be int unix seconds or None")


# The schema of a receipt's ``stores``: ``store_entries_json`` writes it (``expires_at`` left out
# when None, as the first version wrote it), ``parse_store_entries`` reads it.
STORE_ENTRIES: TypeAdapter[list[StoreEntry]] = TypeAdapter(list[StoreEntry])


def store_entries_json(stores: Sequence[StoreEntry]) -> list[dict[str, Any]]:
    """``stores`` as a receipt holds them (the values that are signed)."""
    return STORE_ENTRIES.dump_python(list(stores), mode="json", exclude_none=True)


def parse_store_entries(data: Any) -> list[StoreEntry]:
    """The entries of a receipt's ``stores``; ValueError names the first field that is not one
    (every field but ``expires_at`` is required; ``expires_at``, when present, is an integer)."""
    if not isinstance(data, list):
        raise ValueError("stores is not a list")
    for index, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise ValueError(f"stores[{index}] is not an object")
        missing = [name for name in _STORE_FIELDS if name not in entry]
        if missing:
            raise ValueError(f"stores[{index}] lacks {missing}")
        if "expires_at" in entry and entry["expires_at"] is None:
            raise ValueError(f"stores[{index}].expires_at is not an integer")
        if "nodes" in entry:
            _check_node_json(entry["nodes"], f"stores[{index}].nodes")
    try:
        return STORE_ENTRIES.validate_python(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in first["loc"])
        raise ValueError(f"stores{where}: {first['msg']}") from None


def _check_node_json(nodes: Any, where: str) -> None:
    if not isinstance(nodes, list) or not nodes:
        raise ValueError(f"{where} is not a non-empty list")
    for index, node in enumerate(nodes):
        if isinstance(node, dict) and "remaining_blocks" in node and node["remaining_blocks"] is None:
            raise ValueError(f"{where}[{index}].remaining_blocks is not an integer")


def nodes_error(stores: Sequence[StoreEntry]) -> str | None:
    """Why a store's class is not what its nodes show (None when every store with nodes states
    the weakest class of its nodes, as ``done``)."""
    for index, entry in enumerate(stores):
        if entry.nodes is None:
            continue
        if not entry.nodes:
            return f"stores[{index}] lists no nodes"
        shown = weakest(node.guarantee_class for node in entry.nodes)
        if entry.result is not StoreResult.DONE or entry.guarantee_class is not shown:
            return (
                f"stores[{index}] ({entry.store}) states {entry.result}/{entry.guarantee_class}, "
                f"not what its nodes show (done/{shown})"
            )
    return None


def receipt_class(stores: Sequence[StoreEntry], ceiling: GuaranteeClass) -> GuaranteeClass:
    """The class a receipt states: the weakest over the stores, capped at the profile's ceiling.

    Each store contributes by its result:

    - ``done``: its own ``guarantee_class``.
    - ``failed``: ``revoked``. The data may still be there; all we can show is that the handle
      no longer resolves, so a failure pulls the whole receipt down to ``revoked`` (or to
      ``provider_expiry`` if a provider store ties with it, since that says more).
    - ``not_held``: nothing. A store that never held the data neither weakens nor strengthens
      the claim.

    When no store contributes (no stores, or none held the data) the class is ``revoked``: the
    revocation is the only act the receipt can show, and a receipt never claims an erase it
    did not perform.
    """
    contributed = [
        entry.guarantee_class if entry.result == StoreResult.DONE else GuaranteeClass.REVOKED
        for entry in stores
        if entry.result != StoreResult.NOT_HELD
    ]
    if not contributed:
        return GuaranteeClass.REVOKED
    return capped(weakest(contributed), ceiling)


def build_receipt(
    *,
    receipt_id: str,
    tenant: str,
    target: str,
    issued_at: int,
    profile: str,
    profile_ceiling: GuaranteeClass,
    stores: Sequence[StoreEntry],
    purged: Sequence[str],
    seq: int,
    prev_receipt_hash: str | None,
) -> dict[str, Any]:
    """An unsigned receipt (no ``key_id``/``signature``; ``ReceiptSigner.sign`` adds them).

    ``purged`` lists every handle removed: the target and what derived from it, in the caller's
    order, without repeats. ``guarantee_class`` is ``receipt_class(stores, profile_ceiling)``.
    Raises ValueError for inputs a verifier would reject.
    """
    if target not in purged:
        raise ValueError(f"purged must include the target {target!r}")
    if len(set(purged)) != len(purged):
        raise ValueError("purged lists a handle twice")
    if not _is_int(issued_at) or issued_at < 0:
        raise ValueError("issued_at must be non-negative int unix seconds")
    if not _is_int(seq) or seq < 0:
        raise ValueError("seq must be a non-negative int")
    if prev_receipt_hash is not None and not _HASH_RE.fullmatch(prev_receipt_hash):
        raise ValueError("prev_receipt_hash must be 64 lower-case hex characters or None")
    if (error := nodes_error(stores)) is not None:
        raise ValueError(error)
    return {
        "id": receipt_id,
        "object": RECEIPT_OBJECT,
        "tenant": tenant,
        "target": target,
        "purged": list(purged),
        "issued_at": issued_at,
        "profile": profile,
        "profile_ceiling": profile_ceiling.value,
        "guarantee_class": receipt_class(stores, profile_ceiling).value,
        "stores": store_entries_json(stores),
        "seq": seq,
        "prev_receipt_hash": prev_receipt_hash,
    }


def key_id_of(public_key: Ed25519PublicKey) -> KeyId:
    """``ed25519:`` + the first 16 hex characters of sha256 over the raw 32-byte public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return KeyId(f"{ALGORITHM}:{hashlib.sha256(raw).hexdigest()[:16]}")


def load_public_key(pem: bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM; ValueError when the bytes are not one."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("the public key is not Ed25519")
    return key


class ReceiptSigner:
    """Signs receipts with one Ed25519 private key."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        self.key_id = key_id_of(private_key.public_key())

    @classmethod
    def generate(cls) -> ReceiptSigner:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, pem: bytes) -> ReceiptSigner:
        """From an unencrypted PKCS#8 PEM; ValueError when it is not an Ed25519 private key."""
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError("the private key is not Ed25519")
        return cls(key)

    def private_pem(self) -> bytes:
        return self._private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def public_pem(self) -> bytes:
        return self._private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, unsigned: dict[str, Any]) -> dict[str, Any]:
        """A new dict: ``unsigned`` plus ``key_id``, then ``signature`` over every other field.
        Raises ValueError if ``unsigned`` is already signed, TypeError if it holds a float."""
        if "signature" in unsigned or "key_id" in unsigned:
            raise ValueError("receipt is already signed")
        body = {**unsigned, "key_id": self.key_id}
        signature = self._private_key.sign(canonical_bytes(body))
        return {**body, "signature": base64.b64encode(signature).decode("ascii")}


def receipt_hash(receipt: dict[str, Any]) -> ReceiptHash:
    """sha256 hex of the canonical bytes of the whole signed receipt: the next receipt's
    ``prev_receipt_hash``."""
    return ReceiptHash(hashlib.sha256(canonical_bytes(receipt)).hexdigest())


@dataclass(frozen=True)
class ChainHead:
    """The newest receipt of a tenant's chain: the next receipt gets ``seq + 1`` and
    ``prev_receipt_hash = hash`` (``receipt_hash`` of this one)."""

    seq: int
    hash: ReceiptHash


class KeyStatus(StrEnum):
    """A signing key's status in ``GET /v2/keys``: ``current`` signs new receipts, a ``retired``
    key only verifies the receipts it signed before a rotation."""

    CURRENT = "current"
    RETIRED = "retired"


class PublicKeyRecord(TypedDict):
    """One entry of ``GET /v2/keys``: ``public_key`` is the PEM (SubjectPublicKeyInfo), ``status``
    a ``KeyStatus`` value."""

    key_id: str
    algorithm: str
    public_key: str
    status: str


def public_key_record(signer: ReceiptSigner, status: KeyStatus = KeyStatus.CURRENT) -> PublicKeyRecord:
    """The entry of ``GET /v2/keys`` for ``signer``'s key."""
    return public_pem_record(signer.public_pem(), status)


def public_pem_record(public_pem: bytes, status: KeyStatus) -> PublicKeyRecord:
    """The entry of ``GET /v2/keys`` for an Ed25519 public key's PEM; ValueError when it is not one."""
    return PublicKeyRecord(
        key_id=key_id_of(load_public_key(public_pem)), algorithm=ALGORITHM,
        public_key=public_pem.decode("ascii"), status=status.value,
    )  # fmt: skip


@dataclass(frozen=True)
class Verification:
    """The outcome of checking one receipt: ``ok`` only when intact; ``reason`` says why not
    (or, when ok, what was checked)."""

    ok: bool
    reason: str


def verify_receipt(receipt: Any, public_key_pem: bytes) -> Verification:
    """Check a receipt offline against a public key. Never raises; every failure is a value.

    Checks, in order: shape (a dict with exactly the receipt fields, typed as ``build_receipt``
    writes them, no floats), the key (``key_id`` is that of ``public_key_pem``), the signature,
    then the claim: ``guarantee_class`` is not above ``profile_ceiling`` and equals
    ``receipt_class`` of its stores and ceiling, and each store that lists nodes states the
    weakest class of its nodes (``nodes_error``).
    """
    try:
        return _verify(receipt, public_key_pem)
    except Exception as exc:  # a verifier reports, it does not crash on hostile input
        return Verification(False, f"receipt could not be checked: {type(exc).__name__}: {exc}")


FIRST_SEQ = 1  # the seq of a tenant's first receipt (its prev_receipt_hash is None)


def verify_chain(receipts: Sequence[Any], public_keys: Mapping[str, bytes]) -> Verification:
    """Check receipts of one tenant's log offline (``GET /v2/receipts`` pages, in any order):
    each one intact with the key of its ``key_id`` (``verify_receipt``), one tenant, and each
    linked to the one before it by ``seq`` (no gap, no repeat) and ``prev_receipt_hash`` (the
    ``receipt_hash`` of that one). The oldest given may start after seq 1: the earlier part is
    then not checked, and the reason says so. Never raises."""
    if not receipts:
        return _fail("no receipts given")
    for index, receipt in enumerate(receipts):
        key_id = receipt.get("key_id") if isinstance(receipt, dict) else None
        pem = public_keys.get(key_id) if isinstance(key_id, str) else None
        if pem is None:
            return _fail(f"receipt {index}: its key_id {str(key_id)[:80]!r} is none of the keys given")
        verification = verify_receipt(receipt, pem)
        if not verification.ok:
            return _fail(f"receipt {index} ({str(receipt.get('id'))[:80]}): {verification.reason}")
    tenants = {receipt["tenant"] for receipt in receipts}
    if len(tenants) > 1:
        return _fail(f"the receipts are of {len(tenants)} tenants; a chain is one tenant's")
    ordered = sorted(receipts, key=lambda receipt: receipt["seq"])
    for before, after in zip(ordered, ordered[1:], strict=False):
        if after["seq"] == before["seq"]:
            return _fail(f"two receipts have seq {after['seq']}")
        if after["seq"] != before["seq"] + 1:
            return _fail(f"seq {before['seq'] + 1} is missing between seq {before['seq']} and {after['seq']}")
        if after["prev_receipt_hash"] != receipt_hash(before):
            return _fail(
                f"seq {after['seq']} does not follow seq {before['seq']}: its prev_receipt_hash is "
                "not that receipt's hash"
            )
    first, last = ordered[0], ordered[-1]
    if first["seq"] < FIRST_SEQ:
        return _fail(f"seq {first['seq']} is below {FIRST_SEQ}, the seq of a tenant's first receipt")
    if first["seq"] == FIRST_SEQ and first["prev_receipt_hash"] is not None:
        return _fail(f"seq {FIRST_SEQ} opens the chain but names a previous receipt")
    if first["seq"] > FIRST_SEQ and first["prev_receipt_hash"] is None:
        return _fail(f"seq {first['seq']} names no previous receipt, though seq {FIRST_SEQ} opens the chain")
    start = "from the first" if first["seq"] == FIRST_SEQ else "earlier ones not given"
    return Verification(
        True,
        f"{len(ordered)} receipts of tenant {first['tenant']}, seq {first['seq']}..{last['seq']} "
        f"({start}): every signature valid, each linked to the one before",
    )


def _verify(receipt: Any, public_key_pem: bytes) -> Verification:
    if not isinstance(receipt, dict):
        return _fail("a receipt is a JSON object")
    try:
        canonical_bytes(receipt)
    except TypeError as exc:
        return _fail(str(exc))
    missing = RECEIPT_FIELDS - receipt.keys()
    if missing:
        return _fail(f"missing fields {sorted(missing)}")
    unknown = receipt.keys() - RECEIPT_FIELDS
    if unknown:
        return _fail(f"unknown fields {sorted(unknown)}")
    shape_error = _shape_error(receipt)
    if shape_error:
        return _fail(shape_error)
    try:
        stores = parse_store_entries(receipt["stores"])
    except ValueError as exc:
        return _fail(str(exc))

    try:
        public_key = load_public_key(public_key_pem)
    except ValueError as exc:
        return _fail(str(exc))
    key_id = key_id_of(public_key)
    if receipt["key_id"] != key_id:
        return _fail(f"key_id {receipt['key_id']!r} is not that of the given public key ({key_id})")
    try:
        signature = base64.b64decode(receipt["signature"], validate=True)
    except (binascii.Error, ValueError):
        return _fail("signature is not valid base64")
    if len(signature) != _SIGNATURE_BYTES:
        return _fail("signature has the wrong length for Ed25519")
    body = {name: value for name, value in receipt.items() if name != "signature"}
    try:
        public_key.verify(signature, canonical_bytes(body))
    except InvalidSignature:
        return _fail("signature does not match the receipt's contents")

    claimed = GuaranteeClass(receipt["guarantee_class"])
    ceiling = GuaranteeClass(receipt["profile_ceiling"])
    if claimed.rank > ceiling.rank:
        return _fail(f"guarantee_class {claimed} is above the profile ceiling {ceiling}")
    computed = receipt_class(stores, ceiling)
    if claimed != computed:
        return _fail(f"guarantee_class {claimed} is not what its stores show ({computed})")
    if (error := nodes_error(stores)) is not None:
        return _fail(error)
    return Verification(True, f"intact: signed by {key_id}, class {claimed} within ceiling {ceiling}")


def _shape_error(receipt: dict[str, Any]) -> str | None:
    for name in ("id", "tenant", "target", "profile", "key_id", "signature"):
        if not isinstance(receipt[name], str):
            return f"{name} is not a string"
    if receipt["object"] != RECEIPT_OBJECT:
        return f"object is {receipt['object']!r}, not {RECEIPT_OBJECT!r}"
    for name in ("guarantee_class", "profile_ceiling"):
        if receipt[name] not in _CLASS_NAMES:
            return f"{name} {receipt[name]!r} is not a known guarantee class"
    purged = receipt["purged"]
    if not isinstance(purged, list) or not all(isinstance(handle, str) for handle in purged):
        return "purged is not a list of handles"
    if receipt["target"] not in purged:
        return "purged does not include the target"
    if len(set(purged)) != len(purged):
        return "purged lists a handle twice"
    for name in ("issued_at", "seq"):
        if not _is_int(receipt[name]) or receipt[name] < 0:
            return f"{name} is not a non-negative integer"
    prev = receipt["prev_receipt_hash"]
    if prev is not None and not (isinstance(prev, str) and _HASH_RE.fullmatch(prev)):
        return "prev_receipt_hash is neither null nor a sha256 hex digest"
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fail(reason: str) -> Verification:
    return Verification(False, reason)
