"""The engine's own block hashes of a token-id prompt, computed in the gateway.

vLLM names each full KV block of a prompt by a chained hash (``vllm/v1/core/kv_cache_utils.py``
``hash_block_tokens``), and its KV cache events (``BlockStored``, ``BlockRemoved``) carry those
names. When the gateway keys a prompt's residency by the same names, the engine's events say
directly which of its blocks a replica holds or evicted: no mapping table, nothing to guess.

With ``prefix_caching_hash_algo: sha256_cbor`` (set by ``engines/vllm_config.py`` when KV events
are on) each block is::

    hash_i = sha256(cbor_canonical((hash_{i-1} or NONE_HASH, tuple(block_i tokens), extra_i)))
    NONE_HASH = sha256(cbor_canonical("vllm-none-hash"))   (no PYTHONHASHSEED in the engine)
    extra_0 = (("cache_salt", salt),) when the request has a cache salt, else None; extra_i>0 = None

and the event names a block by the low 64 bits of its hash, big-endian (vLLM's default
``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``). Prompts with LoRA adapters or multimodal inputs add
extra keys this module does not model (their blocks then never match: a worse pick, never a
wrong answer). ``tests/unit/test_block_hashes.py`` checks equality with vLLM's own function, and
the integration smoke against the hashes a real engine publishes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

NONE_HASH_SEED = "vllm-none-hash"
HASH_ALGO = "sha256_cbor"


def engine_block_hashes(
    token_ids: Sequence[int], *, block_size: int, cache_salt: str | None, max_blocks: int
) -> list[bytes]:
    """The full hashes of every full block of ``token_ids`` (at most ``max_blocks``).

    Each block's CBOR is written here rather than by ``cbor2`` (pure Python in this build: about
    35 µs a block, 9 ms for an 8k-token prompt): the shape is fixed, and a token's encoding comes
    from a table. ``tests/unit/test_block_hashes.py`` holds it equal to vLLM's own hasher."""
    head = _head(4, block_size)
    salted = _CBOR_NULL if not cache_salt else b"\x81\x82" + _text("cache_salt") + _text(cache_salt)
    parent = NONE_HASH
    hashes: list[bytes] = []
    for index in range(min(len(token_ids) // block_size, max_blocks)):
        block = token_ids[index * block_size : (index + 1) * block_size]
        try:
            body = b"".join(map(_ENCODED.__getitem__, block))
        except (IndexError, TypeError):  # a token id beyond the table
            body = b"".join(_head(0, token) for token in block)
        extra = salted if index == 0 else _CBOR_NULL
        parent = hashlib.sha256(b"\x83\x58\x20" + parent + head + body + extra).digest()
        hashes.append(parent)
    return hashes


_CBOR_NULL = b"\xf6"


def _head(major: int, length: int) -> bytes:
    """A canonical CBOR head: ``major`` type with the shortest argument for ``length``."""
    if length < 0:
        raise ValueError("a CBOR length or token id must not be negative")
    if length < 24:
        return bytes([major << 5 | length])
    for code, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if length < 1 << (8 * size):
            return bytes([major << 5 | code]) + length.to_bytes(size, "big")
    raise ValueError("a CBOR length must fit in 64 bits")


def _text(value: str) -> bytes:
    data = value.encode()
    return _head(3, len(data)) + data


_ENCODED = [_head(0, token) for token in range(1 << 16)]  # most vocabularies fit
NONE_HASH = hashlib.sha256(_text(NONE_HASH_SEED)).digest()


def event_key(block_hash: bytes | int) -> str:
    """How a block is named in residency: the 64-bit int of a KV event, as 16 hex digits (a
    full hash is cut to the same)."""
    if isinstance(block_hash, bytes):
        block_hash = int.from_bytes(block_hash, byteorder="big")
    return f"{block_hash & 0xFFFF_FFFF_FFFF_FFFF:016x}"


def engine_block_keys(
    token_ids: Sequence[int], *, block_size: int, cache_salt: str | None, max_blocks: int
) -> list[str]:
    """``engine_block_hashes`` as residency keys (``event_key``)."""
    hashes = engine_block_hashes(
        token_ids, block_size=block_size, cache_salt=cache_salt, max_blocks=max_blocks
    )
    return [event_key(block_hash) for block_hash in hashes]
