"""Block values: KV tensors of one block as safetensors bytes and a checksum, checked on the way back.

A value is the safetensors bytes of the block's tensors followed by ``CHECKSUM_BYTES``: the
xxh3-64 of the tensors' bytes (the data after the header), big-endian. A tier that does not
seal (host shared memory always; Redis and disk with sealing off) would otherwise hand back a
block whose tensor bytes changed (a flipped bit, a stray write) with an intact header, and the
engine would answer from it: a block whose checksum does not match is refused like any damaged
one, and recomputed. A sealed block is authenticated by its tag as well.

``decode_block`` returns None for anything that is not an intact block of the expected address
(truncated, corrupt, another block's bytes, another rank's or layout's: the header names the
address's shard digest, ``layout.shard_digest``): the caller counts a miss and recomputes.
The arrays it returns are read-only views of ``value`` (no copy: a restore copies each block
once, into the engine's cache); a header whose offsets do not tile the data exactly is a miss.

``BlockSink`` puts a restore's blocks where the engine's cache wants them (``RestoreTarget``),
checking each the same way: from a file (``read_file``: the header is read and checked first,
then one ``preadv`` reads the tensors straight into their places, no buffer in between), from
a value in memory (``take``: each tensor copied once into its place), or from a sealed value
(``take_sealed``: each tensor decrypted straight into its place, the tag checked last and the
places wiped when it does not verify; used where a block lands in one run, ``takes_whole_blocks``).
"""

from __future__ import annotations

import functools
import json
import math
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xxhash
from safetensors import SafetensorError
from safetensors.numpy import load, save

from kvstore.hostcopy import map_blocks
from kvstore.tier import BlockAddress, Opening

FORMAT = "zumik-kv-block/2"  # 2: the checksum after the tensors (layout.BLOCK_FORMAT_VERSION)
# safetensors dtype names numpy reads as they are (others, e.g. BF16, go through safetensors).
_DTYPES = {
    "BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16,
    "F16": np.float16, "U32": np.uint32, "I32": np.int32, "F32": np.float32, "U64": np.uint64,
    "I64": np.int64, "F64": np.float64,
}  # fmt: skip
# Bytes per element of every safetensors dtype (blocks are stored as U8; the rest for safety).
_ITEMSIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "U16": 2, "I16": 2,
    "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8, "C64": 8,
}  # fmt: skip
HEAD_GUESS = 4096  # bytes first read of a block file (the header; a block's is ~600 bytes)
_BLANK_KEY = b"\0" * 32  # a block key (32 hex characters) blanked in a known header
CHECKSUM_BYTES = 8  # the xxh3-64 of the tensors' bytes, after them


# A place at most this big is copied by a memoryview's slice assignment: the same memcpy with a
# third of numpy's cost a call (vLLM's CPU layout, 8 rows of 16 KiB a block for the tiny model:
# 2.9 against 7.1 µs a block), but holding the GIL, which numpy lets go of for a bigger copy.
SMALL_COPY_BYTES = 1 << 16


def checksum(parts: Any) -> bytes:
    """The xxh3-64 (big-endian) of ``parts`` (buffers) in order: a value's trailer."""
    digest = xxhash.xxh3_64()
    for part in parts:
        digest.update(part)
    return digest.digest()


def encode_block(tensors: dict[str, np.ndarray], address: BlockAddress) -> bytes:
    """The block's value: a safetensors file of ``tensors`` (its metadata naming the format and
    ``address``), then the checksum of its data. The header is written here and the tensors'
    bytes joined after it, each copied once; safetensors' own writer only for a dtype numpy
    cannot name to it (a value of either reads the same: ``safetensors.numpy.load`` and
    ``decode_block`` take both)."""
    layout = _layout(tensors)
    if layout is None:
        body = save(tensors, metadata={"format": FORMAT, "compat": address.compat_digest, "key": address.key})
        data = memoryview(body)[header_length(body) or 0 :]
        return bytes(body) + xxhash.xxh3_64_digest(data)
    names, entries = layout
    before, after = _header_template(entries, address.compat_digest)
    header = before + json.dumps(address.key).encode() + after
    header += b" " * (-len(header) % 8)  # the data starts 8-aligned, as safetensors writes it
    parts: list[Any] = [struct.pack("<Q", len(header)), header]
    digest = xxhash.xxh3_64()
    for name in names:
        flat = np.ascontiguousarray(tensors[name]).reshape(-1).view(np.uint8).data
        digest.update(flat)
        parts.append(flat)
    parts.append(digest.digest())
    return b"".join(parts)


