"""HybridCache: what each block keeps between forward calls while generating.

Per block, only what its type needs (DESIGN.md): KV for attention (``*``), conv + SSM state for
Mamba-2 (``M``), conv + recurrent state for Gated DeltaNet (``G``), nothing for ``-`` and ``E``.
Row ``b`` of every tensor belongs to sequence slot ``b``: a slot has its own length and position, and
is reset, copied, snapshotted and restored alone (``reset_slot``, ``copy_slot``, ``snapshot_slot``,
``restore_slot``); ``narrow`` gives a view of consecutive slots that a forward call fills in place,
which is how a serving engine prefills one request while others decode.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class AttentionState:
    key: Tensor  # [B, H_kv, S_max, D]: head-major, each head's keys contiguous
    value: Tensor  # [B, H_kv, S_max, D]


@dataclass
class RecurrentState:
    """Mamba-2: conv [B, conv_dim, K-1] + recurrent [B, H, P, N]; Gated DeltaNet: recurrent [B, H, K, V]."""

    conv: Tensor
    recurrent: Tensor


@dataclass
class ParallelState:
    """A block running Mamba-2 and attention side by side (Falcon-H1) keeps both states."""

    mamba: RecurrentState
    attention: AttentionState


BlockState = AttentionState | RecurrentState | ParallelState


def _state_bytes(state: BlockState | None) -> int:
    if state is None:
        return 0
    if isinstance(state, ParallelState):
        return _state_bytes(state.mamba) + _state_bytes(state.attention)
    return sum(getattr(state, f.name).nbytes for f in fields(state))


def _leaf_states(states: list[BlockState | None]) -> list[AttentionState | RecurrentState]:
    leaves: list[AttentionState | RecurrentState] = []
    for state in states:
        if isinstance(state, ParallelState):
            leaves += [state.mamba, state.attention]
        elif state is not None:
            leaves.append(state)
    return leaves


def _narrow_state(state: BlockState | None, start: int, count: int) -> BlockState | None:
    if state is None:
        return None
    if isinstance(state, ParallelState):
        return ParallelState(_narrow_state(state.mamba, start, count), _narrow_state(state.attention, start, count))
    return type(state)(**{f.name: getattr(state, f.name)[start : start + count] for f in fields(state)})


@dataclass
class ForwardContext:
    """What every block of one forward call shares.

    Each cache row is a slot holding one sequence; a slot's token i lives at position (and KV
    column) i whatever the other slots hold, so slots of different lengths run in one batch.

    positions: [B, T] each new token's position in its own sequence (RoPE, and its KV column).
    token_mask: [B, T] bool, True at a real token and False at left padding (only the first chunk of
        a sequence may be padded); None when every new token is real.
    past_lengths: [B] tokens each slot held before this call (a tensor: no host synchronisation).
    past_length: the same number as a Python int when every slot held the same, else None.
    max_length: the longest slot after this call: the cache columns attention reads.
    """

    positions: Tensor
    token_mask: Tensor | None = None
    past_lengths: Tensor | None = None
    past_length: int | None = 0
    max_length: int = 0

    @classmethod
    def without_cache(cls, token_mask: Tensor | None, batch: int, num_new: int, device: torch.device) -> ForwardContext:
        """A whole sequence in one call: positions count the real tokens of each row."""
        if token_mask is None:
            positions = torch.arange(num_new, device=device).expand(batch, num_new)
        else:
            positions = (token_mask.long().cumsum(-1) - 1).clamp_min(0)
        return cls(positions=positions, token_mask=token_mask, past_length=0, max_length=num_new)


@dataclass
class SlotSnapshot:
    """One slot's state after its first ``length`` tokens: conv + recurrent state, and the keys and
    values of those tokens (copies, so the slot may go on or be reused)."""

    length: int
    tensors: list[Tensor]  # one per slot tensor of the cache, in ``HybridCache._slot_tensors`` order
    next_logits: Tensor | None = None  # the logits after token ``length`` where the caller kept them
    id: int | None = None  # a name the caller may give it (the serving engine's mirrored ranks do)

    @property
    def nbytes(self) -> int:
        extra = 0 if self.next_logits is None else self.next_logits.nbytes
        return sum(t.nbytes for t in self.tensors) + extra


class HybridCache:
    """Preallocated per-block generation state for ``batch_size`` slots of up to ``max_seq_len`` tokens.

    ``lengths`` [B] (on the model's device) counts the tokens each slot holds; the same counts are
    kept on the host, so a step learns how many KV columns to read without synchronising.
    """

    def __init__(
        self,
        pattern: str,
        states: list[BlockState | None],
        batch_size: int,
        max_seq_len: int,
        device: torch.device,
    ) -> None:
        self.pattern = pattern
        self.states = states
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        # host copy of the lengths; a view made by ``narrow`` shares its parent's list at an offset
        self._host_all = [0] * batch_size
        self._first = 0

    @property
    def _host_lengths(self) -> list[int]:
        return self._host_all[self._first : self._first + self.batch_size]

    @_host_lengths.setter
    def _host_lengths(self, values: list[int]) -> None:
        self._host_all[self._first : self._first + self.batch_size] = values

    def narrow(self, start: int, count: int) -> HybridCache:
        """Slots ``start .. start + count - 1`` as a cache of ``count`` slots sharing this one's memory:
        a forward or decode step on the view reads and advances exactly those slots (no copy)."""
        self._check_slot(start)
        if count < 1 or start + count > self.batch_size:
            raise ValueError(f"narrow({start}, {count}): the cache holds slots 0..{self.batch_size - 1}")
        view = HybridCache.__new__(HybridCache)
        view.pattern, view.max_seq_len, view.batch_size = self.pattern, self.max_seq_len, count
        view.states = [_narrow_state(state, start, count) for state in self.states]
        view.lengths = self.lengths[start : start + count]  # a view: advancing it advances this cache
        view._host_all, view._first = self._host_all, self._first + start
        return view

    # -- one slot at a time (the serving engine's pool) ---------------------------------------------
    def reset_slot(self, slot: int) -> None:
        """Empty one slot for a new sequence: its conv and recurrent state zeroed, its length 0 (its
        old keys and values stay in memory but are never read: attention reads a slot's own length)."""
        self._check_slot(slot)
        for tensor, holds_positions in self._slot_tensors():
            if not holds_positions:
                tensor[slot].zero_()
        self._set_length(slot, 0)

    def copy_slot(self, source: int, target: int) -> None:
        """Make slot ``target`` hold what slot ``source`` holds (state, keys and values, length)."""
        self._check_slot(source)
        self._check_slot(target)
        if source == target:
            return
        length = self._host_lengths[source]
        for tensor, holds_positions in self._slot_tensors():
            if holds_positions:
                tensor[target, :, :length].copy_(tensor[source, :, :length])
            else:
                tensor[target].copy_(tensor[source])
        self._set_length(target, length)

    def snapshot_slot(self, slot: int) -> SlotSnapshot:
        """A copy of one slot's state as it stands (its keys and values up to its length)."""
        self._check_slot(slot)
        length = self._host_lengths[slot]
        tensors = [
            (tensor[slot, :, :length] if holds_positions else tensor[slot]).clone()
            for tensor, holds_positions in self._slot_tensors()
        ]
        return SlotSnapshot(length, tensors)

    def restore_slot(self, slot: int, snapshot: SlotSnapshot) -> None:
        """Put a snapshot into a slot: the slot then continues from the snapshot's tokens."""
        self._check_slot(slot)
        slot_tensors = self._slot_tensors()
        if len(snapshot.tensors) != len(slot_tensors) or snapshot.length > self.max_seq_len:
            raise ValueError("the snapshot was taken from a cache of another model or a longer max_seq_len")
        for (tensor, holds_positions), saved in zip(slot_tensors, snapshot.tensors, strict=True):
            if holds_positions:
                tensor[slot, :, : snapshot.length].copy_(saved)
            else:
                tensor[slot].copy_(saved)
        self._set_length(slot, snapshot.length)

    def _slot_tensors(self) -> list[tuple[Tensor, bool]]:
        """Every state tensor, with whether its dim 2 holds token positions (keys and values)."""
        out: list[tuple[Tensor, bool]] = []
        for state in _leaf_states(self.states):
            holds_positions = isinstance(state, AttentionState)
            out += [(getattr(state, f.name), holds_positions) for f in fields(state)]
        return out

    def copy_from(self, other: HybridCache) -> None:
        """Make every slot hold what ``other``'s holds (a cache of the same model and shape): states, keys and
        values copied in place, lengths taken."""
        for mine, theirs in zip(self.state_tensors(), other.state_tensors(), strict=True):
            mine.copy_(theirs)
        self.lengths.copy_(other.lengths)
        self._host_lengths = other.host_lengths

    def state_tensors(self) -> list[Tensor]:
        """Every tensor the blocks keep (keys, values, conv and recurrent states), updated in place."""
        return [tensor for tensor, _ in self._slot_tensors()]

    def _set_length(self, slot: int, length: int) -> None:
        self.lengths[slot] = length
        self._host_all[self._first + slot] = length

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.batch_size:
            raise ValueError(f"slot {slot} is out of range: the cache holds slots 0..{self.batch_size - 1}")

    def __getitem__(self, index: int) -> BlockState | None:
        return self.states[index]

    @property
    def host_lengths(self) -> list[int]:
        """Tokens held per slot, as Python ints (a copy)."""
        return list(self._host_lengths)

    def nbytes(self) -> int:
        """Bytes held by the block states (KV + conv + recurrent)."""
        return sum(_state_bytes(s) for s in self.states)

    def bytes_by_kind(self) -> dict[str, int]:
        """{'kv': ..., 'conv': ..., 'recurrent': ...} in bytes."""
        out = {"kv": 0, "conv": 0, "recurrent": 0}
        for state in _leaf_states(self.states):
            if isinstance(state, AttentionState):
                out["kv"] += _state_bytes(state)
            elif isinstance(state, RecurrentState):
                out["conv"] += state.conv.nbytes
                out["recurrent"] += state.recurrent.nbytes
        return out

    def reset(self) -> None:
        """Empty every slot so the cache can serve new sequences (states are zeroed, not reallocated)."""
        self.lengths.zero_()
        self._host_lengths = [0] * self.batch_size
        for tensor, holds_positions in self._slot_tensors():
            if not holds_positions:
                tensor.zero_()

    def begin(self, num_new: int, token_mask: Tensor | None) -> ForwardContext:
        """Check room for this call's tokens and build the context for the blocks (does not advance).

        A prefill may synchronise (it counts the real tokens of a padded chunk on the host); a
        one-token step without padding never does.
        """
        new_real = [num_new] * self.batch_size if token_mask is None else token_mask.sum(-1).tolist()
        after = [held + new for held, new in zip(self._host_lengths, new_real, strict=True)]
        longest = max(after)
        if longest > self.max_seq_len:
            slot = after.index(longest)
            raise ValueError(
                f"sequence too long for the cache: slot {slot} holds {self._host_lengths[slot]} tokens + "
                f"{new_real[slot]} new > max_seq_len {self.max_seq_len}; create the cache with a larger max_seq_len"
            )
        if token_mask is None:
            positions = self.lengths[:, None] + torch.arange(num_new, device=self.lengths.device)
        else:
            positions = self.lengths[:, None] + (token_mask.long().cumsum(-1) - 1).clamp_min(0)
        uniform = all(held == self._host_lengths[0] for held in self._host_lengths)
        return ForwardContext(
            positions=positions,
            token_mask=token_mask,
            past_lengths=self.lengths,
            past_length=self._host_lengths[0] if uniform else None,
            max_length=longest,
        )

    def advance(self, num_new: int, token_mask: Tensor | None) -> None:
        """Count this call's real tokens into every slot (after the blocks have read ``begin``'s context)."""
        new_real = [num_new] * self.batch_size if token_mask is None else token_mask.sum(-1).tolist()
        self._host_lengths = [held + new for held, new in zip(self._host_lengths, new_real, strict=True)]
        self.lengths += num_new if token_mask is None else token_mask.long().sum(-1)  # in place: graph-safe
