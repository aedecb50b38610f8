"""Gated DeltaNet mixer (Yang et al. 2024), with the separate projections of Qwen3.5 checkpoints.

q, k, v from one projection through a causal depthwise conv + silu; q and k L2-normalised and
repeated from key heads to value heads; beta = sigmoid(b); g = -exp(A_log) * softplus(a + dt_bias);
the gated delta rule; RMSNorm per head gated by silu(z); out_proj.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hybridlm.cache import ForwardContext, RecurrentState
from hybridlm.layers.base import BlockModule, BlockParams, StateTensor, allocate
from hybridlm.layers.linear import Linear, project
from hybridlm.layers.norm import GatedRMSNorm
from hybridlm.layers.short_conv import conv_sequence, conv_step
from hybridlm.ops import cuda_kernels, native
from hybridlm.ops.gated_deltanet import gated_deltanet_chunked, gated_deltanet_step
from hybridlm.ops.precision import upcast

if TYPE_CHECKING:
    from hybridlm.config import GatedDeltaNetConfig, HybridConfig


def l2_normalize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim, as fla and transformers' Qwen3-Next do."""
    if native.rms_norm_applies(x):  # one kernel call instead of four ops (no autograd)
        return native.l2_normalize(x, eps)
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


class GatedDeltaNetMixer(BlockModule):
    def __init__(self, hidden_size: int, config: GatedDeltaNetConfig, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.config = c = config
        self.in_proj_qkv = Linear(hidden_size, c.conv_dim, bias=False)
        self.in_proj_z = Linear(hidden_size, c.value_dim, bias=False)
        self.in_proj_b = Linear(hidden_size, c.num_value_heads, bias=False)
        self.in_proj_a = Linear(hidden_size, c.num_value_heads, bias=False)
        self.conv1d = nn.Conv1d(c.conv_dim, c.conv_dim, c.conv_kernel, groups=c.conv_dim, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(c.num_value_heads))
        self.A_log = nn.Parameter(torch.log(torch.empty(c.num_value_heads).uniform_(1.0, 16.0)))
        self.norm = GatedRMSNorm(c.value_head_dim, c.value_head_dim, norm_eps, norm_before_gate=True)
        self.out_proj = Linear(c.value_dim, hidden_size, bias=False)

    @classmethod
    def from_config(cls, config: HybridConfig) -> GatedDeltaNetMixer:
        return cls(config.hidden_size, config.gdn, config.norm_eps)

    @staticmethod
    def count_params(config: HybridConfig) -> BlockParams:
        d, g = config.hidden_size, config.gdn
        n = d * (g.conv_dim + g.value_dim + 2 * g.num_value_heads)  # in_proj_qkv, _z, _b, _a
        n += g.conv_dim * g.conv_kernel + 2 * g.num_value_heads + g.value_head_dim  # conv, dt_bias, A_log, norm
        n += g.value_dim * d  # out_proj
        return BlockParams(n, n)

    @staticmethod
    def state_tensors(config: HybridConfig, batch_size: int, max_seq_len: int) -> list[StateTensor]:
        return _state_tensors(config.gdn, batch_size)

    def new_state(self, batch_size: int, max_seq_len: int, device: torch.device, dtype: torch.dtype) -> RecurrentState:
        return RecurrentState(**allocate(_state_tensors(self.config, batch_size), device, dtype))

    def step(self, x: Tensor, context: ForwardContext, state: RecurrentState) -> Tensor:
        """One decoding token per slot: x [B, hidden] -> [B, hidden]; ``state`` is updated in place."""
        c = self.config
        B = x.shape[0]
        qkv, z, b, a = project(x, (self.in_proj_qkv, self.in_proj_z, self.in_proj_b, self.in_proj_a))
        qkv = conv_step(qkv, state.conv, self.conv1d)
        o = self._recurrence(qkv, b, a, state.recurrent, B, 1)[:, 0]
        o = self.norm(o.to(x.dtype), z.view(B, c.num_value_heads, c.value_head_dim))
        return self.out_proj(o.reshape(B, c.value_dim))

    def _recurrence(self, qkv: Tensor, b: Tensor, a: Tensor, recurrent: Tensor | None, B: int, T: int) -> Tensor:
        """The gated delta rule from the projections (rows b * T + t: qkv after the conv, b and a raw) over
        T tokens per sequence -> o [B, T, H, V]; ``recurrent`` [B, H, K, V] (zeros when None) is updated in
        place."""
        c = self.config
        parameters = (self.A_log, self.dt_bias)
        state = recurrent
        if state is None:  # in the compute dtype: fp32, or fp64 for fp64 inputs
            shape = (B, c.num_value_heads, c.key_head_dim, c.value_head_dim)
            state = qkv.new_zeros(shape, dtype=torch.promote_types(qkv.dtype, torch.float32))
        if native.gated_delta_scan_applies(qkv, b, a, state, *parameters):  # inference in fp32 on CPU
            o = native.gated_delta_scan_(qkv, b, a, *parameters, c.num_key_heads, state)  # token by token
            return o.view(B, T, c.num_value_heads, c.value_head_dim)
        q, k, v = qkv.split([c.key_dim, c.key_dim, c.value_dim], dim=-1)
        q = l2_normalize(upcast(q.reshape(B, T, c.num_key_heads, c.key_head_dim)))
        k = l2_normalize(upcast(k.reshape(B, T, c.num_key_heads, c.key_head_dim)))
        repeats = c.num_value_heads // c.num_key_heads
        if repeats > 1:  # value head h reads key head h // repeats
            q, k = q.repeat_interleave(repeats, dim=2), k.repeat_interleave(repeats, dim=2)
        beta, g = self._gates(b.reshape(B, T, -1), a.reshape(B, T, -1))
        v = upcast(v.reshape(B, T, c.num_value_heads, c.value_head_dim))
        if T == 1:
            o, new_state = gated_deltanet_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], state)
            o = o[:, None]
        else:
            chunked = cuda_kernels.gated_delta(q.device) or gated_deltanet_chunked  # fla's, where it matched
            o, new_state = chunked(q, k, v, g, beta, recurrent, chunk_size=c.chunk_size)
        if recurrent is not None:
            recurrent.copy_(new_state)
        return o

    def _gates(self, b: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        """The write strength beta = sigmoid(b) and the log-decay g = -exp(A_log) * softplus(a + dt_bias)."""
        beta = torch.sigmoid(upcast(b))
        g = -torch.exp(upcast(self.A_log)) * F.softplus(upcast(a) + upcast(self.dt_bias))
        return beta, g

    def forward(self, x: Tensor, context: ForwardContext, state: RecurrentState | None = None) -> Tensor:
        """x: [B, T, hidden] -> [B, T, hidden]; updates ``state`` in place when given."""
        c = self.config
        B, T, _ = x.shape
        if state is not None and T == 1 and context.token_mask is None:
            return self.step(x[:, 0], context, state)[:, None]
        qkv, z, b, a = project(x, (self.in_proj_qkv, self.in_proj_z, self.in_proj_b, self.in_proj_a))
        mask = context.token_mask
        if mask is not None:
            qkv = qkv.masked_fill(~mask[..., None], 0.0)
        qkv = conv_sequence(qkv, None if state is None else state.conv, self.conv1d)
        if mask is not None:
            qkv = qkv.masked_fill(~mask[..., None], 0.0)
        rows = (t.reshape(B * T, -1) for t in (qkv, b, a))
        o = self._recurrence(*rows, None if state is None else state.recurrent, B, T)
        o = self.norm(o.to(x.dtype), z.reshape(B, T, c.num_value_heads, c.value_head_dim))
        return self.out_proj(o.reshape(B, T, c.value_dim))


def _state_tensors(c: GatedDeltaNetConfig, batch_size: int) -> list[StateTensor]:
    return [
        StateTensor("conv", "conv", (batch_size, c.conv_dim, c.conv_kernel - 1)),
        StateTensor("recurrent", "recurrent", (batch_size, c.num_value_heads, c.key_head_dim, c.value_head_dim)),
    ]