_NAMES = {np.dtype(dtype): name for name, dtype in _DTYPES.items()}  # numpy dtype -> safetensors
_KEY_MARK = "\0key\0"  # where a block's key goes in a header template


def _layout(
    tensors: dict[str, np.ndarray],
) -> tuple[list[str], tuple[tuple[str, str, tuple[int, ...]], ...]] | None:
    """The tensors' names in data order (the widest dtype first, so that each stays aligned,
    then by name) and each one's (name, safetensors dtype, shape); None when a dtype has no
    safetensors name here (or is not in native byte order)."""
    described = []
    for name, array in tensors.items():
        dtype_name = _NAMES.get(array.dtype) if array.dtype.isnative else None
        if dtype_name is None:
            return None
        described.append((-array.dtype.itemsize, name, dtype_name, tuple(int(size) for size in array.shape)))
    described.sort()
    return [name for _, name, _, _ in described], tuple((n, d, shape) for _, n, d, shape in described)


@functools.lru_cache(maxsize=64)
def _header_template(
    entries: tuple[tuple[str, str, tuple[int, ...]], ...], compat: str
) -> tuple[bytes, bytes]:
    """The safetensors header JSON of blocks of ``entries`` under ``compat``, split where the
    block's key goes (a JSON string)."""
    header: dict[str, Any] = {"__metadata__": {"format": FORMAT, "compat": compat, "key": _KEY_MARK}}
    position = 0
    for name, dtype, shape in entries:
        end = position + math.prod(shape) * _ITEMSIZES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [position, end]}
        position = end
    text = json.dumps(header, separators=(",", ":"))
    before, _, after = text.partition(json.dumps(_KEY_MARK))
    return before.encode(), after.encode()


def _named_header(value: bytes | memoryview, address: BlockAddress) -> tuple[dict[str, Any], int] | None:
    """The safetensors header at the start of ``value`` and where its data starts, or None
    unless its metadata names ``address`` (compat digest and key)."""
    parsed = _header(value)
    if parsed is None:
        return None
    header, _ = parsed
    metadata = header.get("__metadata__")
    if (
        not isinstance(metadata, dict)
        or metadata.get("compat") != address.compat_digest
        or metadata.get("key") != address.key
    ):
        return None
    return parsed


def decode_block(value: bytes, address: BlockAddress) -> dict[str, np.ndarray] | None:
    try:
        if len(value) < 8 + CHECKSUM_BYTES:
            return None
        body = memoryview(value)[:-CHECKSUM_BYTES]
        parsed = _named_header(body, address)
        if parsed is None:
            return None
        header, data_start = parsed
        if xxhash.xxh3_64_digest(body[data_start:]) != value[-CHECKSUM_BYTES:]:
            return None  # the tensors' bytes changed since the block was encoded
        views = _views(body, header, data_start)
        return views if views is not None else dict(load(bytes(body)))
    except (SafetensorError, ValueError, TypeError, KeyError, OSError):
        return None


def _header(value: bytes | memoryview) -> tuple[dict[str, Any], int] | None:
    if len(value) < 8:
        return None
    (header_len,) = struct.unpack("<Q", value[:8])
    if header_len > len(value) - 8:
        return None
    header = json.loads(bytes(value[8 : 8 + header_len]))
    return (header, 8 + header_len) if isinstance(header, dict) else None


