"""Mamba-2 and attention side by side on one normalised input, summed (Falcon-H1's hybrid layer).

Falcon-H1's scalar multipliers (ssm in/out, attention in/out, key, the per-section ``mup_vector``)
are linear and are folded into the projection weights when a checkpoint is loaded; the block itself
is the plain sum.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from hybridlm.cache import ForwardContext, ParallelState
from hybridlm.layers.attention import Attention
from hybridlm.layers.base import BlockModule, BlockParams, StateTensor
from hybridlm.layers.mamba2 import Mamba2Mixer

if TYPE_CHECKING:
    from hybridlm.config import HybridConfig


class ParallelMixer(BlockModule):
    def __init__(self, config: HybridConfig) -> None:
        super().__init__()
        self.mamba = Mamba2Mixer(config.hidden_size, config.mamba2, config.norm_eps)
        self.self_attn = Attention(config.hidden_size, config.attention, config.norm_eps, config.is_norm_zero_centered)

    @classmethod
    def from_config(cls, config: HybridConfig) -> ParallelMixer:
        return cls(config)

    @staticmethod
    def count_params(config: HybridConfig) -> BlockParams:
        n = Mamba2Mixer.count_params(config).total + Attention.count_params(config).total
        return BlockParams(n, n)

    @staticmethod
    def state_tensors(config: HybridConfig, batch_size: int, max_seq_len: int) -> list[StateTensor]:
        return Mamba2Mixer.state_tensors(config, batch_size, max_seq_len) + Attention.state_tensors(
            config, batch_size, max_seq_len
        )

    @staticmethod
    def context_flops(config: HybridConfig, context: int) -> int:
        return Attention.context_flops(config, context)

    def new_state(self, batch_size: int, max_seq_len: int, device: torch.device, dtype: torch.dtype) -> ParallelState:
        return ParallelState(
            mamba=self.mamba.new_state(batch_size, max_seq_len, device, dtype),
            attention=self.self_attn.new_state(batch_size, max_seq_len, device, dtype),
        )

    def step(self, x: Tensor, context: ForwardContext, state: ParallelState) -> Tensor:
        """One decoding token per slot: x [B, hidden] -> [B, hidden]; both states updated in place."""
        return self.mamba.step(x, context, state.mamba) + self.self_attn.step(x, context, state.attention)

    def forward(self, x: Tensor, context: ForwardContext, state: ParallelState | None = None) -> Tensor:
        mamba_state = None if state is None else state.mamba
        attention_state = None if state is None else state.attention
        return self.mamba(x, context, mamba_state) + self.self_attn(x, context, attention_state)
