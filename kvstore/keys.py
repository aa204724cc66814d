"""Block keys: chained hashes of token ids, seeded by the compat key and the scope's cache salt.

    seed   = sha256(compat_key.digest() | cache_salt)
             then sha256(seed | adapter identity)            a LoRA request only
    key[0] = H(seed   | token_ids[0:B]   [| extra[0]])
    key[i] = H(key[i-1] | token_ids[i*B:(i+1)*B] [| extra[i]])   only full blocks of B tokens

Each key names a block *and everything before it*, so equal keys mean equal prefixes. The seed
never involves vLLM's per-process hash seed, so independent processes and machines agree; it
does involve the compat key (no reuse across incompatible engines), the tenant's cache salt
(no reuse across tenants) and, for an adapter request, the adapter (its KV differs everywhere).
``extra[i]`` carries what else block ``i``'s KV depends on besides its tokens: the hashes of the
multimodal inputs whose placeholders it covers, or of its prompt embeddings. A plain text
request has no extras and no adapter, so a gateway computes its keys from tokens alone.

The key does not name the engine's rank or KV layout: those go into the address's digest
(``layout.shard_digest``), one per rank.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, NewType

if TYPE_CHECKING:
    from kvstore.compat import CompatKey

BlockKey = NewType("BlockKey", str)  # 32 hex chars (128 bits)
ScopeId = NewType("ScopeId", str)  # 16 hex chars naming one isolation scope (a cache salt)
SHARED_SCOPE = ScopeId("shared")  # requests without a cache salt


def scope_id(cache_salt: str | None) -> ScopeId:
    """The name of a cache salt's isolation scope in tier layouts and the keyring.

    Tiers file blocks under it so that a purge can remove a whole scope at once; it is a digest
    of the salt, so it reveals nothing that would let anyone compute block keys.
    """
    if not cache_salt:
        return SHARED_SCOPE
    return ScopeId(hashlib.sha256(f"zumik-scope|{cache_salt}".encode()).hexdigest()[:16])


def scope_seed(compat: CompatKey, cache_salt: str | None) -> bytes:
    return seed_from_digest(compat.digest(), cache_salt)


def seed_from_digest(compat_digest: str, cache_salt: str | None) -> bytes:
    """The scope seed from a compat key's digest (what engines and gateways are configured with)."""
    return hashlib.sha256(f"{compat_digest}|{cache_salt or ''}".encode()).digest()


def adapter_seed(seed: bytes, adapter_name: str, adapter_fingerprint: str) -> bytes:
    """The seed of a request that runs with a LoRA adapter: every block key differs from the
    base model's and from any other adapter's (or the same name with other weights)."""
    return hashlib.sha256(seed + f"|adapter|{adapter_name}|{adapter_fingerprint}".encode()).digest()


def chain_block_keys(
    token_ids: Sequence[int],
    block_size: int,
    seed: bytes,
    extras: Mapping[int, bytes] | None = None,
) -> list[BlockKey]:
    """Keys of every full block of ``token_ids``, in order; ``extras[i]`` (a digest) is mixed
    into block ``i``'s key when present (see the module docstring)."""
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    packed = array("I", token_ids).tobytes()
    width = block_size * 4
    parent = seed
    keys: list[BlockKey] = []
    for index, start in enumerate(range(0, len(packed) - width + 1, width)):
        block = packed[start : start + width]
        extra = extras.get(index) if extras else None
        if extra:  # after a fixed-width token run: cannot be confused with other tokens
            block += b"|extra|" + extra
        parent = hashlib.blake2b(parent + block, digest_size=16).digest()
        keys.append(BlockKey(parent.hex()))
    return keys
