"""Expert load: what each MoE block routed in a training step, how even it was, and DeepSeek-V3's
auxiliary-loss-free balancing.

Aux-loss-free balancing (DeepSeek-V3 technical report, section 2.1.2): each router keeps a bias per
expert that is added to the scores only to choose the top-k experts (``e_score_correction_bias``;
the combine weights come from the unbiased scores). After every optimizer step each bias moves by a
fixed ``rate`` towards balance: up for an expert that got fewer tokens than the mean, down for one
that got more, ``bias += rate * sign(mean_load - load)``. No gradient flows through it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hybridlm.model import HybridLM


def moe_blocks(model: HybridLM) -> list:
    return [block for block in model.layers if block.routes_experts]


def check_aux_loss_free(model: HybridLM) -> None:
    """A ValueError unless every MoE block's router has an expert bias to move."""
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError("aux_loss_free balancing needs MoE blocks ('E' in the pattern); this model has none")
    if any(block.mixer.gate.e_score_correction_bias is None for block in blocks):
        raise ValueError("aux_loss_free balancing needs the router's expert bias: set moe.use_expert_bias = true")


class ExpertLoad:
    """Tokens per expert of every MoE block, summed over the forward calls of one step."""

    def __init__(self, model: HybridLM) -> None:
        self.blocks = moe_blocks(model)
        self.counts: dict[int, Tensor] = {}

    def reset(self) -> None:
        self.counts = {}

    def add_last_forward(self) -> None:
        """Add what each MoE block routed in the model's last forward call."""
        for block in self.blocks:
            counts = block.mixer.last_tokens_per_expert
            if counts is None:
                continue
            counts = counts.detach().to("cpu", torch.int64)
            previous = self.counts.get(block.index)
            self.counts[block.index] = counts if previous is None else previous + counts

    def max_over_mean(self) -> float | None:
        """max / mean tokens per expert, averaged over the MoE blocks (1.0 = perfectly even); None
        without MoE blocks."""
        ratios = [float(c.max()) / float(c.float().mean()) for c in self.counts.values() if int(c.sum()) > 0]
        return sum(ratios) / len(ratios) if ratios else None


@torch.no_grad()
def update_expert_bias(model: HybridLM, load: ExpertLoad, rate: float) -> None:
    """One aux-loss-free step: each router's bias += rate * sign(mean load - load)."""
    for block in load.blocks:
        counts = load.counts.get(block.index)
        bias = block.mixer.gate.e_score_correction_bias
        if counts is None or bias is None:
            continue
        counts = counts.to(bias.device, torch.float32)
        bias += rate * torch.sign(counts.mean() - counts).to(bias.dtype)
