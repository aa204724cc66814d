"""The gateway's engine block hashes (routing/block_hashes.py) equal vLLM's own, byte for byte.

Invariants held here:
- for a token-id prompt, with and without a cache salt, every full block's hash equals what
  vLLM's request block hasher computes with ``sha256_cbor`` (the partial last block has none),
  token ids of every CBOR width included, for a short prompt (encoded block by block) and a
  long one (encoded at once, ``VECTOR_MIN_TOKENS``), and for ids no vocabulary has (below 0,
  past 32 and 64 bits: hashed as the engine's ``cbor2`` would, never an error);
- ``max_blocks`` cuts the chain: the hashes are the first ones of the whole prompt's;
- the residency key of a block is the 64-bit int a KV event carries for it;
- a different salt changes every block's hash (the salt is in the first, the chain carries it);
- keys recalled from the chain memo (an agent's next turn on its previous prompt) are still
  what vLLM's own hashes name.
"""

from __future__ import annotations

import random

import pytest
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import sha256_cbor
from vllm.v1.core import kv_cache_utils
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash, maybe_convert_block_hash
from vllm.v1.request import Request

from zumik_serve.routing.block_hashes import (
    VECTOR_MIN_TOKENS,
    engine_block_hashes,
    engine_block_keys,
    event_key,
)
from zumik_serve.routing.chain_memo import ChainMemo

BLOCK = 16


def vllm_hashes(tokens: list[int], salt: str | None) -> list[bytes]:
    init_none_hash(sha256_cbor)
    request = Request(
        request_id="r", prompt_token_ids=tokens, sampling_params=SamplingParams(max_tokens=1),
        pooling_params=None, cache_salt=salt, block_hasher=get_request_block_hasher(BLOCK, sha256_cbor),
    )  # fmt: skip
    return [bytes(block_hash) for block_hash in request.block_hashes]


@pytest.mark.parametrize("salt", [None, "tenant-salt-" + "a" * 52])
def test_block_hashes_equal_vllms_own(salt: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    edges = [0, 23, 24, 255, 256, 65_535, 65_536, 151_000]  # each CBOR width, and past the table
    rng = random.Random(5)
    tokens = [
        rng.choice(edges) if rng.random() < 0.2 else rng.randrange(10, 30_000) for _ in range(BLOCK * 7 + 5)
    ]
    ours = engine_block_hashes(tokens, block_size=BLOCK, cache_salt=salt, max_blocks=100)
    assert len(ours) == 7 and ours == vllm_hashes(tokens, salt)
    assert kv_cache_utils.NONE_HASH is not None
    keys = engine_block_keys(tokens, block_size=BLOCK, cache_salt=salt, max_blocks=3)
    assert keys == [event_key(maybe_convert_block_hash(h)) for h in ours[:3]]  # what an event says


def test_a_salt_changes_every_block() -> None:
    tokens = list(range(10, 10 + BLOCK * 4))
    plain = engine_block_hashes(tokens, block_size=BLOCK, cache_salt=None, max_blocks=10)
    salted = engine_block_hashes(tokens, block_size=BLOCK, cache_salt="s", max_blocks=10)
    assert not set(plain) & set(salted)


@pytest.mark.parametrize("salt", [None, "tenant-salt-" + "b" * 52])
def test_a_long_prompt_encoded_at_once_hashes_as_vllm(
    salt: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    edges = [0, 1, 23, 24, 255, 256, 65_535, 65_536, 151_000, 2**32 - 1]  # every width, both ends
    rng = random.Random(9)
    length = VECTOR_MIN_TOKENS + BLOCK * 3 + 7
    tokens = [rng.choice(edges) if rng.random() < 0.3 else rng.randrange(0, 200_000) for _ in range(length)]
    ours = engine_block_hashes(tokens, block_size=BLOCK, cache_salt=salt, max_blocks=1000)
    assert len(ours) == length // BLOCK and ours == vllm_hashes(tokens, salt)
    cut = engine_block_hashes(tokens, block_size=BLOCK, cache_salt=salt, max_blocks=5)
    assert cut == ours[:5]
    keys = engine_block_keys(tokens, block_size=BLOCK, cache_salt=salt, max_blocks=1000)
    assert keys == [event_key(maybe_convert_block_hash(h)) for h in ours]
    assert keys == [event_key(int.from_bytes(h, "big")) for h in ours]  # an event's int names it


@pytest.mark.parametrize("length", [BLOCK * 3, VECTOR_MIN_TOKENS + BLOCK])
def test_ids_no_vocabulary_has_hash_as_the_engines_cbor(length: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    odd = [-1, -24, -25, -(2**64), -(2**64) - 1, 2**32, 2**64 - 1, 2**64, 2**80]
    tokens = [odd[i % len(odd)] if i % 5 == 0 else 100 + i for i in range(length)]
    ours = engine_block_hashes(tokens, block_size=BLOCK, cache_salt="s", max_blocks=1000)
    assert len(ours) == length // BLOCK and ours == vllm_hashes(tokens, "s")


def test_a_prompt_shorter_than_a_block_has_no_hash() -> None:
    assert engine_block_hashes([1, 2, 3], block_size=BLOCK, cache_salt=None, max_blocks=10) == []
    assert engine_block_keys(list(range(BLOCK * 2)), block_size=BLOCK, cache_salt=None, max_blocks=0) == []


@pytest.mark.parametrize("salt", [None, "tenant-salt-" + "c" * 52])
def test_keys_recalled_from_the_memo_name_vllms_own_hashes(
    salt: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    rng = random.Random(13)
    previous = [rng.randrange(0, 200_000) for _ in range(BLOCK * 40 + 3)]
    turn = previous + [rng.randrange(0, 200_000) for _ in range(VECTOR_MIN_TOKENS + 9)]
    memo = ChainMemo(run_bytes=8 * BLOCK * 4)  # runs of 8 blocks
    engine_block_keys(previous, block_size=BLOCK, cache_salt=salt, max_blocks=1000, memo=memo)
    keys = engine_block_keys(turn, block_size=BLOCK, cache_salt=salt, max_blocks=1000, memo=memo)
    assert memo.hits == 5  # the previous prompt's five whole runs of 8 blocks
    assert keys == [event_key(maybe_convert_block_hash(h)) for h in vllm_hashes(turn, salt)]
