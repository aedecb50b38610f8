"""RMSNorm and the gated, group-wise RMSNorm of Mamba-2 and Gated DeltaNet outputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hybridlm.ops import native
from hybridlm.ops.precision import upcast


class RMSNorm(nn.Module):
    """y = x / rms(x) * w, or * (1 + w) when zero-centred (Qwen3-Next), computed in at least fp32."""

    def __init__(self, dim: int, eps: float = 1e-5, is_zero_centered: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.is_zero_centered = is_zero_centered
        self.weight = nn.Parameter(torch.zeros(dim) if is_zero_centered else torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if native.rms_norm_applies(x, self.weight):  # one kernel call instead of eight ops (no autograd)
            return native.rms_norm(x, self.weight, self.eps, x.shape[-1], self.is_zero_centered, None, False)
        x_up = upcast(x)
        x_up = x_up * torch.rsqrt(x_up.pow(2).mean(-1, keepdim=True) + self.eps)
        weight = upcast(self.weight)
        scale = 1.0 + weight if self.is_zero_centered else weight
        return (x_up * scale).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """RMSNorm over groups of ``group_size`` channels, gated by silu(z).

    ``norm_before_gate=False`` (Mamba-2, Nemotron-H): y = norm(x * silu(z)) * w.
    ``norm_before_gate=True`` (Gated DeltaNet, Qwen3-Next): y = norm(x) * w * silu(z).
    """

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5, norm_before_gate: bool = False) -> None:
        super().__init__()
        if dim % group_size:
            raise ValueError(f"GatedRMSNorm: dim {dim} is not a multiple of group_size {group_size}")
        self.eps = eps
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        if native.rms_norm_applies(x, self.weight) and z.dtype == x.dtype:
            return native.rms_norm(x, self.weight, self.eps, self.group_size, False, z, not self.norm_before_gate)
        dtype = x.dtype
        x = upcast(x)
        gate = F.silu(upcast(z))
        if not self.norm_before_gate:
            x = x * gate
        grouped = x.unflatten(-1, (-1, self.group_size))
        grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.eps)
        x = grouped.flatten(-2) * upcast(self.weight)
        if self.norm_before_gate:
            x = x * gate
        return x.to(dtype)
