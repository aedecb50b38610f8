"""What every block module tells the registry (``hybridlm.blocks``) about itself, from the config alone.

A block type is one module class: it builds itself from a ``HybridConfig`` and answers, without
allocating anything, how many parameters it has and which state tensors it keeps while generating.
``accounting`` reads those answers to cost a model that was never built; ``new_state`` allocates
exactly the tensors ``state_tensors`` describes, so the two cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from hybridlm.ops.precision import state_dtype

if TYPE_CHECKING:
    from typing import Self

    from hybridlm.cache import ForwardContext
    from hybridlm.config import HybridConfig


@dataclass(frozen=True)
class StateTensor:
    """One tensor a block keeps between forward calls.

    ``name`` is the field of the block's state class (``key``, ``value``, ``conv``, ``recurrent``);
    ``kind`` is how accounting and ``info`` group the bytes. Recurrent states are kept in fp32
    (at least) whatever the weight dtype: a bf16 state drifts into gibberish after a few dozen steps.
    """

    name: str
    kind: Literal["kv", "conv", "recurrent"]
    shape: tuple[int, ...]

    @property
    def is_fp32(self) -> bool:
        return self.kind == "recurrent"

    def dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        return state_dtype(weight_dtype) if self.is_fp32 else weight_dtype

    def nbytes(self, weight_dtype: torch.dtype) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * torch.empty((), dtype=self.dtype(weight_dtype)).element_size()


@dataclass(frozen=True)
class BlockParams:
    """Parameters of a block: from its module alone (``count_params``), or with its pre-norm (accounting's
    ``block_params``); ``active`` < ``total`` only for MoE."""

    total: int
    active: int


class BlockModule(nn.Module):
    """Base of the module behind each pattern character (``hybridlm.blocks.BLOCKS``)."""

    @classmethod
    def from_config(cls, config: HybridConfig) -> Self:
        raise NotImplementedError

    @staticmethod
    def count_params(config: HybridConfig) -> BlockParams:
        raise NotImplementedError

    @staticmethod
    def state_tensors(config: HybridConfig, batch_size: int, max_seq_len: int) -> list[StateTensor]:
        return []

    @staticmethod
    def context_flops(config: HybridConfig, context: int) -> int:
        """FLOPs per generated token that grow with the context (attention scores); 0 for the rest."""
        return 0

    def new_state(self, batch_size: int, max_seq_len: int, device: torch.device, dtype: torch.dtype) -> object:
        """Zeroed generation state for ``batch_size`` slots of up to ``max_seq_len`` tokens (None: stateless)."""
        return None

    def step(self, x: Tensor, context: ForwardContext, state: object) -> Tensor:
        """Sequence mixers: one decoding token per slot, x [B, hidden] -> [B, hidden], updating ``state``
        (the object ``new_state`` made) in place; each slot at its own position (``context.positions``)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no state: it has no decoding step")


def allocate(tensors: list[StateTensor], device: torch.device, weight_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Zeroed tensors for ``state_tensors``' description, by field name."""
    return {t.name: torch.zeros(t.shape, device=device, dtype=t.dtype(weight_dtype)) for t in tensors}


def linear_params(fan_in: int, fan_out: int, bias: bool = False) -> int:
    return fan_in * fan_out + (fan_out if bias else 0)


def mlp_params(hidden: int, intermediate: int, activation: str, bias: bool = False) -> int:
    """SwiGLU: gate, up, down; squared ReLU: up, down."""
    num_proj = 3 if activation == "swiglu" else 2
    biases = (num_proj - 1) * intermediate + hidden if bias else 0
    return num_proj * hidden * intermediate + biases