def _views(
    value: bytes | memoryview, header: dict[str, Any], data_start: int
) -> dict[str, np.ndarray] | None:
    """Every tensor as a view of ``value``; None when a dtype needs safetensors. Raises
    ValueError when the offsets do not tile the data exactly (a damaged block)."""
    entries = sorted(
        ((name, entry) for name, entry in header.items() if name != "__metadata__"),
        key=lambda item: item[1]["data_offsets"][0],
    )
    views: dict[str, np.ndarray] = {}
    position = 0
    for name, entry in entries:
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            return None
        begin, end = (int(offset) for offset in entry["data_offsets"])
        shape = tuple(int(size) for size in entry["shape"])
        count = math.prod(shape)
        if begin != position or end - begin != count * np.dtype(dtype).itemsize:
            raise ValueError("tensor offsets do not tile the block")
        views[name] = np.frombuffer(value, dtype=dtype, count=count, offset=data_start + begin).reshape(shape)
        position = end
    if data_start + position != len(value):
        raise ValueError("the block's data does not end where its last tensor does")
    return views


@dataclass(frozen=True)
class BlockHeader:
    """A checked block header: where the data starts and its tensors' bytes, in data order."""

    data_start: int
    tensors: tuple[tuple[str, int], ...]  # (name, bytes)
    size: int = field(init=False)  # the whole value's bytes: header, tensors, checksum; no more

    def __post_init__(self) -> None:
        data = sum(nbytes for _, nbytes in self.tensors)
        object.__setattr__(self, "size", self.data_start + data + CHECKSUM_BYTES)


def parse_header(head: bytes, address: BlockAddress) -> BlockHeader | None:
    """The header at the start of ``head`` (which holds at least ``8 + header length`` bytes,
    see ``header_length``), or None unless it names ``address`` and its tensors tile the data."""
    try:
        parsed = _named_header(head, address)
        if parsed is None:
            return None
        header, data_start = parsed
        entries = sorted(
            ((name, entry) for name, entry in header.items() if name != "__metadata__"),
            key=lambda item: int(item[1]["data_offsets"][0]),
        )
        tensors: list[tuple[str, int]] = []
        position = 0
        for name, entry in entries:
            begin, end = (int(offset) for offset in entry["data_offsets"])
            count = math.prod(int(size) for size in entry["shape"])
            if begin != position or end - begin != count * _ITEMSIZES[entry["dtype"]]:
                return None
            tensors.append((name, end - begin))
            position = end
        return BlockHeader(data_start, tuple(tensors))
    except (ValueError, TypeError, KeyError):
        return None


def header_length(head: bytes | memoryview) -> int | None:
    """Bytes of a value's start that hold its header (8 + the JSON), from its first 8 bytes."""
    if len(head) < 8:
        return None
    return 8 + int(struct.unpack("<Q", head[:8])[0])


