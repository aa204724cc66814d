"""PromptKeys: a prompt's prefix keys, computed only as far as they are read.

A decision needs a prompt's keys only up to the first block no candidate replica holds (the
residency walk stops there: a first request's at block 0) and the number of its blocks, which
its length gives. The rest is needed after the decision: the gateway's record of what it sent
where, the reuse accounting, the chain memo. So the chain is computed a memo run at a time
(``routing/chain_memo.py``: recalled when remembered, else hashed and remembered), as far as
the reader has asked::

    decide ─ matched(replica holds?) ─► runs 0..k   (k: the run where the longest walk stops)
    sent   ─ all()                   ─► runs k+1..  (the dispatcher: after the call is handed on)

The keys are those of the eager functions (``scheduler.prefix_keys`` for text,
``block_hashes.engine_block_keys`` for token ids), byte for byte, however far and in whatever
order they are read; the memo ends up holding the same runs. One request's keys: not
thread-safe (read in its gateway's event loop).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable, Hashable, Iterator, Sequence
from itertools import takewhile
from operator import itemgetter
from typing import Protocol, cast, overload

from zumik_serve.routing.block_hashes import HASH_ALGO, chained_hashes
from zumik_serve.routing.chain_memo import RUN_BYTES, ChainMemo

TEXT_CHAIN = "zumik-prefix/blake2b-16"  # the text chain, as the chain memo names it

# Each chunk's hash copies this empty one: the same bytes as ``blake2b(..., digest_size=16)``,
# without parsing the keyword on every call. Never updated itself, so threads may share it.
_BLAKE2B_16 = hashlib.blake2b(digest_size=16)
_LOW_64_BITS = itemgetter(slice(-8, None))  # of a block hash: what a KV event names it by


class KeyChain(Protocol):
    """How one prompt's chain is computed: its memo name and root, its content per block, and
    the hashes of a range of its blocks."""

    memo_chain: Hashable  # the hash function and block width, as the memo names the chain
    root: Hashable  # the memo's link before block 0 (it carries the salt)
    block_bytes: int  # content bytes per block

    def content(self, first: int, last: int) -> bytes | None:
        """The content of blocks ``first`` to ``last`` (exclusive), or None when it cannot be
        remembered (an id no engine accepts)."""
        ...

    def hashes(self, first: int, last: int, parent: bytes | None, content: bytes | None) -> list[bytes]:
        """The links after each block ``first`` to ``last``, chained from ``parent`` (None:
        from the root, ``first`` is 0)."""
        ...

    def key(self, link: bytes) -> str:
        """A block's residency key, from the link after it."""
        ...

    def prefix_tokens(self, blocks: int, prompt_tokens: int) -> int:
        """The prompt's tokens in its first ``blocks`` blocks, given the ``prompt_tokens`` the
        engine counted in the whole prompt (0: not known)."""
        ...


class TextChain:
    """``scheduler.prefix_keys``' chain: blake2b-16 of the parent and each ``width``-byte chunk
    of the UTF-8 text, seeded with the salt; a key is the hash's hex."""

    def __init__(self, text: str, *, width: int, salt: str, block_size: int) -> None:
        self._data = text.encode()
        self.memo_chain: Hashable = (TEXT_CHAIN, width)
        self.root: Hashable = hashlib.blake2b(f"zumik-prefix|{salt}".encode(), digest_size=16).digest()
        self.block_bytes = width
        self._block_size = block_size  # the tokens a chunk stands for, before they are counted

    def prefix_tokens(self, blocks: int, prompt_tokens: int) -> int:
        """The first ``blocks`` chunks' share of the text's bytes, of the tokens the engine
        counted: a chunk is a fixed number of bytes, and code or CJK text packs far more or
        fewer tokens into them than the ``block_size`` tokens a chunk stands for before the
        count is known (then the figure)."""
        covered = min(len(self._data), max(0, blocks) * self.block_bytes)
        if prompt_tokens <= 0 or not self._data:
            return max(0, blocks) * self._block_size
        return prompt_tokens * covered // len(self._data)

    def num_blocks(self) -> int:
        return len(self._data) // self.block_bytes

    def content(self, first: int, last: int) -> bytes | None:
        return self._data[first * self.block_bytes : last * self.block_bytes]

    def hashes(self, first: int, last: int, parent: bytes | None, content: bytes | None) -> list[bytes]:
        width, data = self.block_bytes, self._data
        link = cast(bytes, self.root if parent is None else parent)
        links: list[bytes] = []
        append = links.append
        new = _BLAKE2B_16.copy
        for start in range(first * width, last * width, width):  # one hash per chunk: the floor
            chunk = new()
            chunk.update(link)
            chunk.update(data[start : start + width])
            link = chunk.digest()
            append(link)
        return links

    key = staticmethod(bytes.hex)


