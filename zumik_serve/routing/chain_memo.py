"""ChainMemo: the prefix key chains of recent prompts, remembered across requests (per process).

A prompt's prefix keys are a hash chain, one link per block (``scheduler.prefix_keys`` for text,
``block_hashes.engine_block_keys`` for token ids). An agent resends its whole history every turn,
so without a memo every turn re-hashes the same prefix, one Python hash call per block. The memo
keeps the chain in runs of about ``run_bytes`` of content (2 KiB: 512 tokens, as ids or text)::

    (chain, link before the run, the run's content bytes) -> (the run's keys, the link after it)

``chain`` names the hash function and block width; the first run's link is the chain's root,
which carries the tenant's cache salt, and each later link is a hash of everything before it.
A run's keys are therefore a pure function of its memo key, and the dict finds a run by
equality of that key, content bytes included (never a digest of them): a recall returns exactly
what hashing would, and never a run of another tenant's chain (its root differs). Keying by the
whole run, not a sample of it, keeps prompts that differ in a few bytes (a date at the top of a
system prompt) from displacing each other's runs.

Runs start at block 0 and every ``run_bytes // block_bytes`` blocks (at least one), so prompts
sharing a prefix share its runs; a prompt's last run may be shorter (an exact resend recalls it,
an agent's next turn re-hashes the blocks of its previous prompt's last run). A recall costs a
dict lookup per run (its bytes hashed once, in C) instead of a hash call per block; on a
prompt's first request, remembering its runs costs about one dict insert per run.

Isolation: a tenant's lookups carry its own root, so they can only find runs of its own earlier
prompts (or of a tenant sharing its salt, which shares the engine's prefix cache anyway): the
time of its decision says nothing of whether another tenant sent the same prefix. What tenants
share is the capacity: one tenant's new prompts evict others' runs, as they evict their blocks
from the engines' prefix caches (a far larger signal than these microseconds).

Bounded: at most ``max_entries`` runs and about ``max_bytes`` of memory (an estimate of the
objects an entry holds); the least recently used run goes first. Thread-safe: one lock around
each recall and each remember (the gateway calls from its event loop; a threaded Ray actor or a
second scheduler in the process may call at the same time).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence

RUN_BYTES = 2048  # content per remembered run: at 8k tokens, 16 lookups instead of 256-512 hashes
MAX_BYTES = 32 << 20
MAX_ENTRIES = 16_384
# CPython's objects of one entry beyond its content and keys' characters: the key tuple, the
# content bytes header, the value tuple, the keys tuple, the link after the run, the dict node.
ENTRY_OVERHEAD_BYTES = 400
KEY_OVERHEAD_BYTES = 57  # a short ASCII str's header and its slot in the keys tuple

RunKey = tuple[Hashable, Hashable, bytes]  # chain, the link before the run, the run's content
# The run's keys, the link the next run starts from, the entry's estimated size in bytes.
Run = tuple[tuple[str, ...], Hashable, int]


class ChainMemo:
    """The runs of recent prompts' key chains, least recently used evicted first.

    ``recall`` extends a prompt's keys with its remembered runs from the root; the caller hashes
    the rest from the returned link, then ``remember``s the new runs. ``hits`` and ``misses``
    count runs looked up (a recall stops at its first miss)."""

    def __init__(
        self,
        *,
        max_bytes: int = MAX_BYTES,
        max_entries: int = MAX_ENTRIES,
        run_bytes: int = RUN_BYTES,
    ) -> None:
        if max_bytes < 1 or max_entries < 1 or run_bytes < 1:
            raise ValueError("max_bytes, max_entries and run_bytes must be >= 1")
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.run_bytes = run_bytes
        self.size_bytes = 0
        self.hits = 0
        self.misses = 0
        self._runs: OrderedDict[RunKey, Run] = OrderedDict()
        self._lock = threading.Lock()

    def blocks_per_run(self, block_bytes: int) -> int:
        """Blocks of ``block_bytes`` in one run (fixed per chain: its width is part of it)."""
        return max(1, self.run_bytes // block_bytes)

    def __len__(self) -> int:
        return len(self._runs)

    def recall(
        self,
        chain: Hashable,
        root: Hashable,
        content: bytes,
        block_bytes: int,
        num_blocks: int,
        keys: list[str],
    ) -> tuple[int, Hashable]:
        """Append to ``keys`` the remembered keys of the first blocks of ``content`` (blocks of
        ``block_bytes`` bytes, ``num_blocks`` of them) chained from ``root``. Returns how many
        blocks that was (0, a whole number of runs, or ``num_blocks``) and the link to hash on
        from (``root`` when none)."""
        step = self.blocks_per_run(block_bytes)
        runs = self._runs
        link = root
        done = 0
        with self._lock:
            while done < num_blocks:
                count = step if num_blocks - done >= step else num_blocks - done  # not min(): a call
                key = (chain, link, content[done * block_bytes : (done + count) * block_bytes])
                found = runs.get(key)
                if found is None:
                    self.misses += 1
                    break
                runs.move_to_end(key)
                keys.extend(found[0])
                link = found[1]
                done += count
                self.hits += 1
        return done, link

    def remember(
        self,
        chain: Hashable,
        link: Hashable,
        content: bytes,
        block_bytes: int,
        first_block: int,
        keys: Sequence[str],
        links: Sequence[Hashable],
    ) -> None:
        """Remember the runs of ``content`` from block ``first_block`` (where ``recall`` stopped),
        chained from ``link``: ``keys`` are the whole prompt's keys, ``links[i]`` the link after
        block ``first_block + i``."""
        step = self.blocks_per_run(block_bytes)
        count = len(keys)
        if first_block % step and first_block != count:
            raise ValueError("runs start at block 0 and every blocks_per_run blocks")
        if first_block >= count:
            return
        new_keys = tuple(keys[first_block:])  # a slice of it is each run's keys: one copy a run
        key_bytes = KEY_OVERHEAD_BYTES + len(new_keys[0])
        entries: list[tuple[RunKey, Run]] = []
        for first in range(first_block, count, step):
            last = first + step if first + step < count else count  # not min(): a call
            run_content = content[first * block_bytes : last * block_bytes]
            after = links[last - 1 - first_block]
            # The entry's estimated bytes: a function of its content's and keys' lengths only.
            size = ENTRY_OVERHEAD_BYTES + len(run_content) + (last - first) * key_bytes
            run_keys = new_keys[first - first_block : last - first_block]
            entries.append(((chain, link, run_content), (run_keys, after, size)))
            link = after
        runs = self._runs
        with self._lock:
            for key, run in entries:
                before = len(runs)
                runs[key] = run
                if len(runs) > before:
                    self.size_bytes += run[2]
                else:  # remembered already (a pure function of its key: the same run, same size)
                    runs.move_to_end(key)
            while runs and (self.size_bytes > self.max_bytes or len(runs) > self.max_entries):
                self.size_bytes -= runs.popitem(last=False)[1][2]

    def clear(self) -> None:
        with self._lock:
            self._runs.clear()
            self.size_bytes = 0


PREFIX_CHAINS = ChainMemo()  # the process's memo: every scheduler's text and token-id chains