class BlockSink:
    """Puts a restore's blocks in place: ``place(i)`` gives, per layer, the writable flat
    ``uint8`` array block ``i``'s bytes go to (``transfer.RestoreTarget.block``). A block is
    taken only when it is intact, of its address, and has exactly those layers at those sizes;
    otherwise nothing says it was (its places may hold partial bytes: the caller recomputes the
    block, overwriting them)."""

    def __init__(
        self,
        place: Callable[[int], Mapping[str, np.ndarray]],
        headers: KnownHeaders | None = None,
        whole: Callable[[int], np.ndarray | None] | None = None,
        layers: tuple[tuple[str, int], ...] = (),
    ) -> None:
        """``headers``: the headers earlier restores checked (an engine worker keeps one for all
        its restores, so that a restore parses none); None: this restore's own. ``whole``: where
        block ``i``'s layers lie back to back as ``layers`` says ((name, bytes) in that order;
        ``transfer.RestoreTarget.whole``): a block whose tensors are exactly those, in that
        order, is read, checked and copied as one buffer."""
        self._place = place
        self._whole = whole
        self._layers = layers
        self._headers = headers if headers is not None else KnownHeaders()

    @property
    def block_bytes(self) -> int:
        """Bytes of one block's tensors where the target says (``layers``), else 0: what the
        restore weighs before it spreads reads and copies over threads (``hostcopy``)."""
        return sum(nbytes for _, nbytes in self._layers)

    @property
    def takes_whole_blocks(self) -> bool:
        """True where each block lands in one run of the target (a staged restore): a sealed
        block is then decrypted straight into it in one piece (``take_sealed``)."""
        return self._whole is not None and bool(self._layers)

    def read_file(self, index: int, fd: int, address: BlockAddress) -> int:
        """Read block ``index`` from the open file ``fd``: its size, or 0 when not taken. After
        the first file, one ``preadv`` reads the header the last file had and the tensors into
        the places that header gives, and the header is checked after: the block is taken only
        if it has that same header (for this address), else it is read again the long way
        (header first, then the tensors). Safe from several threads at once for different
        blocks (``KnownHeaders`` is a cache: a lost update costs one more parse)."""
        headers = self._headers
        if headers.last is not None:
            size = self._read_as_known(index, fd, address, *headers.last)
            if size is not None:
                return size
        head = os.pread(fd, headers.head_guess, 0)
        length = header_length(head)
        if length is None or length > (1 << 20):
            return 0
        if length > len(head):
            head += os.pread(fd, length - len(head), len(head))
            if len(head) != length:
                return 0
        head = head[:length]
        headers.head_guess = length
        header = self._header(head, address)
        places = self._places(index, header)
        if header is None or places is None:
            return 0
        headers.last = (address.compat_digest, header)
        wanted = header.size - header.data_start
        stored, tail = bytearray(CHECKSUM_BYTES), bytearray(1)  # its checksum; a byte past the end
        buffers: list[Any] = [*places, stored, tail]
        read = os.preadv(fd, buffers, header.data_start)
        return header.size if read == wanted and checksum(places) == stored else 0

    def _read_as_known(
        self, index: int, fd: int, address: BlockAddress, compat: str, known: BlockHeader
    ) -> int | None:
        """The block's size read in one ``preadv`` as the last header parsed says; 0 when the
        file is not such a block of ``address`` and cannot be one (too long, too short with
        the header as expected), None when its header differs (read it the long way)."""
        if compat != address.compat_digest:
            return None
        places = self._places(index, known)
        if places is None:
            return None
        head = bytearray(known.data_start)
        stored, tail = bytearray(CHECKSUM_BYTES), bytearray(1)
        buffers: list[Any] = [head, *places, stored, tail]
        read = os.preadv(fd, buffers, 0)
        head_bytes = bytes(head)
        if header_length(head_bytes) != known.data_start or self._header(head_bytes, address) != known:
            return None
        return known.size if read == known.size and checksum(places) == stored else 0

    def take(
        self, index: int, value: bytes | memoryview, address: BlockAddress, *, authenticated: bool = False
    ) -> bool:
        """Copy block ``index`` from ``value`` (a block value in memory) into its places.
        ``authenticated``: ``value`` is a sealed block just opened, whose AES-GCM tag covered its
        tensors and their checksum alike, so the checksum is not computed again (as
        ``take_sealed`` does not)."""
        return _check_and_copy(self._prepare(index, value, address), verify=not authenticated)

    def take_many(
        self, blocks: Sequence[tuple[int, bytes | memoryview, BlockAddress]], *, parallel: bool = False
    ) -> list[bool]:
        """``take`` of each (index, value, address): headers checked here, in order; each
        block's checksum and copy on ``hostcopy``'s threads when ``parallel``."""
        prepared = [self._prepare(index, value, address) for index, value, address in blocks]
        return map_blocks(_check_and_copy, prepared, parallel=parallel)

    def _prepare(
        self, index: int, value: bytes | memoryview, address: BlockAddress
    ) -> tuple[list[np.ndarray], memoryview] | None:
        """Block ``index``'s places and its value's data (tensors, then checksum), or None when
        the value is not such a block of ``address``."""
        length = header_length(value)
        if length is None or length > len(value):
            return None
        header = self._header(bytes(value[:length]), address)
        places = self._places(index, header)
        if header is None or places is None or header.size != len(value):
            return None
        return places, memoryview(value)[header.data_start :]

    def take_sealed(self, index: int, opening: Opening, address: BlockAddress) -> int:
        """Decrypt block ``index`` straight into its places: the header first (checked, and
        telling the places), then each tensor into its place, then the tag. Its size, or 0
        when not taken; a block whose tag does not verify is wiped from its places (nothing
        unauthenticated stays in the cache)."""
        head = bytearray(8)
        if not opening.read_into(head):
            return 0
        length = header_length(bytes(head))
        if length is None or length > min(opening.size, 1 << 20):
            return 0
        rest = bytearray(length - 8)
        if not opening.read_into(rest):
            return 0
        header = self._header(bytes(head + rest), address)
        places = self._places(index, header)
        if header is None or places is None or header.size != opening.size:
            return 0
        stored = bytearray(CHECKSUM_BYTES)
        read = all(opening.read_into(place) for place in places) and opening.read_into(stored)
        if not read or not opening.verify():  # the tag authenticates the checksum too
            for place in places:
                place.fill(0)
            return 0
        return header.size

    def _header(self, head: bytes, address: BlockAddress) -> BlockHeader | None:
        return self._headers.check(head, address)

    def _places(self, index: int, header: BlockHeader | None) -> list[np.ndarray] | None:
        """The places of ``header``'s tensors in data order (one, the block's whole run, where
        the target has one in that order); None unless they are exactly the target's layers,
        each of its block size."""
        if header is None:
            return None
        if self._whole is not None and header.tensors == self._layers:
            run = self._whole(index)
            if run is not None:
                return [run]
        rows = self._place(index)
        if len(header.tensors) != len(rows):
            return None
        places = []
        for name, nbytes in header.tensors:
            row = rows.get(name)
            if row is None or row.nbytes != nbytes:
                return None
            places.append(row)
        return places


