"""``Linear``: nn.Linear (same parameters, same state dict) whose few-row calls, i.e. decoding, run
the memory-bound kernel of ``hybridlm.ops.native``; larger inputs and autograd take ``F.linear``."""

from __future__ import annotations

from torch import Tensor, nn

from hybridlm.ops import native


class Linear(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return native.linear(x, self.weight, self.bias)
