"""`zumik receipt verify`: check a receipt file offline; exit 0 only for an intact receipt.

The file holds one receipt (the ``receipt`` of ``POST /v2/purge``, or ``GET /v2/receipts/{id}``),
or a part of a tenant's log: the body of ``GET /v2/receipts``, or a JSON array of receipts (pages
put together). A log is intact when every receipt is and each links to the one before it
(``receipt.verify_chain``): a receipt removed from the middle breaks the chain, and so does one
rewritten and signed again unless every receipt after it was rewritten too, which the newest
receipt a tenant kept from before shows.

The key file is a PEM with one or more Ed25519 public keys, or the JSON body of ``GET /v2/keys``
(the current key and every retired one): the receipt's ``key_id`` picks the key, so a receipt
signed before a rotation verifies with the keys listed after it.

Exit codes: 0 intact, 1 not intact (tampered, malformed, wrong or unknown key, a claim its stores
do not support), 2 a file could not be read (missing, unreadable, or the key file holds no
Ed25519 public key).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from zumik_serve.purge.receipt import (
    Verification,
    key_id_of,
    load_public_key,
    verify_chain,
    verify_receipt,
)
from zumik_serve.server_secrets import public_key_blocks

EXIT_INTACT = 0
EXIT_NOT_INTACT = 1
EXIT_UNREADABLE = 2


class UnreadableFileError(Exception):
    """A receipt or key file that could not be read; the message says what to do."""


def verify_file(path: Path, public_key_path: Path) -> Verification:
    """Verify the receipt in ``path`` with the key of its ``key_id`` in ``public_key_path``.

    Raises UnreadableFileError when either file cannot be read or the key file holds no Ed25519
    public key. A receipt file that is not JSON (or repeats a key), or whose ``key_id`` is none
    of the keys given, is a failed Verification: the bytes were readable, they are not a receipt
    these keys show intact."""
    keys = read_public_keys(public_key_path)
    raw = _read(path, "receipt")
    try:
        receipt = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except UnicodeDecodeError:
        return Verification(False, "receipt file is not UTF-8 text")
    except ValueError as exc:
        return Verification(False, f"receipt file is not valid JSON: {exc}")
    except RecursionError:
        return Verification(False, "receipt file is JSON nested too deep to be a receipt")
    if isinstance(receipt, dict) and receipt.get("object") == "list" and "data" in receipt:
        receipt = receipt["data"]  # the body of GET /v2/receipts
    if isinstance(receipt, list):
        return verify_chain(receipt, keys)
    key_id = receipt.get("key_id") if isinstance(receipt, dict) else None
    if isinstance(key_id, str) and key_id in keys:
        return verify_receipt(receipt, keys[key_id])
    if len(keys) == 1:  # one key given: the verifier says how it differs from the receipt's
        return verify_receipt(receipt, next(iter(keys.values())))
    return Verification(
        False,
        f"the receipt's key_id {str(key_id)[:80]!r} is none of the {len(keys)} keys in {public_key_path} "
        f"({', '.join(keys)}); fetch the current list from GET /v2/keys",
    )


def read_public_keys(path: Path) -> dict[str, bytes]:
    """key_id → PEM of every Ed25519 public key in ``path``: PEM blocks, or the JSON body of
    ``GET /v2/keys`` (each key's id is computed from its PEM, not taken from the file)."""
    data = _read(path, "public key")
    how = "pass a PEM from GET /v2/keys (field public_key), or that response's JSON body"
    pems: list[bytes]
    if data.lstrip().startswith(b"{"):
        try:
            listed = json.loads(data.decode("utf-8"))["keys"]
            pems = [str(item["public_key"]).encode("ascii") for item in listed]
        except (ValueError, KeyError, TypeError) as exc:
            raise UnreadableFileError(f"{path}: not the JSON of GET /v2/keys ({exc}); {how}") from None
    else:
        pems = public_key_blocks(data) or [data]
    keys: dict[str, bytes] = {}
    for pem in pems:
        try:
            keys[key_id_of(load_public_key(pem))] = pem
        except ValueError as exc:
            raise UnreadableFileError(f"{path}: {exc}; {how}") from exc
    if not keys:
        raise UnreadableFileError(f"{path}: holds no public key; {how}")
    return keys


def run_verify(path: Path, public_key_path: Path, *, as_json: bool) -> int:
    """Print one line (or one JSON object) about ``path`` and return the exit code."""
    try:
        verification = verify_file(path, public_key_path)
    except UnreadableFileError as exc:
        if as_json:
            print(json.dumps({"file": str(path), "ok": False, "error": str(exc)}))
        else:
            print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNREADABLE
    if as_json:
        print(json.dumps({"file": str(path), "ok": verification.ok, "reason": verification.reason}))
    elif verification.ok:
        print(f"OK {path}: {verification.reason}")
    else:
        print(f"FAILED {path}: {verification.reason}")
    return EXIT_INTACT if verification.ok else EXIT_NOT_INTACT


def _read(path: Path, role: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UnreadableFileError(
            f"cannot read {role} file {path}: {reason}; check the path and its permissions"
        ) from exc


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of repeated keys; a signed receipt has none, so refuse ambiguity.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice")
        out[key] = value
    return out
