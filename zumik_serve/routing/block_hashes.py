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
wrong answer). ``engine_block_keys`` with a chain memo (``routing/chain_memo.py``) recalls the
blocks a recent prompt of the same salt began with instead of encoding and hashing them again.
``tests/unit/test_block_hashes.py`` checks equality with vLLM's own function, and the
integration smoke against the hashes a real engine publishes.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable, Sequence
from itertools import accumulate
from typing import cast

import numpy as np

from zumik_serve.routing.chain_memo import ChainMemo

NONE_HASH_SEED = "vllm-none-hash"
HASH_ALGO = "sha256_cbor"
VECTOR_MIN_TOKENS = 512  # from here numpy encodes a prompt faster than the per-block table join


def engine_block_hashes(
    token_ids: Sequence[int], *, block_size: int, cache_salt: str | None, max_blocks: int
) -> list[bytes]:
    """The full hashes of every full block of ``token_ids`` (at most ``max_blocks``).

    Each block's CBOR is written here rather than by ``cbor2`` (pure Python in this build: about
    35 µs a block, 9 ms for an 8k-token prompt): the shape is fixed, and the prompt's tokens are
    encoded in one pass (``_encoded_blocks``), so that only the chain of sha256 calls runs per
    block. ``tests/unit/test_block_hashes.py`` holds it equal to vLLM's own hasher."""
    num_blocks = min(len(token_ids) // block_size, max_blocks)
    if num_blocks <= 0:
        return []
    body, ends = _encoded_blocks(token_ids[: num_blocks * block_size], block_size)
    return _chain(body, ends, block_size, NONE_HASH, _salt_extra(cache_salt))


def _chain(
    body: bytes, ends: Sequence[int], block_size: int, parent: bytes, first_extra: bytes
) -> list[bytes]:
    """The hashes of the blocks encoded in ``body`` (block ``i`` ends at ``ends[i]``), chained
    from ``parent``; ``first_extra`` is the first block's extra keys (the salt of a prompt's
    block 0, CBOR null for any later block)."""
    sha256 = hashlib.sha256
    items = _head(4, block_size)  # the block's tokens: an array of block_size items
    start = ends[0]
    parent = sha256(_PARENT + parent + items + body[:start] + first_extra).digest()
    hashes = [parent]
    for end in ends[1:]:
        parent = sha256(_PARENT + parent + items + body[start:end] + _CBOR_NULL).digest()
        hashes.append(parent)
        start = end
    return hashes


def _salt_extra(cache_salt: str | None) -> bytes:
    """Block 0's extra keys: ``(("cache_salt", salt),)``, or null without a salt."""
    return _CBOR_NULL if not cache_salt else b"\x81\x82" + _text("cache_salt") + _text(cache_salt)


_CBOR_NULL = b"\xf6"
_PARENT = b"\x83\x58\x20"  # an array of 3 (parent, tokens, extra), then the parent: 32 bytes


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


def _int(value: int) -> bytes:
    """An integer as ``cbor2`` writes it: unsigned, negative (major 1), or past 64 bits a bignum
    (tag 2, or 3 when negative, over the big-endian magnitude). An id no vocabulary has still
    hashes as the engine would hash it, and never fails the decision."""
    if -(1 << 64) <= value < 1 << 64:
        return _head(0, value) if value >= 0 else _head(1, -1 - value)
    magnitude = value if value >= 0 else -1 - value
    payload = magnitude.to_bytes((magnitude.bit_length() + 7) // 8, "big")
    return _head(6, 2 if value >= 0 else 3) + _head(2, len(payload)) + payload


def _text(value: str) -> bytes:
    data = value.encode()
    return _head(3, len(data)) + data


def _encoded_blocks(tokens: Sequence[int], block_size: int) -> tuple[bytes, list[int]]:
    """The CBOR items of ``tokens`` (whole blocks) in one string, and where each block ends in it.

    Ids of 32 bits (every vocabulary's) are encoded by numpy for a long prompt
    (``_vector_encoded``), block by block from a table of encodings for a short one; anything
    else (an id below 0 or past 32 bits: no engine accepts it) id by id, as ``cbor2`` would."""
    try:
        values = np.frombuffer(array("I", tokens), dtype=np.uintc)  # raises unless 0 <= id < 2**32
    except OverflowError:
        return _joined_blocks(tokens, block_size, _any_block)
    if len(values) >= VECTOR_MIN_TOKENS:
        return _vector_encoded(values, block_size)
    return _joined_blocks(tokens, block_size, _table_block)


def _table_block(block: Sequence[int]) -> bytes:
    """A block of ids from 0 to 2**32 - 1: from the table of encodings when they all fit it."""
    try:
        return b"".join(map(_ENCODED.__getitem__, block))
    except IndexError:
        return _any_block(block)


def _any_block(block: Sequence[int]) -> bytes:
    return b"".join(map(_int, block))


def _joined_blocks(
    tokens: Sequence[int], block_size: int, encode: Callable[[Sequence[int]], bytes]
) -> tuple[bytes, list[int]]:
    parts = [encode(tokens[i : i + block_size]) for i in range(0, len(tokens), block_size)]
    return b"".join(parts), list(accumulate(map(len, parts)))


# A token id's CBOR is 1, 2, 3 or 5 bytes (below 24, 2**8, 2**16, 2**32): the head byte of its
# width sits above the id's own bytes in one big-endian 8-byte word, whose last bytes it is.
_WIDTH_LENGTHS = np.array([1, 2, 3, 5], dtype=np.uint8)
_WIDTH_HEADS = np.array([0, 24 << 8, 25 << 16, 26 << 32], dtype=np.uint64)
_WIDTH_MASKS = (  # per width, which of the word's 8 bytes are the id's CBOR (8 flags as one word)
    np.array([[byte >= 8 - n for byte in range(8)] for n in (1, 2, 3, 5)], dtype=np.bool_)
    .view(np.uint64)
    .ravel()
)


def _vector_encoded(values: np.ndarray, block_size: int) -> tuple[bytes, list[int]]:
    """``_encoded_blocks`` of ids below 2**32, with no Python loop over the tokens: every id as
    its 8-byte word, then the CBOR bytes of all words kept in order (a mask drops the rest)."""
    # The width class (0 to 3) of each id, from three comparisons (a searchsorted costs more).
    width = (values >= 24).view(np.uint8) + (values >= 1 << 8).view(np.uint8)
    width += (values >= 1 << 16).view(np.uint8)
    words = (_WIDTH_HEADS[width] | values).astype(">u8").view(np.uint8)
    kept = _WIDTH_MASKS[width].view(np.bool_)
    block_lengths = _WIDTH_LENGTHS[width].reshape(-1, block_size).sum(axis=1, dtype=np.intp)
    return words[kept].tobytes(), np.cumsum(block_lengths).tolist()


_ENCODED = [_head(0, token) for token in range(1 << 16)]  # most vocabularies fit
NONE_HASH = hashlib.sha256(_text(NONE_HASH_SEED)).digest()


def event_key(block_hash: bytes | int) -> str:
    """How a block is named in residency: the 64-bit int of a KV event, as 16 hex digits (a
    full hash is cut to the same)."""
    if isinstance(block_hash, bytes) and len(block_hash) >= 8:
        return block_hash[-8:].hex()  # its low 64 bits, big-endian: the same 16 digits, faster
    if isinstance(block_hash, bytes):
        block_hash = int.from_bytes(block_hash, byteorder="big")
    return f"{block_hash & 0xFFFF_FFFF_FFFF_FFFF:016x}"


def engine_block_keys(
    token_ids: Sequence[int],
    *,
    block_size: int,
    cache_salt: str | None,
    max_blocks: int,
    memo: ChainMemo | None = None,
) -> list[str]:
    """``engine_block_hashes`` as residency keys (``event_key``). With ``memo``, the blocks a
    recent prompt of the same salt began with are recalled, not encoded and hashed
    (``routing/chain_memo.py``): the same keys, byte for byte."""
    num_blocks = min(len(token_ids) // block_size, max_blocks)
    if memo is None or num_blocks <= 0:
        hashes = engine_block_hashes(
            token_ids, block_size=block_size, cache_salt=cache_salt, max_blocks=max_blocks
        )
        return [block_hash[-8:].hex() for block_hash in hashes]  # event_key of a 32-byte hash
    num_tokens = num_blocks * block_size
    try:  # the memo's content: each id's 4 bytes, exact for 0 <= id < 2**32
        ids = array("I", token_ids if len(token_ids) < num_tokens + block_size else token_ids[:num_tokens])
    except OverflowError:  # an id no engine accepts: hashed, not remembered
        return engine_block_keys(
            token_ids, block_size=block_size, cache_salt=cache_salt, max_blocks=max_blocks
        )
    del ids[num_tokens:]  # a partial last block: not hashed
    content = ids.tobytes()
    chain = (HASH_ALGO, block_size)
    block_bytes = ids.itemsize * block_size
    keys: list[str] = []
    # The root carries the salt: block 0's extra keys hold it, and NONE_HASH is every salt's.
    done, link = memo.recall(chain, ("cache_salt", cache_salt or ""), content, block_bytes, num_blocks, keys)
    if done == num_blocks:
        return keys
    first = done * block_size
    if num_tokens - first >= VECTOR_MIN_TOKENS:
        body, ends = _vector_encoded(np.frombuffer(ids, dtype=np.uintc)[first:], block_size)
    else:
        body, ends = _joined_blocks(token_ids[first:num_tokens], block_size, _table_block)
    if done:
        hashes = _chain(body, ends, block_size, cast(bytes, link), _CBOR_NULL)
    else:
        hashes = _chain(body, ends, block_size, NONE_HASH, _salt_extra(cache_salt))
    keys.extend([block_hash[-8:].hex() for block_hash in hashes])
    memo.remember(chain, link, content, block_bytes, done, keys, hashes)
    return keys