def _check_and_copy(prepared: tuple[list[np.ndarray], memoryview] | None, *, verify: bool = True) -> bool:
    """A prepared block's data copied into its places if its checksum holds (checked before any
    byte is copied: on a mismatch the places keep what they had; not computed unless ``verify``)."""
    if prepared is None:
        return False
    places, data = prepared
    if verify and xxhash.xxh3_64_digest(data[:-CHECKSUM_BYTES]) != data[-CHECKSUM_BYTES:]:
        return False
    raw = data if data.format == "B" else data.cast("B")
    offset = 0
    for place in places:  # the tensors in data order, or the block's whole run
        nbytes = place.nbytes
        if nbytes <= SMALL_COPY_BYTES:
            place.data[:] = raw[offset : offset + nbytes]
        else:  # numpy lets go of the GIL for it: other threads' copies run meanwhile
            place[:] = np.frombuffer(data, dtype=np.uint8, count=nbytes, offset=offset)
        offset += nbytes
    return True


class KnownHeaders:
    """Block headers already checked, with their block key blanked, so that the next block's is
    checked by comparing bytes (``check``): the blocks of one engine share their header but for
    the key and the order of the metadata (safetensors writes it from a hash map: at most 6
    orders). Also the last file's header (``BlockSink.read_file`` reads the next file as if it
    had the same, then checks) and its length. A cache: concurrent reads of one restore
    (``BlockSink.read_file`` on several threads) may lose an update, which costs one more parse."""

    RETAINED = 16  # headers kept (6 orders per shard digest; a worker restores for one shard)

    def __init__(self) -> None:
        self.head_guess = HEAD_GUESS  # then the last header's length: one read for the header
        self.last: tuple[str, BlockHeader] | None = None  # the last file's (shard digest, header)
        self._known: list[tuple[str, bytes, BlockHeader]] = []

    def check(self, head: bytes, address: BlockAddress) -> BlockHeader | None:
        """``parse_header``, or the same answer by comparing ``head`` with a header parsed
        before (same shard digest) with this block's key in place of that one's."""
        key = address.key.encode()
        for compat, blanked, known in self._known:
            if compat == address.compat_digest and head == blanked.replace(_BLANK_KEY, key):
                return known
        header = parse_header(head, address)
        # JSON holds no raw NUL: the blank stands exactly where the key did.
        if header is not None and len(key) == len(_BLANK_KEY) and head.count(key) == 1:
            entry = (address.compat_digest, head.replace(key, _BLANK_KEY), header)
            self._known = [*self._known[-(self.RETAINED - 1) :], entry]
        return header
