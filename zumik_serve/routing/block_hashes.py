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

import functools
import hashlib
from array import array
from collections.abc import Callable, Sequence
from itertools import accumulate
from operator import itemgetter
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
    encoded in one pass (``_framed_blocks``), so that only the chain of sha256 calls runs per
    block. ``tests/unit/test_block_hashes.py`` holds it equal to vLLM's own hasher."""
    num_blocks = min(len(token_ids) // block_size, max_blocks)
    if num_blocks <= 0:
        return []
    framed, ends = _framed_blocks(token_ids[: num_blocks * block_size], block_size)
    return _chain(framed, ends, NONE_HASH, _salt_extra(cache_salt))


def chained_hashes(
    token_ids: Sequence[int], content: bytes | None, *, block_size: int, parent: bytes | None,
    cache_salt: str | None,
) -> list[bytes]:  # fmt: skip
    """The hashes of the whole blocks of ``token_ids``, chained from ``parent``: the hash of the
    block before them, or None when they begin the prompt (block 0 then carries the salt).
    ``content``: their ids as 4 bytes each (``array("I")``), when the caller has it (the chain
    memo's content), saves converting them again."""
    tokens = token_ids[: len(token_ids) // block_size * block_size]
    if not tokens:
        return []
    if content is not None and _vectored(values := np.frombuffer(content, dtype=np.uintc)):
        framed, ends = _vector_framed(values, block_size)
    else:
        framed, ends = _framed_blocks(tokens, block_size)
    if parent is None:
        return _chain(framed, ends, NONE_HASH, _salt_extra(cache_salt))
    return _chain(framed, ends, parent, _CBOR_NULL)


def _chain(framed: bytes, ends: Sequence[int], parent: bytes, first_extra: bytes) -> list[bytes]:
    """The hashes of the blocks in ``framed`` (block ``i`` ends at ``ends[i]``), chained from
    ``parent``; ``first_extra`` is the first block's extra keys (the salt of a prompt's block 0,
    CBOR null for any later block). A block in ``framed`` is the tail of its CBOR: the tokens'
    array head, the tokens, null; each hash copies a sha256 that has taken the array's first
    bytes (cheaper than a new one) and takes the parent and that tail."""
    start = ends[0]
    parent = hashlib.sha256(_PARENT + parent + framed[: start - 1] + first_extra).digest()
    hashes = [parent]
    append = hashes.append
    new = _SHA256_OF_PARENT_HEAD.copy
    for end in ends[1:]:
        block = new()
        block.update(parent)
        block.update(framed[start:end])
        parent = block.digest()
        append(parent)
        start = end
    return hashes


def _salt_extra(cache_salt: str | None) -> bytes:
    """Block 0's extra keys: ``(("cache_salt", salt),)``, or null without a salt."""
    return _CBOR_NULL if not cache_salt else b"\x81\x82" + _text("cache_salt") + _text(cache_salt)


_CBOR_NULL = b"\xf6"
_PARENT = b"\x83\x58\x20"  # an array of 3 (parent, tokens, extra), then the parent: 32 bytes
_SHA256_OF_PARENT_HEAD = hashlib.sha256(_PARENT)  # only ever copied, so threads may share it


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


def _framed_blocks(tokens: Sequence[int], block_size: int) -> tuple[bytes, list[int]]:
    """Each block of ``tokens`` (whole blocks) framed as ``_chain`` hashes it, in one string:
    ``head(array of block_size) + the tokens' CBOR items + null``, and where each block ends.

    Ids of 32 bits (every vocabulary's) are encoded by numpy for a long prompt or one with ids
    past 2**16 (``_vector_framed``), block by block from a table of encodings for a short one;
    anything else (an id below 0 or past 32 bits: no engine accepts it) id by id, as ``cbor2``
    would."""
    try:
        values = np.frombuffer(array("I", tokens), dtype=np.uintc)  # raises unless 0 <= id < 2**32
    except OverflowError:
        return _joined_blocks(tokens, block_size, _any_block)
    if _vectored(values):
        return _vector_framed(values, block_size)
    return _joined_blocks(tokens, block_size, _table_block)


def _vectored(values: np.ndarray) -> bool:
    """Whether numpy encodes these ids faster than the table: a long prompt, or an id past the
    table (those would be encoded one by one)."""
    return len(values) >= VECTOR_MIN_TOKENS or int(values.max(initial=0)) >= len(_ENCODED)


def _table_block(block: Sequence[int]) -> bytes:
    """A block of ids below the table's end, from the table of encodings."""
    return b"".join(map(_ENCODED.__getitem__, block))


def _any_block(block: Sequence[int]) -> bytes:
    return b"".join(map(_int, block))


def _joined_blocks(
    tokens: Sequence[int], block_size: int, encode: Callable[[Sequence[int]], bytes]
) -> tuple[bytes, list[int]]:
    head = _head(4, block_size)
    starts = range(0, len(tokens), block_size)
    parts = [head + encode(tokens[i : i + block_size]) + _CBOR_NULL for i in starts]
    return b"".join(parts), list(accumulate(map(len, parts)))


class _Frames:
    """Rows of fixed-width slots that ``_vector_framed`` writes a prompt's blocks into, one row a
    block: its array head, its ids, null. A slot is ``size`` bytes (3: ids below 2**16, 5: any
    below 2**32), an item sits in its last bytes, and a mask of the same shape flags them. The
    template has what no id changes written once (the frame; each id slot's widest head and
    last byte); a prompt copies it, grown on demand by doubling to the longest prompt seen."""

    def __init__(self, size: int, block_size: int) -> None:
        head = _head(4, block_size)
        slots = np.zeros((1, block_size + 2, size), dtype=np.uint8)
        kept = np.zeros((1, block_size + 2, size), dtype=np.bool_)
        for column, item in ((0, head), (-1, _CBOR_NULL)):
            slots[0, column, size - len(item) :] = list(item)
            kept[0, column, size - len(item) :] = True
        slots[0, 1:-1, 0] = 0x19 if size == 3 else 0x1A  # the head of a 2- or 4-byte id
        kept[0, 1:-1, -1] = True  # an id's last byte is always its item's
        self.size = size
        self._templates = (slots, kept)

    def copies(self, num_blocks: int) -> tuple[np.ndarray, np.ndarray]:
        """Fresh rows for ``num_blocks`` blocks, and their mask."""
        slots, kept = self._templates
        if len(slots) < num_blocks:  # one tuple, replaced whole: a racing thread sees either
            repeats = -(-max(num_blocks, 2 * len(slots)) // len(slots))
            slots, kept = np.tile(slots, (repeats, 1, 1)), np.tile(kept, (repeats, 1, 1))
            self._templates = (slots, kept)
        return slots[:num_blocks].copy(), kept[:num_blocks].copy()


# By how many of (below 2**8, below 2**16) an id is: what its 4 bytes carry above it (0x19 as
# the head of a 2-byte id, 0x18 of a 1-byte one; the bytes above an item are never kept).
_WIDE_HEADS = np.array([0, 0x19 << 16, 0x19 << 16 | 0x18 << 8], dtype=np.uint32)


@functools.cache
def _frames(size: int, block_size: int) -> _Frames:
    return _Frames(size, block_size)


def _vector_framed(values: np.ndarray, block_size: int) -> tuple[bytes, list[int]]:
    """``_framed_blocks`` of ids below 2**32, with no Python loop over the tokens: each id's
    bytes written into its slot of a copy of the template (``_Frames``), its head byte where its
    item is 1 or 2 bytes, then the flagged bytes of all slots kept in order.

    A slot of 3 bytes: ``0x19, byte 1, byte 0`` (``byte 1`` is 0x18 below 2**8); of 5 bytes:
    ``0x1a, byte 3, byte 2, byte 1, byte 0`` (``byte 2`` is 0x19 below 2**16). Kept: the last
    1 (below 24), 2 (below 2**8), 3 (below 2**16) or 5 bytes."""
    num_blocks = len(values) // block_size
    wide = int(values.max()) >= 1 << 16 or block_size >= 1 << 16  # the array head fits 3 bytes
    slots, kept = _frames(5 if wide else 3, block_size).copies(num_blocks)
    ids = values.reshape(num_blocks, block_size)
    items, items_kept = slots[:, 1:-1], kept[:, 1:-1]
    below_256 = ids < 1 << 8
    np.greater_equal(ids, 24, out=items_kept[..., -2])
    np.logical_not(below_256, out=items_kept[..., -3])
    if wide:
        below_2_16 = ids < 1 << 16
        np.logical_not(below_2_16, out=items_kept[..., 0])
        items_kept[..., 1] = items_kept[..., 0]
        heads = _WIDE_HEADS.take(below_256.view(np.uint8) + below_2_16.view(np.uint8))
        items[..., 1:].view(">u4")[..., 0] = ids | heads  # byte 3 to byte 0 of each slot
    else:
        items[..., 1:].view(">u2")[..., 0] = ids | below_256.view(np.uint8) * np.uint32(0x18 << 8)
    # Each block's length: the bytes its row keeps, summed in floats (exact, and a BLAS call).
    flags = kept.reshape(num_blocks, -1).view(np.uint8)
    lengths = flags.astype(np.float64) @ np.ones(flags.shape[1])
    return slots[kept].tobytes(), np.cumsum(lengths, dtype=np.intp).tolist()


_ENCODED = [_head(0, token) for token in range(1 << 16)]  # most vocabularies fit
NONE_HASH = hashlib.sha256(_text(NONE_HASH_SEED)).digest()


_LOW_64_BITS = itemgetter(slice(-8, None))  # of a hash: what a KV event names its block by


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
        return list(map(bytes.hex, map(_LOW_64_BITS, hashes)))  # event_key of 32-byte hashes
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
    values = np.frombuffer(ids, dtype=np.uintc)[first:]
    if _vectored(values):
        framed, ends = _vector_framed(values, block_size)
    else:
        framed, ends = _joined_blocks(token_ids[first:num_tokens], block_size, _table_block)
    if done:
        hashes = _chain(framed, ends, cast(bytes, link), _CBOR_NULL)
    else:
        hashes = _chain(framed, ends, NONE_HASH, _salt_extra(cache_salt))
    keys.extend(map(bytes.hex, map(_LOW_64_BITS, hashes)))  # event_key of 32-byte hashes
    memo.remember(chain, link, content, block_bytes, done, keys, hashes)
    return keys
