"""`zumik receipt verify`: check one receipt file offline; exit 0 only for an intact receipt.

Exit codes: 0 intact, 1 not intact (tampered, malformed, wrong key, a claim its stores do not
support), 2 a file could not be read (missing, unreadable, or the key file is not an Ed25519 PEM).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from zumik_serve.purge.receipt import Verification, load_public_key, verify_receipt

EXIT_INTACT = 0
EXIT_NOT_INTACT = 1
EXIT_UNREADABLE = 2


class UnreadableFileError(Exception):
    """A receipt or key file that could not be read; the message says what to do."""


def verify_file(path: Path, public_key_path: Path) -> Verification:
    """Verify the receipt in ``path`` with the PEM in ``public_key_path``.

    Raises UnreadableFileError when either file cannot be read or the key is not an Ed25519
    public key. A receipt file that is not JSON (or repeats a key) is a failed Verification:
    the bytes were readable, they are not an intact receipt."""
    public_key_pem = _read(public_key_path, "public key")
    try:
        load_public_key(public_key_pem)
    except ValueError as exc:
        raise UnreadableFileError(
            f"{public_key_path}: {exc}; pass the receipt key's PEM (from GET /v2/keys, field public_key)"
        ) from exc
    raw = _read(path, "receipt")
    try:
        receipt = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except UnicodeDecodeError:
        return Verification(False, "receipt file is not UTF-8 text")
    except ValueError as exc:
        return Verification(False, f"receipt file is not valid JSON: {exc}")
    return verify_receipt(receipt, public_key_pem)


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
