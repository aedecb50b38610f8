"""Mamba-2 mixer (Dao & Gu 2024), with the parameter names of mamba_ssm / Nemotron-H checkpoints.

in_proj -> [z | xBC | dt]; causal depthwise conv + silu over xBC; SSD scan over (x, B, C) with
dt = softplus(dt + dt_bias) and A = -exp(A_log); gated group-wise RMSNorm with z; out_proj.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hybridlm.cache import ForwardContext, RecurrentState
from hybridlm.layers.base import BlockModule, BlockParams, StateTensor, allocate, linear_params
from hybridlm.layers.linear import Linear
from hybridlm.layers.norm import GatedRMSNorm
from hybridlm.layers.short_conv import conv_sequence, conv_step
from hybridlm.ops import cuda_kernels, native
from hybridlm.ops.precision import upcast
from hybridlm.ops.ssd import ssd_chunked, ssd_step

if TYPE_CHECKING:
    from hybridlm.config import HybridConfig, Mamba2Config


# The SSD's chunk length is a speed choice, not part of the model: 64 ran the op ~20% faster than the
# checkpoints' 128 on CPU (prefill 1.21x -> 1.30x transformers' at 512 tokens, benchmarks/bench_decode).
FASTEST_SSD_CHUNK = 64


class Mamba2Mixer(BlockModule):
    def __init__(self, hidden_size: int, config: Mamba2Config, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.config = c = config
        inner, conv_dim, H = c.intermediate_size, c.conv_dim, c.num_heads
        self.in_proj = Linear(hidden_size, inner + conv_dim + H, bias=c.use_bias)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, c.conv_kernel, groups=conv_dim, bias=c.use_conv_bias)
        self.dt_bias = nn.Parameter(_init_dt_bias(c))
        self.A_log = nn.Parameter(torch.log(torch.empty(H).uniform_(1.0, 16.0)))
        self.D = nn.Parameter(torch.ones(H))
        self.norm = (
            GatedRMSNorm(inner, inner // c.num_groups, norm_eps, c.norm_before_gate) if c.has_gated_norm else None
        )
        self.out_proj = Linear(inner, hidden_size, bias=c.use_bias)

    @classmethod
    def from_config(cls, config: HybridConfig) -> Mamba2Mixer:
        return cls(config.hidden_size, config.mamba2, config.norm_eps)

    @staticmethod
    def count_params(config: HybridConfig) -> BlockParams:
        d, m = config.hidden_size, config.mamba2
        n = linear_params(d, m.intermediate_size + m.conv_dim + m.num_heads, m.use_bias)  # in_proj
        n += m.conv_dim * m.conv_kernel + (m.conv_dim if m.use_conv_bias else 0)
        n += 3 * m.num_heads + (m.intermediate_size if m.has_gated_norm else 0)  # dt_bias, A_log, D; gated norm
        n += linear_params(m.intermediate_size, d, m.use_bias)  # out_proj
        return BlockParams(n, n)

    @staticmethod
    def state_tensors(config: HybridConfig, batch_size: int, max_seq_len: int) -> list[StateTensor]:
        return _state_tensors(config.mamba2, batch_size)

    def new_state(self, batch_size: int, max_seq_len: int, device: torch.device, dtype: torch.dtype) -> RecurrentState:
        return RecurrentState(**allocate(_state_tensors(self.config, batch_size), device, dtype))

    def step(self, x: Tensor, context: ForwardContext, state: RecurrentState) -> Tensor:
        """One decoding token per slot: x [B, hidden] -> [B, hidden]; ``state`` is updated in place."""
        c = self.config
        B = x.shape[0]
        z, xBC, dt = self.in_proj(x).split([c.intermediate_size, c.conv_dim, c.num_heads], dim=-1)
        xBC = conv_step(xBC, state.conv, self.conv1d)
        if native.mamba2_scan_applies(xBC, dt, state.recurrent, self.dt_bias, self.A_log, self.D):
            y = native.mamba2_scan_(xBC, dt, self.dt_bias, self.A_log, self.D, c.time_step_limit, state.recurrent)
            y = self.norm(y, z) if self.norm is not None else y * F.silu(z)
            return self.out_proj(y)
        G, N = c.num_groups, c.state_size
        xs, Bs, Cs = xBC.split([c.intermediate_size, G * N, G * N], dim=-1)
        dt = self._time_step(dt)
        y, new_state = ssd_step(
            xs.view(B, c.num_heads, c.head_dim),
            dt,
            -torch.exp(upcast(self.A_log)),
            Bs.view(B, G, N),
            Cs.view(B, G, N),
            self.D,
            state.recurrent,
        )
        state.recurrent.copy_(new_state)
        y = y.reshape(B, c.intermediate_size)
        y = self.norm(y, z) if self.norm is not None else y * F.silu(z)
        return self.out_proj(y)

    def _time_step(self, dt: Tensor) -> Tensor:
        """softplus(dt + dt_bias), clamped to the configured time_step_limit."""
        dt = F.softplus(upcast(dt) + upcast(self.dt_bias))
        low, high = self.config.time_step_limit
        if low > 0.0 or high < math.inf:
            dt = dt.clamp(low, high)
        return dt

    def forward(self, x: Tensor, context: ForwardContext, state: RecurrentState | None = None) -> Tensor:
        """x: [B, T, hidden] -> [B, T, hidden]; updates ``state`` in place when given."""
        c = self.config
        B, T, _ = x.shape
        if state is not None and T == 1 and context.token_mask is None:
            return self.step(x[:, 0], context, state)[:, None]
        inner, conv_dim = c.intermediate_size, c.conv_dim
        z, xBC, dt = self.in_proj(x).split([inner, conv_dim, c.num_heads], dim=-1)
        mask = context.token_mask
        if mask is not None:  # left padding must not leak into the state: zero it before and after the conv
            xBC = xBC.masked_fill(~mask[..., None], 0.0)

        xBC = conv_sequence(xBC, None if state is None else state.conv, self.conv1d)
        if mask is not None:
            xBC = xBC.masked_fill(~mask[..., None], 0.0)

        if state is not None:
            recurrent = state.recurrent
        else:  # in the compute dtype: fp32, or fp64 for fp64 inputs
            shape = (B, c.num_heads, c.head_dim, c.state_size)
            recurrent = xBC.new_zeros(shape, dtype=torch.promote_types(xBC.dtype, torch.float32))
        xBC_rows, dt_rows = xBC.reshape(B * T, conv_dim), dt.reshape(B * T, c.num_heads)
        if native.mamba2_scan_applies(xBC_rows, dt_rows, recurrent, self.dt_bias, self.A_log, self.D):
            # inference in fp32 on CPU: token by token, the state updated in place and kept in cache
            y = native.mamba2_scan_(xBC_rows, dt_rows, self.dt_bias, self.A_log, self.D, c.time_step_limit, recurrent)
        else:
            G, N = c.num_groups, c.state_size
            xs, Bs, Cs = xBC.split([inner, G * N, G * N], dim=-1)
            xs = xs.view(B, T, c.num_heads, c.head_dim)
            Bs, Cs = Bs.view(B, T, G, N), Cs.view(B, T, G, N)
            A = -torch.exp(upcast(self.A_log))
            fast = cuda_kernels.ssd(xs.device)  # mamba_ssm's Triton SSD, where it matched the reference here
            # the torch chunked form is exact for any chunk size and fastest at FASTEST_SSD_CHUNK
            run, chunk_size = (fast, c.chunk_size) if fast else (ssd_chunked, min(c.chunk_size, FASTEST_SSD_CHUNK))
            y, recurrent = run(xs, self._time_step(dt), A, Bs, Cs, self.D, recurrent, chunk_size=chunk_size)
        if state is not None:
            state.recurrent.copy_(recurrent)
        y = y.reshape(B, T, inner)
        y = self.norm(y, z) if self.norm is not None else y * F.silu(z)
        return self.out_proj(y)


def _init_dt_bias(c: Mamba2Config) -> Tensor:
    """Inverse softplus of dt drawn log-uniformly in [time_step_min, time_step_max] (mamba_ssm init)."""
    dt = torch.exp(
        torch.rand(c.num_heads) * (math.log(c.time_step_max) - math.log(c.time_step_min)) + math.log(c.time_step_min)
    ).clamp(min=c.time_step_floor)
    return dt + torch.log(-torch.expm1(-dt))


def _state_tensors(c: Mamba2Config, batch_size: int) -> list[StateTensor]:
    return [
        StateTensor("conv", "conv", (batch_size, c.conv_dim, c.conv_kernel - 1)),
        StateTensor("recurrent", "recurrent", (batch_size, c.num_heads, c.head_dim, c.state_size)),
    ]
