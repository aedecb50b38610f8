"""HybridCache: what each block keeps between forward calls while generating.

Per block, only what its type needs (DESIGN.md): KV for attention (``*``), conv + SSM state for
Mamba-2 (``M``), conv + recurrent state for Gated DeltaNet (``G``), nothing for ``-`` and ``E``.
Row ``b`` of every tensor belongs to sequence slot ``b``, so an engine can reset and reuse a slot.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class AttentionState:
    key: Tensor  # [B, S_max, H_kv, D]
    value: Tensor  # [B, S_max, H_kv, D]


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


@dataclass
class ForwardContext:
    """What every block of one forward call shares.

    positions: [B, T] position of each new token among its sequence's real tokens (RoPE).
    token_mask: [B, past_len + T] bool over every cached and new position, True at a real token and
        False at left padding (the model's ``attention_mask``, transformers' name for it); None when
        there is no padding anywhere. Recurrent blocks read the last T columns, attention all of them.
    """

    positions: Tensor
    past_len: int
    token_mask: Tensor | None = None

    def new_token_mask(self, num_new: int) -> Tensor | None:
        """[B, num_new]: the mask of this call's tokens (None when there is no padding)."""
        return None if self.token_mask is None else self.token_mask[:, -num_new:]


class HybridCache:
    """Preallocated per-block generation state for ``batch_size`` sequences of up to ``max_seq_len``."""

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
        self.seq_len = 0  # positions filled (the same for every row: prompts are left-padded)
        self.token_mask = torch.ones(batch_size, max_seq_len, dtype=torch.bool, device=device)
        self.num_real_tokens = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.has_padding = False

    def __getitem__(self, index: int) -> BlockState | None:
        return self.states[index]

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
        """Empty the cache so it can serve new sequences (states are overwritten, not reallocated)."""
        self.seq_len = 0
        self.token_mask.fill_(True)
        self.num_real_tokens.zero_()
        self.has_padding = False
        for state in _leaf_states(self.states):
            if isinstance(state, RecurrentState):
                state.conv.zero_()
                state.recurrent.zero_()

    def begin(self, num_new: int, token_mask: Tensor | None) -> ForwardContext:
        """Check room for ``num_new`` tokens and build the context for the blocks (does not advance)."""
        if self.seq_len + num_new > self.max_seq_len:
            raise ValueError(
                f"sequence too long for the cache: {self.seq_len} cached + {num_new} new tokens > "
                f"max_seq_len {self.max_seq_len}; create the cache with a larger max_seq_len"
            )
        device = self.token_mask.device
        start, end = self.seq_len, self.seq_len + num_new
        if token_mask is None:
            offsets = torch.arange(num_new, device=device)
            positions = self.num_real_tokens[:, None] + offsets
        else:
            self.token_mask[:, start:end] = token_mask
            positions = self.num_real_tokens[:, None] + token_mask.long().cumsum(-1) - 1
            positions = positions.clamp_min(0)
            self.has_padding = self.has_padding or not bool(token_mask.all())
        return ForwardContext(
            positions=positions,
            past_len=start,
            token_mask=self.token_mask[:, :end] if self.has_padding else None,
        )

    def advance(self, num_new: int, token_mask: Tensor | None) -> None:
        self.seq_len += num_new
        self.num_real_tokens += num_new if token_mask is None else token_mask.long().sum(-1)
