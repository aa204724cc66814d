"""Which KV blocks Zumik believes each BYOC engine replica holds: a bounded LRU set per replica.

Two sources feed it: Zumik's own record of what it sent where (``record_sent``: the prompt's
block keys went to that replica, so its prefix cache holds them now), and the engine's KV events
(``apply_event``: blocks stored, blocks evicted). It is a belief, not a fact: an entry can be
stale until the eviction event arrives, which costs a worse pick, never a wrong answer (the
engine recomputes what it does not hold).

Eviction order mirrors the engine's: a prompt's blocks are recorded tail first, so the root of
a prefix chain is the most recently used and a full replica forgets leaf blocks before the
prefix they hang from (a root evicted first would make every later block of the chain useless
to the prefix walk).

The bound is ``capacity_blocks`` per replica; a decision records only ``snapshot(...)``, the
matched count per replica for its own block keys, never the index.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from itertools import takewhile

from zumik_serve.routing.prompt_keys import PromptKeys


class ResidencyIndex:
    """Per replica, at most ``capacity_blocks`` block keys, least recently used evicted first.
    Lookups do not count as use: only a send or a store event does."""

    def __init__(self, capacity_blocks: int) -> None:
        if capacity_blocks < 1:
            raise ValueError("capacity_blocks must be >= 1")
        self.capacity_blocks = capacity_blocks
        self._blocks: dict[str, OrderedDict[str, None]] = {}

    def replicas(self) -> list[str]:
        return sorted(self._blocks)

    def num_blocks(self, replica: str) -> int:
        blocks = self._blocks.get(replica)
        return 0 if blocks is None else len(blocks)

    def record_sent(self, replica: str, block_keys: Sequence[str]) -> None:
        """Zumik sent a prompt with these block keys (in prompt order) to ``replica``."""
        self._store(replica, reversed(block_keys))

    def apply_event(self, replica: str, *, stored: Sequence[str] = (), removed: Iterable[str] = ()) -> None:
        """A KV event from the replica: ``stored`` blocks (in prompt order) are resident now,
        ``removed`` ones are gone. Removals apply after stores, so an event that both stores and
        evicts a block leaves it evicted."""
        self._store(replica, reversed(stored))
        blocks = self._blocks.get(replica)
        if blocks is not None:
            for key in removed:
                blocks.pop(key, None)

    def keys(self, replica: str) -> tuple[str, ...]:
        """The replica's keys, least recently used first (what ``replace`` takes back)."""
        return tuple(self._blocks.get(replica, ()))

    def replace(self, entries: Iterable[tuple[str, Sequence[str]]]) -> None:
        """Forget everything, then hold ``entries``: per replica, keys least recently used first."""
        self._blocks = {}
        for replica, keys in entries:
            self._store(replica, keys)

    def forget_replica(self, replica: str) -> None:
        """The replica is gone or reset its prefix cache: it holds nothing."""
        self._blocks.pop(replica, None)

    def matched_prefix_blocks(self, replica: str, block_keys: Sequence[str]) -> int:
        """How many of ``block_keys`` the replica holds, walking from the first key and stopping
        at the first miss (a block after a gap is useless: its KV depends on the missing one).
        ``PromptKeys`` are computed only as far as the walk goes."""
        blocks = self._blocks.get(replica)
        if not blocks:
            return 0
        if isinstance(block_keys, PromptKeys):
            return block_keys.matched(blocks.__contains__)
        return len(list(takewhile(blocks.__contains__, block_keys)))  # the walk, in C

    def snapshot(self, replicas: Iterable[str], block_keys: Sequence[str]) -> dict[str, int]:
        """The matched prefix length per replica for one request: what a decision records."""
        return {replica: self.matched_prefix_blocks(replica, block_keys) for replica in replicas}

    def _store(self, replica: str, keys_most_recent_last: Iterable[str]) -> None:
        blocks = self._blocks.setdefault(replica, OrderedDict())
        for key in keys_most_recent_last:
            blocks[key] = None
            blocks.move_to_end(key)
        while len(blocks) > self.capacity_blocks:
            blocks.popitem(last=False)
