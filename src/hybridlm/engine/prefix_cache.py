"""Prefix caching for hybrid state: snapshots of a slot at token boundaries, reused by later prompts.

Attention can reuse any prefix of a KV cache, but a recurrent block's state exists only at the
points where it was saved: state after token 1,000 cannot be cut back to token 960. So reuse needs
a snapshot at a boundary the next prompt shares. Snapshots here are taken

- at every multiple of ``interval`` tokens where a prefill piece ends (the scheduler cuts pieces on
  these boundaries, so a chunk shorter than the step budget never skips one: SGLang PR #30938),
- at the end of every prompt (the next turn of a chat starts with the whole previous prompt),
- at the *branch point* of a prompt that shares a prefix with an earlier one: the last boundary
  whose prefix some earlier prompt also passed through. A shared system prompt is snapshotted where
  it ends (rounded down to ``interval``) the second time it is seen, and hit from the third on,
  however the first prompt happened to be chunked (vLLM snapshots only the last block boundary of
  each step, so such prefixes never hit there: vllm#45238).

Each snapshot is keyed by a hash of the tokens before it (a blake2b chain over ``interval``-token
blocks, so hashing a prompt costs one pass over it), kept in an LRU pool bounded in bytes. A
lookup finds the longest snapshot that leaves at least one prompt token to compute (its logits
give the first new token), or the whole prompt where its snapshot kept the logits after it (a
repeated prompt, e.g. the ``n`` choices of one request, computes nothing). A miss says why:
``too_short`` (no boundary before the last token), ``evicted`` (a snapshot that would have
matched was evicted), ``no_snapshot`` (none was ever taken there).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from hybridlm.cache import SlotSnapshot

# Boundary hashes remembered from earlier prompts (to find branch points) and keys of evicted
# snapshots (to name an eviction as the reason of a miss): bounded, oldest forgotten first.
MAX_REMEMBERED_PREFIXES = 200_000
MAX_REMEMBERED_EVICTIONS = 100_000


@dataclass
class PrefixLookup:
    """What the cache holds for one prompt."""

    snapshot: SlotSnapshot | None  # the longest usable snapshot (None: a miss)
    miss_reason: str | None  # None on a hit; else "too_short" | "no_snapshot" | "evicted"
    branch_point: int  # the last boundary an earlier prompt shared: worth a snapshot (0: none)

    @property
    def cached_tokens(self) -> int:
        return 0 if self.snapshot is None else self.snapshot.length


class PrefixHasher:
    """Keys of a prompt's prefixes: ``key(n)`` stands for its first n tokens.

    key(n) = blake2b(key(a) + tokens[a:n]) with a the last multiple of ``interval`` below n, and
    key(0) = b'': a chain, each block hashed once however many prefixes are asked for.
    """

    def __init__(self, tokens: list[int], interval: int) -> None:
        self._bytes = np.asarray(tokens, dtype=np.int64).tobytes()
        self._interval = interval
        self._keys: dict[int, bytes] = {0: b""}
        self._chained = 0  # the longest boundary whose key is known: the chain is built up to it

    def key(self, length: int) -> bytes:
        if length not in self._keys:
            before = (length - 1) // self._interval * self._interval
            while self._chained < before:
                self._keys[self._chained + self._interval] = self._extend(self._chained, self._chained + self._interval)
                self._chained += self._interval
            self._keys[length] = self._extend(before, length)
        return self._keys[length]

    def _extend(self, before: int, length: int) -> bytes:
        block = self._bytes[8 * before : 8 * length]
        return hashlib.blake2b(self._keys[before] + block, digest_size=16).digest()


class PrefixCache:
    def __init__(self, capacity_bytes: int, interval: int) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"prefix cache: capacity_bytes must be >= 0 (0 = off), got {capacity_bytes}")
        if interval < 1:
            raise ValueError(f"prefix cache: the snapshot interval must be >= 1 token, got {interval}")
        self.capacity_bytes = capacity_bytes
        self.interval = interval
        self._snapshots: OrderedDict[bytes, SlotSnapshot] = OrderedDict()  # least recently used first
        self._lengths: dict[int, int] = {}  # snapshot length -> how many snapshots have it
        self._seen_boundaries: OrderedDict[bytes, None] = OrderedDict()
        self._evicted: OrderedDict[bytes, None] = OrderedDict()
        self.bytes = 0
        self.evictions = 0
        self.on_evict: Callable[[SlotSnapshot], None] | None = None  # told of each snapshot evicted

    @property
    def enabled(self) -> bool:
        return self.capacity_bytes > 0

    def __len__(self) -> int:
        return len(self._snapshots)

    def boundaries(self, start: int, stop: int) -> range:
        """The snapshot boundaries strictly after ``start`` and up to ``stop``."""
        first = (start // self.interval + 1) * self.interval
        return range(first, stop + 1, self.interval)

    def hasher(self, prompt: list[int]) -> PrefixHasher:
        """The keys of ``prompt``'s prefixes (one per sequence: each key is hashed once)."""
        return PrefixHasher(prompt, self.interval)

    def lookup(self, hasher: PrefixHasher, prompt_length: int) -> PrefixLookup:
        """The longest usable snapshot for a prompt (marked recently used), and its branch point."""
        whole = self._snapshots.get(hasher.key(prompt_length))
        if whole is not None and whole.next_logits is not None:  # the same prompt, with its logits
            self._snapshots.move_to_end(hasher.key(prompt_length))
            return PrefixLookup(whole, None, 0)
        usable = prompt_length - 1  # at least one token is computed, for the first new token's logits
        candidates = sorted({*self.boundaries(0, usable), *(n for n in self._lengths if 0 < n <= usable)}, reverse=True)
        snapshot, evicted = None, False
        for length in candidates:
            key = hasher.key(length)
            if key in self._snapshots:
                snapshot = self._snapshots[key]
                self._snapshots.move_to_end(key)
                break
            evicted = evicted or key in self._evicted
        branch_point = self._branch_point(hasher, usable)
        self._remember_boundaries(hasher, prompt_length)
        if snapshot is not None:
            return PrefixLookup(snapshot, None, branch_point)
        if not self.enabled or not candidates:
            reason = "too_short" if not candidates else "no_snapshot"
        else:
            reason = "evicted" if evicted else "no_snapshot"
        return PrefixLookup(None, reason, branch_point)

    def wants(self, hasher: PrefixHasher, length: int) -> bool:
        """Whether a slot holding the first ``length`` tokens of the hashed prompt should be snapshotted."""
        return self.enabled and length > 0 and hasher.key(length) not in self._snapshots

    def add(self, hasher: PrefixHasher, snapshot: SlotSnapshot) -> None:
        """Keep ``snapshot`` (of the hashed prompt's first tokens), evicting the least recently used to fit."""
        if not self.enabled or snapshot.nbytes > self.capacity_bytes:
            return
        key = hasher.key(snapshot.length)
        if key in self._snapshots:
            return
        while self.bytes + snapshot.nbytes > self.capacity_bytes:
            self._evict_oldest()
        self._snapshots[key] = snapshot
        self._lengths[snapshot.length] = self._lengths.get(snapshot.length, 0) + 1
        self.bytes += snapshot.nbytes
        self._evicted.pop(key, None)

    def clear(self) -> None:
        while self._snapshots:
            self._evict_oldest()

    def _evict_oldest(self) -> None:
        key, old = self._snapshots.popitem(last=False)
        self.bytes -= old.nbytes
        if self.on_evict is not None:
            self.on_evict(old)
        self.evictions += 1
        self._lengths[old.length] -= 1
        if not self._lengths[old.length]:
            del self._lengths[old.length]
        self._remember(self._evicted, key, MAX_REMEMBERED_EVICTIONS)

    def _branch_point(self, hasher: PrefixHasher, usable: int) -> int:
        for length in reversed(self.boundaries(0, usable)):
            if hasher.key(length) in self._seen_boundaries:
                return length
        return 0

    def _remember_boundaries(self, hasher: PrefixHasher, length: int) -> None:
        for boundary in self.boundaries(0, length):
            self._remember(self._seen_boundaries, hasher.key(boundary), MAX_REMEMBERED_PREFIXES)

    @staticmethod
    def _remember(table: OrderedDict[bytes, None], key: bytes, bound: int) -> None:
        table[key] = None
        table.move_to_end(key)
        while len(table) > bound:
            table.popitem(last=False)
