"""Dense feed-forward blocks: SwiGLU (Llama/Qwen) and squared-ReLU (Nemotron-H)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from hybridlm.layers.base import BlockModule, BlockParams, mlp_params
from hybridlm.layers.linear import Linear
from hybridlm.ops import native
from hybridlm.ops.moe import relu_squared

if TYPE_CHECKING:
    from hybridlm.config import Activation, HybridConfig


class MLP(BlockModule):
    """swiglu: down(silu(gate(x)) * up(x)); relu2: down(relu(up(x)) ** 2)."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: Activation, bias: bool = False) -> None:
        super().__init__()
        if activation not in ("swiglu", "relu2"):
            raise ValueError(f"MLP activation must be 'swiglu' or 'relu2', got {activation!r}")
        self.activation = activation
        if activation == "swiglu":
            self.gate_proj = Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)

    @classmethod
    def from_config(cls, config: HybridConfig) -> MLP:
        m = config.mlp
        return cls(config.hidden_size, m.intermediate_size, m.activation, m.bias)

    @staticmethod
    def count_params(config: HybridConfig) -> BlockParams:
        m = config.mlp
        n = mlp_params(config.hidden_size, m.intermediate_size, m.activation, m.bias)
        return BlockParams(n, n)

    @property
    def input_projections(self) -> list[Linear]:
        """The projections that read the block's input (gate then up for swiglu; up for relu2)."""
        return [self.gate_proj, self.up_proj] if self.activation == "swiglu" else [self.up_proj]

    def from_projections(self, h: Tensor) -> Tensor:
        """The output from the input projections' outputs joined on the last dim (see ``input_projections``)."""
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            return self.down_proj(native.swiglu(gate, up))
        return self.down_proj(relu_squared(h))

    def forward(self, x: Tensor) -> Tensor:
        if self.activation == "swiglu":
            return self.down_proj(native.swiglu(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(relu_squared(self.up_proj(x)))
