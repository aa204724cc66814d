"""Block values: KV tensors of one block as safetensors bytes, checked on the way back.

``decode_block`` returns None for anything that is not an intact block of the expected address
(truncated, corrupt, another block's bytes): the caller counts a miss and recomputes.
"""

from __future__ import annotations

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load, save

from kvstore.tier import BlockAddress

FORMAT = "zumik-kv-block/1"


def encode_block(tensors: dict[str, np.ndarray], address: BlockAddress) -> bytes:
    metadata = {"format": FORMAT, "compat": address.compat_digest, "key": address.key}
    return bytes(save(tensors, metadata=metadata))


def decode_block(value: bytes, address: BlockAddress) -> dict[str, np.ndarray] | None:
    try:
        metadata = _metadata(value)
        if (
            metadata is None
            or metadata.get("compat") != address.compat_digest
            or metadata.get("key") != address.key
        ):
            return None
        return dict(load(value))
    except (SafetensorError, ValueError, OSError):
        return None


def _metadata(value: bytes) -> dict[str, str] | None:
    import json
    import struct

    if len(value) < 8:
        return None
    (header_len,) = struct.unpack("<Q", value[:8])
    if header_len > len(value) - 8:
        return None
    header = json.loads(value[8 : 8 + header_len])
    metadata = header.get("__metadata__")
    return metadata if isinstance(metadata, dict) else None
