"""Compute precision: half types are raised to fp32 for sensitive math; fp64 stays fp64."""

from __future__ import annotations

import torch
from torch import Tensor


def upcast(x: Tensor) -> Tensor:
    """x in at least fp32 (bf16/fp16 -> fp32; fp32 and fp64 unchanged, without a dispatched call:
    decoding calls this a hundred times per step)."""
    if x.dtype in _AT_LEAST_FP32:
        return x
    return x.to(torch.promote_types(x.dtype, torch.float32))


_AT_LEAST_FP32 = (torch.float32, torch.float64)


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype recurrent states are kept in for a model of ``dtype``: at least fp32."""
    return torch.promote_types(dtype, torch.float32)
