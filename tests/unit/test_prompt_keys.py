"""A prompt's prefix keys computed as far as they are read (routing/prompt_keys.py).

Invariants held here:
- however far the residency walk reads them first, and with or without the chain memo, the
  keys are those of the eager functions, byte for byte: ``engine_block_keys`` for token ids
  (ids of every CBOR width and ids no engine accepts, salts, ``max_blocks`` cuts, block sizes,
  memo run sizes) and a reference blake2b chain for text; and for token ids, vLLM's own;
- the walk hashes only the runs it reaches (a first request's decision hashes one run); once the
  memo holds the first run it reaches, every run the memo holds is recalled;
- the memo ends up holding what the eager functions leave in it: a later prompt recalls them;
- a scheduler's decision with keys read lazily is byte-equal to one with every key computed,
  replays equal, and the keys it leaves for later still reach residency when sent: a second
  request of the same prompt finds the replica holding every block.
"""

from __future__ import annotations

import hashlib
import random

import pytest

from profiles import load_builtin
from tests.unit.test_block_hashes import vllm_hashes
from zumik_serve.routing.block_hashes import engine_block_keys, event_key
from zumik_serve.routing.chain_memo import ChainMemo
from zumik_serve.routing.decision import NO_EVIDENCE, canonical_bytes
from zumik_serve.routing.replay import replay
from zumik_serve.routing.scheduler import (
    CHARS_PER_TOKEN,
    ProfileScheduler,
    SchedulingRequest,
    text_prefix_keys,
    token_prefix_keys,
)

SALT = "tenant-" + "c" * 57
EDGES = (0, 23, 24, 255, 256, 65_535, 65_536, 151_000, 2**32 - 1)  # every CBOR width


