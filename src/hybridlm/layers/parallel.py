"""Mamba-2 and attention side by side on one normalised input, summed (Falcon-H1's hybrid layer).

Falcon-H1's scalar multipliers (ssm in/out, attention in/out, key, the per-section ``mup_vector``)
are linear and are folded into the projection weights when a checkpoint is loaded; the block itself
is the plain sum.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hybridlm.cache import ForwardContext, ParallelState
from hybridlm.config import HybridConfig
from hybridlm.layers.attention import Attention
from hybridlm.layers.mamba2 import Mamba2Mixer


class ParallelMixer(nn.Module):
    def __init__(self, config: HybridConfig) -> None:
        super().__init__()
        self.mamba = Mamba2Mixer(config.hidden_size, config.mamba2, config.norm_eps)
        self.self_attn = Attention(config.hidden_size, config.attention, config.norm_eps, config.is_norm_zero_centered)

    def new_state(self, batch_size: int, max_seq_len: int, device: torch.device, dtype: torch.dtype) -> ParallelState:
        return ParallelState(
            mamba=self.mamba.new_state(batch_size, max_seq_len, device, dtype),
            attention=self.self_attn.new_state(batch_size, max_seq_len, device, dtype),
        )

    def forward(self, x: Tensor, context: ForwardContext, state: ParallelState | None = None) -> Tensor:
        mamba_state = None if state is None else state.mamba
        attention_state = None if state is None else state.attention
        return self.mamba(x, context, mamba_state) + self.self_attn(x, context, attention_state)
