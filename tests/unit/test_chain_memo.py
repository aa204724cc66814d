"""Prefix key chains remembered across requests (routing/chain_memo.py).

Invariants held here:
- with the memo, a prompt's keys are byte-equal to those hashed without it, for text and token
  ids: first requests, exact resends, agents' next turns, sessions branching from one prefix,
  other salts, partial last blocks and runs, ``max_blocks`` cuts, several block sizes, ids of
  every CBOR width and ids no engine accepts, a memo small enough to evict;
- so a scheduler's decision records are byte-equal with and without the memo;
- a tenant never recalls a run of another tenant's chain: another salt on the same prompt hashes
  every block (no hit counted);
- prompts that differ only in their first bytes do not displace each other's runs;
- an agent's next turn recalls its previous prompt's whole runs and hashes only the rest;
- the memo stays within ``max_entries`` and ``max_bytes`` (its estimate within a factor of the
  memory Python really holds for it), evicting the least recently used run first;
- threads sharing one memo get the keys hashing gives.
"""

from __future__ import annotations

import gc
import random
import threading
import tracemalloc
from collections.abc import Sequence

import pytest

from profiles import load_builtin
from zumik_serve.routing.block_hashes import VECTOR_MIN_TOKENS, engine_block_keys
from zumik_serve.routing.chain_memo import ChainMemo
from zumik_serve.routing.decision import NO_EVIDENCE, canonical_bytes
from zumik_serve.routing.scheduler import CHARS_PER_TOKEN, ProfileScheduler, SchedulingRequest, prefix_keys

SALTS = ("tenant-a-" + "a" * 55, "tenant-b-" + "b" * 55)
MANY = 10_000


def text_keys(text: str, *, block_size: int = 16, salt: str = SALTS[0], max_blocks: int = MANY,
              memo: ChainMemo | None = None) -> list[str]:  # fmt: skip
    return prefix_keys(text, block_size=block_size, salt=salt, max_blocks=max_blocks, memo=memo)


def token_keys(tokens: list[int], *, block_size: int = 16, salt: str | None = SALTS[0],
               max_blocks: int = MANY, memo: ChainMemo | None = None) -> list[str]:  # fmt: skip
    return engine_block_keys(tokens, block_size=block_size, cache_salt=salt, max_blocks=max_blocks, memo=memo)


def random_text(rng: random.Random, chars: int) -> str:
    return "".join(rng.choice("abcdefghij é→") for _ in range(chars))  # multi-byte UTF-8 too


def ascii_text(rng: random.Random, chars: int) -> str:
    return "".join(rng.choice("abcdefghij ") for _ in range(chars))  # one byte a character


def random_tokens(rng: random.Random, count: int) -> list[int]:
    edges = (0, 23, 24, 255, 256, 65_535, 65_536, 151_000, 2**32 - 1)  # every CBOR width
    return [rng.choice(edges) if rng.random() < 0.1 else rng.randrange(10, 30_000) for _ in range(count)]


def agent_traffic(rng: random.Random, grow: int, make: object) -> list[tuple[object, str | None]]:
    """Prompts as a gateway sees them: sessions branching from one shared head, each turn its
    previous prompt plus a suffix, resends, first requests, and another tenant's copies."""
    assert callable(make)
    head = make(rng, grow * 5)
    sessions = [head + make(rng, rng.randrange(0, grow * 2)) for _ in range(4)]
    prompts: list[tuple[object, str | None]] = []
    for turn in range(40):
        index = turn % len(sessions)
        sessions[index] = sessions[index] + make(rng, rng.randrange(1, grow * 2))
        prompts.append((sessions[index], SALTS[0]))
        if turn % 5 == 0:
            prompts.append((sessions[index], SALTS[0]))  # an exact resend
            prompts.append((sessions[index], SALTS[1]))  # the same bytes under another tenant's salt
        if turn % 7 == 0:
            prompts.append((make(rng, rng.randrange(0, grow * 8)), SALTS[0]))  # a first request
    return prompts