def reference_text_keys(text: str, *, width: int, salt: str, max_blocks: int) -> list[str]:
    """The text chain as ``scheduler`` documents it, written out plainly."""
    data = text.encode()
    parent = hashlib.blake2b(f"zumik-prefix|{salt}".encode(), digest_size=16).digest()
    keys = []
    for start in range(0, min(len(data) // width, max_blocks) * width, width):
        parent = hashlib.blake2b(parent + data[start : start + width], digest_size=16).digest()
        keys.append(parent.hex())
    return keys


def walk_to(count: int, keys: list[str]) -> object:
    """A residency lookup that holds the first ``count`` of ``keys``."""
    return set(keys[:count]).__contains__


@pytest.mark.parametrize("seed", range(6))
def test_token_id_keys_read_lazily_equal_the_eager_ones(seed: int) -> None:
    rng = random.Random(seed)
    block_size = rng.choice((1, 4, 16))
    memo = ChainMemo(run_bytes=rng.choice((1, 64, 256, 2048)))
    head = [rng.randrange(10, 30_000) for _ in range(rng.randrange(0, 600))]
    for _ in range(12):
        tail = [rng.choice(EDGES) if rng.random() < 0.05 else rng.randrange(10, 30_000) for _ in range(99)]
        if rng.random() < 0.1:
            tail[rng.randrange(len(tail))] = rng.choice((-1, 2**40))  # no engine accepts it
        tokens = head + tail[: rng.randrange(0, len(tail))]
        salt = rng.choice((None, SALT))
        max_blocks = rng.choice((3, 10_000))
        expected = engine_block_keys(tokens, block_size=block_size, cache_salt=salt, max_blocks=max_blocks)
        for use_memo in (False, True):
            keys = token_prefix_keys(
                tokens, block_size=block_size, cache_salt=salt, max_blocks=max_blocks,
                memo=memo if use_memo else None,
            )  # fmt: skip
            assert len(keys) == len(expected)
            stop = rng.randrange(0, len(expected) + 1)
            assert keys.matched(walk_to(stop, expected)) == stop
            assert keys.all() == expected and list(keys) == expected and keys == expected
        head = tokens if rng.random() < 0.7 else head  # an agent's next turn, or a branch


@pytest.mark.parametrize("salt", [None, SALT])
def test_token_id_keys_read_lazily_are_vllms_own(salt: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    rng = random.Random(4)
    tokens = [
        rng.choice(EDGES) if rng.random() < 0.2 else rng.randrange(10, 30_000) for _ in range(16 * 70 + 5)
    ]
    expected = [event_key(block_hash) for block_hash in vllm_hashes(tokens, salt)]
    memo = ChainMemo(run_bytes=256)  # 4 blocks a run
    # Hashed as far as the walk went (3 runs), then recalled (every run the memo holds at once).
    for computed in (12, len(expected)):
        keys = token_prefix_keys(tokens, block_size=16, cache_salt=salt, max_blocks=1_000, memo=memo)
        assert keys.matched(walk_to(9, expected)) == 9 and keys.computed == computed
        assert keys.all() == expected
    assert memo.hits > 0


@pytest.mark.parametrize("seed", range(4))
def test_text_keys_read_lazily_equal_the_reference_chain(seed: int) -> None:
    rng = random.Random(seed)
    block_size = rng.choice((1, 16))
    width = block_size * CHARS_PER_TOKEN
    memo = ChainMemo(run_bytes=rng.choice((1, 200, 2048)))
    text = ""
    for _ in range(10):
        text += "".join(rng.choice("abcdefghij é→") for _ in range(rng.randrange(0, 900)))
        max_blocks = rng.choice((2, 10_000))
        expected = reference_text_keys(text, width=width, salt=SALT, max_blocks=max_blocks)
        keys = text_prefix_keys(text, block_size=block_size, salt=SALT, max_blocks=max_blocks, memo=memo)
        stop = rng.randrange(0, len(expected) + 1)
        assert keys.matched(walk_to(stop, expected)) == stop
        assert keys.all() == expected


def test_a_walk_computes_only_the_runs_it_reaches_and_the_memo_still_learns_the_rest() -> None:
    memo = ChainMemo()  # 512 tokens a run: 32 blocks of 16
    rng = random.Random(8)
    tokens = [rng.randrange(10, 30_000) for _ in range(8192)]
    keys = token_prefix_keys(tokens, block_size=16, cache_salt=SALT, max_blocks=1_000, memo=memo)
    assert keys.matched(lambda key: False) == 0 and keys.computed == 32  # a first request: one run
    assert keys.matched(lambda key: True) == 512 and keys.computed == 512
    again = token_prefix_keys(tokens, block_size=16, cache_salt=SALT, max_blocks=1_000, memo=memo)
    hits = memo.hits
    assert again.all() == keys.all() and memo.hits == hits + 16  # every run recalled


def scheduler_request(prompt: str | list[int], index: int) -> SchedulingRequest:
    return SchedulingRequest(
        tenant="ten_a", cache_salt=SALT, prompt_text=prompt if isinstance(prompt, str) else "",
        expected_output_tokens=8, request_digest=f"{index:032x}", release_id=None, snapshot_id=None,
        allowed_routes=frozenset({"local"}), evidence=NO_EVIDENCE,
        prompt_token_ids=prompt if isinstance(prompt, list) else None,
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["text", "token ids"])
def test_keys_left_for_later_reach_residency_and_records_replay_equal(kind: str) -> None:
    profile = load_builtin("local-cpu-2x")
    block_size = profile.engine.block_size
    rng = random.Random(3)
    num_blocks = 60  # within the profile's context, two runs of the memo
    prompt: str | list[int] = (
        "".join(rng.choice("abcdefghij ") for _ in range(num_blocks * block_size * CHARS_PER_TOKEN))
        if kind == "text"
        else [rng.randrange(10, 30_000) for _ in range(num_blocks * block_size)]
    )
    lazy = ProfileScheduler(profile, replicas={"local": ["r0", "r1", "r2"]}, chains=ChainMemo())
    eager = ProfileScheduler(profile, replicas={"local": ["r0", "r1", "r2"]}, chains=None)
    for index in range(3):  # a first request, then the same prompt twice
        records = []
        for scheduler in (lazy, eager):
            record, keys = scheduler.decide(
                f"dec_{index}", scheduler_request(prompt, index), now_ms=index, seed=index
            )
            if scheduler is eager:
                keys.all()  # every key computed before the decision's walks read any
            elif index == 0:
                assert keys.computed < num_blocks  # the rest is left for later
            assert replay(record.to_json())[0]
            assert record.pick is not None and record.pick.replica is not None
            scheduler.sent(record.pick, keys)
            scheduler.finished(record.pick)
            records.append(canonical_bytes(record))
            matched = {
                candidate.replica: candidate.matched_prefix_blocks for candidate in record.inputs.candidates
            }
            assert record.inputs.num_prompt_blocks == num_blocks
            assert max(matched.values()) == (0 if index == 0 else num_blocks)  # the replica holds all
        assert records[0] == records[1]


def test_a_text_prefix_is_its_share_of_the_counted_tokens_and_a_token_prefix_exact() -> None:
    """Text chunks are 4 x block_size bytes: their tokens are the chunks' share of the prompt's
    bytes, of the tokens the engine counted (none counted: block_size a chunk); a token-id
    block is block_size tokens, whatever was counted."""
    code = text_prefix_keys("x" * 640, block_size=16, salt=SALT, max_blocks=100, memo=None)  # 10 chunks
    assert code.prefix_tokens(4, prompt_tokens=80) == 32  # 8 bytes a token: half of 4 x 16
    assert code.prefix_tokens(4, prompt_tokens=0) == 64
    assert code.prefix_tokens(10, prompt_tokens=80) == 80 and code.prefix_tokens(0, prompt_tokens=80) == 0
    cjk = text_prefix_keys("漢" * 640, block_size=16, salt=SALT, max_blocks=100, memo=None)  # 30 chunks
    assert cjk.prefix_tokens(4, prompt_tokens=640) == 640 * 256 // 1920  # 85, not 64
    ids = token_prefix_keys(list(range(160)), block_size=16, cache_salt=None, max_blocks=100, memo=None)
    assert ids.prefix_tokens(4, prompt_tokens=999) == ids.prefix_tokens(4, prompt_tokens=0) == 64