class TokenIdChain:
    """The engine's own block hashes of a token-id prompt (``routing/block_hashes.py``); a key
    is a hash's low 64 bits in hex, as a KV event names the block."""

    def __init__(self, token_ids: Sequence[int], *, block_size: int, cache_salt: str | None) -> None:
        self._ids = token_ids
        self._block_size = block_size
        self._salt = cache_salt
        self.memo_chain: Hashable = (HASH_ALGO, block_size)
        # NONE_HASH is every salt's: block 0's extra keys carry the salt, so the root names it.
        self.root: Hashable = ("cache_salt", cache_salt or "")
        self.block_bytes = 4 * block_size  # each id's 4 bytes

    def content(self, first: int, last: int) -> bytes | None:
        try:  # exact for 0 <= id < 2**32
            return array("I", self._ids[first * self._block_size : last * self._block_size]).tobytes()
        except OverflowError:  # an id no engine accepts: hashed, not remembered
            return None

    def hashes(self, first: int, last: int, parent: bytes | None, content: bytes | None) -> list[bytes]:
        size = self._block_size
        return chained_hashes(
            self._ids[first * size : last * size], content, block_size=size, parent=parent,
            cache_salt=self._salt,
        )  # fmt: skip

    @staticmethod
    def key(link: bytes) -> str:
        return _LOW_64_BITS(link).hex()

    def prefix_tokens(self, blocks: int, prompt_tokens: int) -> int:
        """Exactly ``block_size`` ids a block."""
        return max(0, blocks) * self._block_size


class PromptKeys(Sequence[str]):
    """The first ``len()`` keys of ``chain``, computed a run at a time as they are read.

    ``matched(holds)`` computes only as far as its walk goes; indexing, iterating, ``all()`` and
    equality compute every key. ``computed`` says how many are known now."""

    def __init__(self, chain: KeyChain, num_blocks: int, memo: ChainMemo | None) -> None:
        self._chain = chain
        self._num_blocks = max(0, num_blocks)
        self._memo = memo
        bytes_per_run = memo.run_bytes if memo is not None else RUN_BYTES
        self._step = max(1, bytes_per_run // chain.block_bytes)
        self._keys: list[str] = []
        self._link: Hashable = chain.root  # the memo's link after the keys known
        self._recalling = memo is not None  # until the first run the memo does not hold

    @property
    def computed(self) -> int:
        return len(self._keys)

    def __len__(self) -> int:
        return self._num_blocks

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        return self.all()[index]

    def __iter__(self) -> Iterator[str]:
        return iter(self.all())

    def __eq__(self, other: object) -> bool:
        """Equal to a ``PromptKeys``, list or tuple of the same keys."""
        if isinstance(other, PromptKeys | list | tuple):
            return self.all() == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # its keys are computed late: no hash

    def __repr__(self) -> str:
        return f"PromptKeys({self.computed} of {self._num_blocks} computed)"

    def all(self) -> list[str]:
        """Every key, in prompt order (the list is this object's own: do not change it)."""
        if len(self._keys) < self._num_blocks:
            self._extend(self._num_blocks)
        return self._keys

    def prefix_tokens(self, blocks: int, prompt_tokens: int) -> int:
        """The prompt's tokens in its first ``blocks`` blocks (``KeyChain.prefix_tokens``)."""
        return self._chain.prefix_tokens(blocks, prompt_tokens)

    def matched(self, holds: Callable[[str], bool]) -> int:
        """How many keys ``holds`` from the first, stopping at the first it does not: the
        residency walk, computing runs only while the walk reaches past them."""
        keys = self._keys
        matched = 0
        while True:
            if matched == len(keys):
                if matched == self._num_blocks:
                    return matched
                self._extend(matched + 1)
            walked = len(list(takewhile(holds, keys[matched:])))  # the walk, in C
            matched += walked
            if matched < len(keys):
                return matched

    def _extend(self, num_keys: int) -> None:
        """Compute keys until at least ``num_keys`` are known, in whole runs (the prompt's last
        may be short): recalled from the memo while it holds them, then hashed in one call and
        remembered. Keys are only ever added a run at a time, so they end on a run's end.

        Recalling is cheap next to hashing (a lookup a run), so once the memo holds the first
        run asked for, every run it holds is recalled at once (an agent's next turn: the walk
        goes on through them); a first request converts and looks up only one run."""
        chain, memo, step, keys = self._chain, self._memo, self._step, self._keys
        if memo is not None and self._recalling and len(keys) < num_keys:
            first = len(keys)
            for last in (min(first + step, self._num_blocks), self._num_blocks):
                content = chain.content(first, last) if last > first else None
                if content is None:  # nothing left, or an id no engine accepts
                    self._recalling = False
                    break
                count = last - first
                done, self._link = memo.recall(
                    chain.memo_chain, self._link, content, chain.block_bytes, count, keys
                )
                self._recalling = done == count
                if not self._recalling:
                    break
                first = last
        if len(keys) >= num_keys:
            return
        first = len(keys)
        last = min(self._num_blocks, -(-num_keys // step) * step)
        content = chain.content(first, last) if memo is not None else None
        parent = None if first == 0 else cast(bytes, self._link)
        links = chain.hashes(first, last, parent, content)
        new_keys = list(map(chain.key, links))
        keys.extend(new_keys)
        if memo is not None and content is not None:
            memo.remember(chain.memo_chain, self._link, content, chain.block_bytes, 0, new_keys, links)
        self._link = links[-1]
