"""Block values: KV tensors of one block as safetensors bytes, checked on the way back.

``decode_block`` returns None for anything that is not an intact block of the expected address
(truncated, corrupt, another block's bytes, another rank's or layout's: the header names the
address's shard digest, ``layout.shard_digest``): the caller counts a miss and recomputes.
The arrays it returns are read-only views of ``value`` (no copy: a restore copies each block
once, into the engine's cache); a header whose offsets do not tile the data exactly is a miss.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load, save

from kvstore.tier import BlockAddress

FORMAT = "zumik-kv-block/1"
# safetensors dtype names numpy reads as they are (others, e.g. BF16, go through safetensors).
_DTYPES = {
    "BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16,
    "F16": np.float16, "U32": np.uint32, "I32": np.int32, "F32": np.float32, "U64": np.uint64,
    "I64": np.int64, "F64": np.float64,
}  # fmt: skip


def encode_block(tensors: dict[str, np.ndarray], address: BlockAddress) -> bytes:
    metadata = {"format": FORMAT, "compat": address.compat_digest, "key": address.key}
    return bytes(save(tensors, metadata=metadata))


def decode_block(value: bytes, address: BlockAddress) -> dict[str, np.ndarray] | None:
    try:
        parsed = _header(value)
        if parsed is None:
            return None
        header, data_start = parsed
        metadata = header.get("__metadata__")
        if (
            not isinstance(metadata, dict)
            or metadata.get("compat") != address.compat_digest
            or metadata.get("key") != address.key
        ):
            return None
        views = _views(value, header, data_start)
        return views if views is not None else dict(load(value))
    except (SafetensorError, ValueError, TypeError, KeyError, OSError):
        return None


def _header(value: bytes) -> tuple[dict[str, Any], int] | None:
    if len(value) < 8:
        return None
    (header_len,) = struct.unpack("<Q", value[:8])
    if header_len > len(value) - 8:
        return None
    header = json.loads(value[8 : 8 + header_len])
    return (header, 8 + header_len) if isinstance(header, dict) else None


def _views(value: bytes, header: dict[str, Any], data_start: int) -> dict[str, np.ndarray] | None:
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
