"""AES-GCM sealing of block values for persistent tiers (``cryptography``).

A sealed value is ``nonce (12 bytes) | ciphertext+tag``, with the block's address (its shard
digest, scope, block key) as associated data, so a value copied under another address does not
open: the shard digest (``layout.shard_digest``) names the compat key, the KV layout and the
TP/PP rank, so one rank's sealed block never opens as another rank's.
``open_into`` opens a value into the caller's buffer (``AESGCM.decrypt_into``: a restore reuses
one buffer for all its blocks instead of a fresh one per block), with the same nonce, associated
data and tag check as ``open``; when the tag does not verify it answers None and the buffer's
bytes are not plaintext to use (the caller refuses the block: the engine recomputes it).
``opening`` opens a value piece by piece (``GcmOpening``: AES-GCM's streaming decryptor, same
nonce, associated data and tag), so that a restore decrypts each tensor of a block straight into
its place in the engine's cache, one pass over the bytes; the tag is checked once every byte has
been decrypted (``verify``), and the caller wipes what it wrote when it does not verify.
``ScopedSealer`` uses one data key per isolation scope from a ``Keyring``: destroying a scope's
key makes every sealed copy of it unreadable (crypto-erasure), wherever the copies are. Its
ciphers are kept by scope: the one of a scope whose key is gone (destroyed by a purge) is dropped
at that scope's next use, and any not used for ``IDLE_S`` at the next sweep, so that a process
does not keep a destroyed key's material for as long as it runs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kvstore.tier import BlockAddress, Keyring, ScopeId

IDLE_S = 60.0  # a scope's ciphers unused this long are dropped (their key with them)
SWEEP_EVERY_S = 10.0


class AesGcmSealer:
    def __init__(self, data_key: bytes) -> None:
        if len(data_key) not in (16, 24, 32):
            raise ValueError("an AES-GCM data key is 16, 24 or 32 bytes")
        self._aead = AESGCM(data_key)
        self._cipher = algorithms.AES(data_key)

    def seal(self, value: bytes, address: BlockAddress) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, value, _associated(address))

    def open(self, sealed: bytes | memoryview, address: BlockAddress) -> bytes | None:
        if len(sealed) < 12 + 16:
            return None
        try:
            return self._aead.decrypt(sealed[:12], sealed[12:], _associated(address))
        except InvalidTag:
            return None

    def open_into(
        self, sealed: bytes | memoryview, address: BlockAddress, out: memoryview
    ) -> memoryview | None:
        return _open_into(self._aead, sealed, address, out)

    def opening(self, sealed: bytes | memoryview, address: BlockAddress) -> GcmOpening | None:
        return GcmOpening.start(self._cipher, sealed, address)


@dataclass
class _ScopeCiphers:
    data_key: bytes
    aead: AESGCM
    cipher: algorithms.AES | None  # for ``opening``, made on first use
    used_at: float


class ScopedSealer:
    """Seals each block with its scope's data key (created on first store)."""

    def __init__(self, keyring: Keyring, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._keyring = keyring
        self._clock = clock
        self._scopes: dict[ScopeId, _ScopeCiphers] = {}
        self._next_sweep = clock() + SWEEP_EVERY_S

    def seal(self, value: bytes, address: BlockAddress) -> bytes | None:
        ciphers = self._ciphers(address.scope, create=True)
        if ciphers is None:
            return None
        nonce = os.urandom(12)
        return nonce + ciphers.aead.encrypt(nonce, value, _associated(address))

    def open(self, sealed: bytes | memoryview, address: BlockAddress) -> bytes | None:
        ciphers = self._ciphers(address.scope, create=False)
        if ciphers is None or len(sealed) < 12 + 16:
            return None
        try:  # a memoryview: no copy of the ciphertext before decrypting it
            return ciphers.aead.decrypt(sealed[:12], memoryview(sealed)[12:], _associated(address))
        except InvalidTag:
            return None

    def open_into(
        self, sealed: bytes | memoryview, address: BlockAddress, out: memoryview
    ) -> memoryview | None:
        ciphers = self._ciphers(address.scope, create=False)
        if ciphers is None:
            return None
        return _open_into(ciphers.aead, sealed, address, out)

    def opening(self, sealed: bytes | memoryview, address: BlockAddress) -> GcmOpening | None:
        ciphers = self._ciphers(address.scope, create=False)
        if ciphers is None:
            return None
        if ciphers.cipher is None:
            ciphers.cipher = algorithms.AES(ciphers.data_key)
        return GcmOpening.start(ciphers.cipher, sealed, address)

    @property
    def scopes_held(self) -> int:
        """Scopes whose ciphers (and key) this sealer holds now."""
        return len(self._scopes)

    def _ciphers(self, scope: ScopeId, *, create: bool) -> _ScopeCiphers | None:
        """The scope's ciphers for its current key (None, and any held dropped, when it has
        none: never created, or destroyed)."""
        now = self._clock()
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_EVERY_S
            for idle in [s for s, held in list(self._scopes.items()) if now - held.used_at > IDLE_S]:
                self._scopes.pop(idle, None)
        data_key = self._keyring.data_key(scope, create=create)
        if data_key is None:
            self._scopes.pop(scope, None)
            return None
        held = self._scopes.get(scope)
        if held is None or held.data_key != data_key:
            held = self._scopes[scope] = _ScopeCiphers(data_key, AESGCM(data_key), None, now)
        held.used_at = now
        return held


class GcmOpening:
    """One sealed value opened piece by piece, in order: ``read_into(out)`` decrypts its next
    ``len(out)`` bytes into ``out``; ``verify()`` is True only when every byte was read and the
    tag verifies. Until then nothing read is to be trusted: a caller that wrote it somewhere
    wipes it there unless ``verify()`` (``codec.BlockSink.take_sealed``)."""

    def __init__(self, decryptor: Any, body: memoryview) -> None:
        self._decryptor = decryptor
        self._body = body  # the ciphertext, without nonce and tag
        self._read = 0
        self.size = len(body)  # the plaintext's bytes

    @classmethod
    def start(
        cls, cipher: algorithms.AES, sealed: bytes | memoryview, address: BlockAddress
    ) -> GcmOpening | None:
        """None when ``sealed`` is too short to be a sealed value."""
        if opened_size(sealed) < 0:
            return None
        view = memoryview(sealed)
        decryptor = Cipher(cipher, modes.GCM(bytes(view[:12]), bytes(view[-16:]))).decryptor()
        decryptor.authenticate_additional_data(_associated(address))
        return cls(decryptor, view[12:-16])

    @property
    def remaining(self) -> int:
        return self.size - self._read

    def read_into(self, out: Any) -> bool:
        """Decrypt the next ``len(out)`` bytes (``out``: a writable buffer) into ``out``; False,
        with nothing written, when fewer remain."""
        size = memoryview(out).nbytes
        if size > self.remaining:
            return False
        self._decryptor.update_into(self._body[self._read : self._read + size], out)
        self._read += size
        return True

    def verify(self) -> bool:
        if self.remaining:
            return False
        try:
            self._decryptor.finalize()
        except InvalidTag:
            return False
        return True


def opened_size(sealed: bytes | memoryview) -> int:
    """The plaintext bytes of a sealed value (negative: too short to be one)."""
    return len(sealed) - 12 - 16


def _open_into(
    aead: AESGCM, sealed: bytes | memoryview, address: BlockAddress, out: memoryview
) -> memoryview | None:
    """The plaintext of ``sealed`` as the start of ``out`` (at least ``opened_size`` bytes), or
    None when it does not open (too short, ``out`` too small, the tag does not verify); the
    bytes of ``out`` are then not to be used."""
    size = opened_size(sealed)
    if size < 0 or len(out) < size:
        return None
    view = out[:size]
    sealed = memoryview(sealed)
    try:
        aead.decrypt_into(sealed[:12], sealed[12:], _associated(address), view)
    except InvalidTag:
        return None
    return view


def _associated(address: BlockAddress) -> bytes:
    return f"{address.compat_digest}|{address.scope}|{address.key}".encode()