@pytest.mark.parametrize("run_bytes", [1, 200, 2048])
@pytest.mark.parametrize("block_size", [1, 16, 32])
def test_text_keys_with_the_memo_equal_hashing_them(run_bytes: int, block_size: int) -> None:
    rng = random.Random(block_size * 10_000 + run_bytes)
    memo = ChainMemo(run_bytes=run_bytes)
    grow = block_size * CHARS_PER_TOKEN
    for prompt, salt in agent_traffic(rng, grow, random_text):
        assert isinstance(prompt, str) and salt is not None
        for max_blocks in (MANY, 7):  # a context cut, too
            expected = text_keys(prompt, block_size=block_size, salt=salt, max_blocks=max_blocks)
            got = text_keys(prompt, block_size=block_size, salt=salt, max_blocks=max_blocks, memo=memo)
            assert got == expected
    assert memo.hits > 0 and memo.misses > 0


@pytest.mark.parametrize("run_bytes", [1, 200, 2048])
@pytest.mark.parametrize("block_size", [1, 16, 32])
def test_token_keys_with_the_memo_equal_hashing_them(run_bytes: int, block_size: int) -> None:
    rng = random.Random(block_size * 10_000 + run_bytes)
    memo = ChainMemo(run_bytes=run_bytes)
    traffic = agent_traffic(rng, block_size, random_tokens)
    traffic += [(prompt, None) for prompt, salt in traffic[:6]] + [
        (prompt, "") for prompt, salt in traffic[:6]
    ]
    for prompt, salt in traffic:
        assert isinstance(prompt, list)
        for max_blocks in (MANY, 7):
            expected = token_keys(prompt, block_size=block_size, salt=salt, max_blocks=max_blocks)
            got = token_keys(prompt, block_size=block_size, salt=salt, max_blocks=max_blocks, memo=memo)
            assert got == expected
    assert memo.hits > 0 and memo.misses > 0


def test_a_long_token_prompt_and_its_long_tail_equal_hashing_them() -> None:
    """Past ``VECTOR_MIN_TOKENS`` the tail after the recalled runs is encoded at once (numpy)."""
    rng = random.Random(3)
    memo = ChainMemo()
    first = random_tokens(rng, VECTOR_MIN_TOKENS * 2 + 5)
    turn = first + random_tokens(rng, VECTOR_MIN_TOKENS + 40)
    for prompt in (first, turn, turn, first[:-300]):
        assert token_keys(prompt, memo=memo) == token_keys(prompt)


def test_ids_no_engine_accepts_are_hashed_not_remembered() -> None:
    memo = ChainMemo(run_bytes=64)
    tokens = [100 + i for i in range(16 * 4)]
    odd = [*tokens[:20], -1, *tokens[21:40], 2**32, *tokens[41:], 2**70]
    for prompt in (odd, odd, tokens, odd):
        assert token_keys(prompt, memo=memo) == token_keys(prompt)
    assert len(memo) == 4  # only the prompt of 32-bit ids was remembered (4 runs of one block)


def test_a_memo_that_evicts_still_gives_the_same_keys() -> None:
    rng = random.Random(11)
    memo = ChainMemo(max_entries=5, run_bytes=128)
    for prompt, salt in agent_traffic(rng, 64, random_text):
        assert isinstance(prompt, str) and salt is not None
        assert text_keys(prompt, salt=salt, memo=memo) == text_keys(prompt, salt=salt)
        assert len(memo) <= 5


