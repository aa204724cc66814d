"""SigningKeys: the receipt signing key and the retired public keys, read from the secrets folder.

Rules kept here: the key files are read again on every use (two small files) and parsed again
when their bytes changed, so a rotation (``zumik secrets rotate-signing-key``, a Kubernetes Secret
update) reaches a running gateway without a restart. A key that signed receipts stays listed,
marked retired, so its receipts still verify. A changed file that cannot be read (or is not an
Ed25519 key) leaves the last good keys in use, and the log says why, once per change; at start,
such a file is an error.

Rotation order (``rotate_signing_key``), so a reader never lists a key as gone:

    old public key appended to receipt-signing-retired.pem → new key replaces receipt-signing.pem
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from zumik_serve.purge.receipt import (
    KeyId,
    KeyStatus,
    PublicKeyRecord,
    ReceiptSigner,
    public_key_record,
    public_pem_record,
)
from zumik_serve.secret_files import SecretFileError, write_private_file
from zumik_serve.server_secrets import (
    HOW_TO_FIX,
    RETIRED_KEYS_FILE,
    SIGNING_KEY_FILE,
    new_signing_key_pem,
    public_key_blocks,
    read_signing_key_pem,
    retire_public_keys,
)

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class Rotation:
    """What ``rotate_signing_key`` did: ``retired`` now only verifies, ``current`` signs."""

    retired: KeyId
    current: KeyId


class SigningKeys:
    """The current ``ReceiptSigner`` and every public key a verifier may need, from ``folder``."""

    def __init__(self, folder: Path) -> None:
        """Reads both files now: ``SecretFileError`` naming the file when the signing key is
        missing, unreadable or not an Ed25519 PKCS#8 PEM, or a retired key is not Ed25519."""
        self._folder = folder
        self._pem = read_signing_key_pem(folder)
        self._signer = _signer_of(self._pem, folder)
        self._retired_bytes = _read_retired(folder)
        self._retired = _retired_records(self._retired_bytes, folder)
        self._refused: dict[str, bytes | None] = {}  # file → the content last refused (None: unreadable)

    def signer(self) -> ReceiptSigner:
        """The key that signs receipts now (its file read again; parsed again when changed)."""
        try:
            pem = read_signing_key_pem(self._folder)
        except SecretFileError as exc:
            self._refuse(SIGNING_KEY_FILE, None, exc)
            return self._signer
        if pem == self._pem:
            self._refused.pop(SIGNING_KEY_FILE, None)  # back to the key in use: a later fault is news
        elif self._refused.get(SIGNING_KEY_FILE) != pem:
            try:
                signer = _signer_of(pem, self._folder)
            except SecretFileError as exc:
                self._refuse(SIGNING_KEY_FILE, pem, exc)
                return self._signer
            if signer.key_id != self._signer.key_id:
                logger.warning("zumik: the receipt signing key is now %s (was %s)", signer.key_id,
                               self._signer.key_id)  # fmt: skip
            self._signer, self._pem = signer, pem
            self._refused.pop(SIGNING_KEY_FILE, None)
        return self._signer

    def public_keys(self) -> list[PublicKeyRecord]:
        """The current key first, then each retired key in the order it was retired; one entry
        per key id."""
        current = self.signer()
        self._reload_retired()
        records = [public_key_record(current, KeyStatus.CURRENT)]
        listed: set[str] = {current.key_id}
        for record in self._retired:
            if record["key_id"] not in listed:
                listed.add(record["key_id"])
                records.append(record)
        return records

    def _reload_retired(self) -> None:
        try:
            data = _read_retired(self._folder)
        except SecretFileError as exc:
            self._refuse(RETIRED_KEYS_FILE, None, exc)
            return
        if data == self._retired_bytes or self._refused.get(RETIRED_KEYS_FILE) == data:
            return
        try:
            records = _retired_records(data, self._folder)
        except SecretFileError as exc:
            self._refuse(RETIRED_KEYS_FILE, data, exc)
            return
        self._retired, self._retired_bytes = records, data
        self._refused.pop(RETIRED_KEYS_FILE, None)

    def _refuse(self, name: str, content: bytes | None, exc: SecretFileError) -> None:
        if name in self._refused and self._refused[name] == content:
            return  # said already
        self._refused[name] = content
        logger.error("zumik: %s was not reloaded; %s stays in use: %s", self._folder / name,
                     "the signing key " + self._signer.key_id if name == SIGNING_KEY_FILE
                     else "the previous list of retired keys", exc)  # fmt: skip


def rotate_signing_key(folder: Path) -> Rotation:
    """Retire the current signing key (its public key appended to the retired file) and put a
    new one in its place. ``SecretFileError`` when there is no current key to rotate."""
    old = _load_signer(folder)
    retire_public_keys(folder, [old.public_pem()])
    new = ReceiptSigner.from_pem(new_signing_key_pem())
    write_private_file(folder / SIGNING_KEY_FILE, new.private_pem(), overwrite=True)
    return Rotation(retired=old.key_id, current=new.key_id)


def _load_signer(folder: Path) -> ReceiptSigner:
    return _signer_of(read_signing_key_pem(folder), folder)


def _signer_of(pem: bytes, folder: Path) -> ReceiptSigner:
    try:
        return ReceiptSigner.from_pem(pem)
    except (ValueError, TypeError) as exc:
        raise SecretFileError(
            f"the receipt signing key in {folder / SIGNING_KEY_FILE} is not an unencrypted Ed25519 "
            f"PKCS#8 PEM ({type(exc).__name__}). {HOW_TO_FIX}"
        ) from None


def _read_retired(folder: Path) -> bytes:
    path = folder / RETIRED_KEYS_FILE
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""  # no key retired yet
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise SecretFileError(f"the retired signing keys cannot be read from {path}: {reason}") from None


def _retired_records(data: bytes, folder: Path) -> list[PublicKeyRecord]:
    try:
        return [public_pem_record(pem, KeyStatus.RETIRED) for pem in public_key_blocks(data)]
    except ValueError as exc:
        path = folder / RETIRED_KEYS_FILE
        raise SecretFileError(f"a retired signing key in {path} does not load: {exc}") from None
