"""What the scheduler asks of the model and its slot pool, in one place: prompt pieces, decode steps,
and slot moves (reset, copy, swap, snapshot, restore).

``SlotWorker`` runs them on this process's model and cache. With experts spread over ranks, every
rank must run the same forward calls in step (each MoE block exchanges tokens with the others), so
rank 0's scheduler drives a ``MirroredWorker``: it broadcasts each call to the other ranks before
running it, and ``follow`` replays the calls there on their own model and cache (same slots, same
states: only the experts differ). The followers never decide anything; rank 0's sampled tokens
reach them inside the decode calls.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import Tensor

from hybridlm.cache import HybridCache, SlotSnapshot
from hybridlm.generation import pad_prompts
from hybridlm.model import HybridLM


class SlotWorker:
    def __init__(self, model: HybridLM, cache: HybridCache) -> None:
        self.model = model
        self.cache = cache
        self._snapshot_ids = itertools.count()

    @property
    def num_slots(self) -> int:
        return self.cache.batch_size

    def prefill(self, first_slot: int, pieces: list[list[int]]) -> Tensor:
        """Append piece i to slot first_slot + i (several pieces: each slot's first, left-padded into
        one batch): the logits after the last token of each piece [len(pieces), vocab]."""
        ids, mask = pad_prompts(pieces)
        ids = ids.to(self.model.device)
        mask = None if mask is None else mask.to(self.model.device)
        view = self.cache.narrow(first_slot, len(pieces))
        return self.model(ids, cache=view, attention_mask=mask, last_logits_only=True).logits[:, -1]

    def decode(self, tokens: list[int]) -> Tensor:
        """One token for each of slots 0 .. len(tokens) - 1: their next-token logits [n, vocab]."""
        ids = torch.tensor(tokens, dtype=torch.long, device=self.model.device)
        return self.model.decode_step(ids, self.cache.narrow(0, len(tokens)))

    def reset_slot(self, slot: int) -> None:
        self.cache.reset_slot(slot)

    def copy_slot(self, source: int, target: int) -> None:
        self.cache.copy_slot(source, target)

    def swap_slots(self, a: int, b: int) -> None:
        held = self.cache.snapshot_slot(a)
        self.cache.copy_slot(b, a)
        self.cache.restore_slot(b, held)

    def snapshot(self, slot: int) -> SlotSnapshot:
        snapshot = self.cache.snapshot_slot(slot)
        snapshot.id = next(self._snapshot_ids)  # how rank 0 names it to the followers
        return snapshot

    def restore(self, slot: int, snapshot: SlotSnapshot) -> None:
        self.cache.restore_slot(slot, snapshot)

    def forget(self, snapshot: SlotSnapshot) -> None:
        """A snapshot left the prefix cache (evicted): nothing to do here, followers drop their copy."""

    def stop(self) -> None:
        """The engine has stopped: followers leave their loop."""


class MirroredWorker(SlotWorker):
    """Rank 0's worker: each call is broadcast to the other ranks of ``group`` before it runs here."""

    def __init__(self, model: HybridLM, cache: HybridCache, group: Any = None) -> None:
        super().__init__(model, cache)
        self.group = group
        self._tell("pool", cache.batch_size, cache.max_seq_len)  # the followers allocate the same slots

    def _tell(self, *command: object) -> None:
        import torch.distributed as dist

        dist.broadcast_object_list([command], src=0, group=self.group)

    def prefill(self, first_slot: int, pieces: list[list[int]]) -> Tensor:
        self._tell("prefill", first_slot, [list(piece) for piece in pieces])
        return super().prefill(first_slot, pieces)

    def decode(self, tokens: list[int]) -> Tensor:
        self._tell("decode", list(tokens))
        return super().decode(tokens)

    def reset_slot(self, slot: int) -> None:
        self._tell("reset_slot", slot)
        super().reset_slot(slot)

    def copy_slot(self, source: int, target: int) -> None:
        self._tell("copy_slot", source, target)
        super().copy_slot(source, target)

    def swap_slots(self, a: int, b: int) -> None:
        self._tell("swap_slots", a, b)
        super().swap_slots(a, b)

    def snapshot(self, slot: int) -> SlotSnapshot:
        snapshot = super().snapshot(slot)
        self._tell("snapshot", slot, snapshot.id)
        return snapshot

    def restore(self, slot: int, snapshot: SlotSnapshot) -> None:
        self._tell("restore", slot, snapshot.id)
        super().restore(slot, snapshot)

    def forget(self, snapshot: SlotSnapshot) -> None:
        self._tell("forget", snapshot.id)

    def stop(self) -> None:
        import torch.distributed as dist

        self._tell("stop")
        dist.barrier(group=self.group)  # every rank has left its loop before any tears the group down


def follow(model: HybridLM, group: Any = None) -> int:
    """On a rank other than 0: allocate the slot pool rank 0 announces, then replay rank 0's calls on
    this rank's model until it stops. Returns the number of calls replayed."""
    import torch.distributed as dist

    def receive() -> tuple:
        received: list[Any] = [None]
        dist.broadcast_object_list(received, src=0, group=group)
        return received[0]

    name, slots, max_len = receive()
    if name != "pool":
        raise RuntimeError(f"rank 0 sent {name!r} before announcing its slot pool: ranks out of step")
    worker = SlotWorker(model, model.new_cache(slots, max_len))
    snapshots: dict[int, SlotSnapshot] = {}
    replayed = 0
    with torch.inference_mode():
        while True:
            name, *args = receive()
            if name == "stop":
                dist.barrier(group=group)
                return replayed
            replayed += 1
            if name == "snapshot":
                slot, snapshot_id = args
                snapshots[snapshot_id] = worker.cache.snapshot_slot(slot)
            elif name == "restore":
                slot, snapshot_id = args
                worker.restore(slot, snapshots[snapshot_id])
            elif name == "forget":
                snapshots.pop(args[0], None)
            else:
                getattr(worker, name)(*args)