def test_decisions_with_the_memo_are_byte_equal_to_decisions_without_it() -> None:
    profile = load_builtin("local-cpu-2x")
    block_chars = profile.engine.block_size * CHARS_PER_TOKEN
    replicas: dict[str, Sequence[str]] = {"local": ["r0", "r1", "r2"]}
    with_memo = ProfileScheduler(profile, replicas=replicas, chains=ChainMemo(run_bytes=256))
    without = ProfileScheduler(profile, replicas=replicas, chains=None)
    rng = random.Random(5)
    traffic = agent_traffic(rng, block_chars, random_text)
    traffic += agent_traffic(rng, profile.engine.block_size, random_tokens)
    for index, (prompt, salt) in enumerate(traffic):
        assert salt is not None
        request = SchedulingRequest(
            tenant="ten_" + salt[:8], cache_salt=salt, prompt_text=prompt if isinstance(prompt, str) else "",
            expected_output_tokens=8, request_digest=f"{index:032x}", release_id=None, snapshot_id=None,
            allowed_routes=None, evidence=NO_EVIDENCE,
            prompt_token_ids=prompt if isinstance(prompt, list) else None,
        )  # fmt: skip
        records = []
        for scheduler in (with_memo, without):
            record, keys = scheduler.decide(f"dec_{index}", request, now_ms=index, seed=index)
            if record.pick is not None:
                scheduler.sent(record.pick, keys)
            records.append((canonical_bytes(record), keys))
        assert records[0] == records[1]
    assert with_memo.chains is not None and with_memo.chains.hits > 0


def test_another_salt_on_the_same_prompt_recalls_nothing() -> None:
    memo = ChainMemo(run_bytes=128)
    text = ascii_text(random.Random(1), 16 * CHARS_PER_TOKEN * 9)
    tokens = random_tokens(random.Random(2), 16 * 9)
    text_keys(text, salt=SALTS[0], memo=memo)
    token_keys(tokens, salt=SALTS[0], memo=memo)
    for salt in (SALTS[1], ""):
        hits = memo.hits
        assert text_keys(text, salt=salt, memo=memo) == text_keys(text, salt=salt)
        assert token_keys(tokens, salt=salt, memo=memo) == token_keys(tokens, salt=salt)
        assert memo.hits == hits  # B's lookups never found A's runs: B hashed every block
    hits = memo.hits
    assert token_keys(tokens, salt=None, memo=memo) == token_keys(tokens, salt=None)
    assert memo.hits == hits + 5  # no salt and an empty one are one chain in vLLM: the same runs
    text_keys(text, salt=SALTS[0], memo=memo)
    assert memo.hits == hits + 10  # A's own resend: all 5 runs (4 of 2 blocks, 1 of 1)


def test_prompts_differing_only_in_their_first_bytes_keep_each_others_runs() -> None:
    """A date at the top of a long system prompt: each variant's runs are its own (keyed by all
    of their bytes), so many first requests do not displace an agent's previous prompt."""
    memo = ChainMemo(run_bytes=128)
    rng = random.Random(12)
    width = 16 * CHARS_PER_TOKEN
    previous = ascii_text(rng, width * 8)  # 4 runs
    text_keys(previous, memo=memo)
    for day in range(20):
        variant = f"{day:02d}" + previous[2:]
        assert text_keys(variant, memo=memo) == text_keys(variant)
    hits = memo.hits
    turn = previous + ascii_text(rng, width * 3)
    assert text_keys(turn, memo=memo) == text_keys(turn)
    assert memo.hits == hits + 4


def test_an_agents_next_turn_recalls_its_previous_prompt_and_hashes_the_rest() -> None:
    memo = ChainMemo(run_bytes=256)
    width = 16 * CHARS_PER_TOKEN
    rng = random.Random(8)
    previous = ascii_text(rng, width * 10 + 7)  # 10 blocks
    text_keys(previous, memo=memo)  # runs of 4, 4 and a last one of 2 blocks
    hits, misses = memo.hits, memo.misses
    turn = previous + ascii_text(rng, width * 5)
    assert text_keys(turn, memo=memo) == text_keys(turn)
    assert (memo.hits, memo.misses) == (hits + 2, misses + 1)  # two whole runs; then hashed


def test_the_memo_stays_within_its_bounds_evicting_the_least_recently_used() -> None:
    memo = ChainMemo(max_bytes=60_000, run_bytes=128)
    rng = random.Random(4)
    width = 16 * CHARS_PER_TOKEN
    kept = ascii_text(rng, width * 4)
    for _ in range(60):
        text_keys(kept, memo=memo)  # used between every other prompt: the most recent
        text_keys(ascii_text(rng, width * 8), memo=memo)
        assert memo.size_bytes <= 60_000
    hits = memo.hits
    text_keys(kept, memo=memo)
    assert memo.hits == hits + 2
    counted = ChainMemo(max_entries=3, run_bytes=64)
    text_keys(ascii_text(rng, width * 10), memo=counted)
    assert len(counted) == 3


