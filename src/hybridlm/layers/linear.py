"""``Linear``: nn.Linear (same parameters, same state dict) whose few-row calls, i.e. decoding, run
the memory-bound kernel of ``hybridlm.ops.native``; larger inputs and autograd take ``F.linear``.
``project``: several projections of one input, in one kernel call where one applies."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from hybridlm.ops import native


class Linear(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return native.linear(x, self.weight, self.bias)


def project(x: Tensor, projections: Sequence[nn.Linear]) -> list[Tensor]:
    """Each projection of x. One kernel call for all where ``native.fuses_projections`` says one applies
    (decoding; fp32 prefill on CPU, as tiles on the kernels' pool), else one ``F.linear`` each (autograd,
    other dtypes and devices): the outputs are then views into one [..., sum of widths] tensor."""
    weights, biases = [p.weight for p in projections], [p.bias for p in projections]
    if native.fuses_projections(x, weights, biases):
        return list(native.fused_projections(x, weights, biases).split([p.out_features for p in projections], -1))
    return [p(x) for p in projections]