def test_the_size_estimate_is_close_to_the_memory_held() -> None:
    """``size_bytes`` is an estimate of what the entries hold: within 0.6x to 1.5x of what
    tracemalloc sees the memo keep (keys and content that only the memo references)."""
    rng = random.Random(6)
    prompts = [ascii_text(rng, 32 * CHARS_PER_TOKEN * 64) for _ in range(40)]
    tokens = [random_tokens(rng, 32 * 64) for _ in range(40)]
    memo = ChainMemo()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for text, ids in zip(prompts, tokens, strict=True):
            text_keys(text, block_size=32, memo=memo)
            token_keys(ids, block_size=32, memo=memo)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(memo) == 80 * 4
    assert 0.6 * held <= memo.size_bytes <= 1.5 * held, (memo.size_bytes, held)


def test_threads_sharing_a_memo_get_the_keys_hashing_gives() -> None:
    memo = ChainMemo(max_entries=64, run_bytes=128)
    rng = random.Random(9)
    head = random_text(rng, 64 * 20)
    prompts = [head + random_text(rng, 64 * rng.randrange(1, 30)) for _ in range(12)]
    expected = [text_keys(prompt) for prompt in prompts]
    failures: list[int] = []

    def work(offset: int) -> None:
        for step in range(150):
            index = (offset + step) % len(prompts)
            if text_keys(prompts[index], memo=memo) != expected[index]:
                failures.append(index)

    threads = [threading.Thread(target=work, args=(offset,)) for offset in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == [] and memo.hits > 0 and len(memo) <= 64


def test_runs_are_remembered_from_a_run_boundary() -> None:
    memo = ChainMemo(run_bytes=16)
    assert memo.blocks_per_run(4) == 4 and memo.blocks_per_run(64) == 1
    with pytest.raises(ValueError, match="blocks_per_run"):
        memo.remember(("c", 4), b"", b"x" * 40, 4, 3, ["k"] * 10, [b"l"] * 7)
    with pytest.raises(ValueError, match=">= 1"):
        ChainMemo(max_entries=0)


@pytest.mark.parametrize("kind", ["text", "token ids"])
def test_the_bench_timers_time_first_requests_cold_and_next_turns_warm(kind: str) -> None:
    """``zumik bench routing``'s decision timers measure what they are labelled: every first
    request misses at its first run (nothing recalled), every next turn recalls its previous
    prompt's whole runs and misses once, at the run its new tokens change."""
    from zumik_serve.bench.routing import arm_profile
    from zumik_serve.bench.routing_cluster import (
        AGENT_TURN_TOKENS,
        time_decisions,
        timer_requests,
        with_context,
    )

    length, samples = 2048, 6
    profile = with_context(arm_profile("zumik"), length)
    memo = ChainMemo()
    scheduler = ProfileScheduler(profile, replicas={"local": ["r0", "r1"]}, chains=memo)
    rng = random.Random(2)
    prompt: str | list[int] = (
        ascii_text(rng, length * CHARS_PER_TOKEN)
        if kind == "text"
        else [rng.randrange(10, 30_000) for _ in range(length)]
    )
    times = time_decisions(scheduler, *timer_requests(prompt), samples=samples)
    assert set(times) == {"p50", "p99", "rest_p50", "turn_p50", "turn_p99", "turn_rest_p50"}
    block_bytes = profile.engine.block_size * CHARS_PER_TOKEN  # 4 bytes a token, as text or ids
    whole_runs = (length - AGENT_TURN_TOKENS) // profile.engine.block_size // memo.blocks_per_run(block_bytes)
    assert whole_runs >= 2
    assert memo.hits == samples * whole_runs  # only the turns recalled anything
    assert memo.misses == 1 + 2 * samples  # the previous prompt, each first request, each turn
