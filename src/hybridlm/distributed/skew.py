"""A workload knob that unbalances expert routing: a fixed per-expert offset on every MoE router's logits.

Legend: E experts of a block, N tokens.

``apply_routing_skew(model, skew=S, seed=0)`` attaches from outside (the model stays pure). For each MoE
block it draws a random order of the experts (seeded, so every rank draws the same) and adds

    offset_e = -S * spread * log(1 + position of expert e in that order)

to the router's logits, where ``spread`` is the block's own router logit spread: the standard deviation
of its logits across experts, averaged over the tokens of one fixed random batch (measured once, at
apply time). Under softmax scoring the router's probabilities become p_e * (position + 1)^-(S * spread):
a Zipf law laid over the model's own preferences. Measuring S in units of the spread keeps the knob
gradual whatever the router's scale: a randomly initialised router's logits differ by ~0.1, so a bare
-log(1 + position) would fix every token's top-k on the first experts of the order already at S = 0.5.
With it, debug-small's max / mean tokens per expert (16 experts, top-2; 4 x 64 random tokens, mean over
its 8 MoE blocks) goes 1.9, 3.2, 5.3, 7.6, 8.0 for S = 0, 0.5, 1, 2, 4 (8: every token on two experts).
Under sigmoid scoring (Nemotron-H, DeepSeek-V3) the experts are chosen by sigmoid(logit + offset) (+ the
expert bias), so the experts late in the order are chosen ever less. S = 0 adds nothing. For S > 0 the
model computes something else: its routing, and so its outputs, change. It is a load generator, not a
model setting.

Why a hook and a buffer: the MoE block gets its router logits either by calling its ``Router`` (prefill,
training, other dtypes) or, decoding in fp32, by reading the router's ``weight`` and ``bias`` into one
fused projection with the shared expert (``MoE._fused_input_projections``). The offset reaches the first
as a forward hook on the router and the second as a ``bias`` buffer (not saved with the weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


def check_routing_skew(skew: float) -> None:
    """A ValueError naming --routing-skew for a value that is not a finite number >= 0."""
    if not (math.isfinite(skew) and skew >= 0):
        raise ValueError(f"--routing-skew {skew:g}: give an exponent >= 0 (0 = no skew; 0.5-4 = ever hotter experts)")


def zipf_offsets(num_experts: int, skew: float, generator: torch.Generator) -> Tensor:
    """offset_E [E] (fp32): -skew * log(1 + position of each expert in a random order drawn from ``generator``)."""
    order_E = torch.randperm(num_experts, generator=generator)  # order_E[i]: the expert at position i
    position_E = torch.empty(num_experts, dtype=torch.int64)
    position_E[order_E] = torch.arange(num_experts)
    return -skew * torch.log1p(position_E.to(torch.float32))


@dataclass
class RoutingSkew:
    """The offsets a model's routers carry (``offsets[layer index]``, [E] each); ``remove()`` takes them off."""

    skew: float
    seed: int
    offsets: dict[int, Tensor] = field(default_factory=dict)
    _routers: list[nn.Module] = field(default_factory=list, repr=False)
    _hooks: list = field(default_factory=list, repr=False)

    def hottest_experts(self, layer: int, count: int = 3) -> list[int]:
        """The experts of block ``layer`` the skew favours most, hottest first."""
        return torch.argsort(self.offsets[layer], descending=True, stable=True)[:count].tolist()

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        for router in self._routers:
            del router.bias
        self._hooks, self._routers = [], []


def apply_routing_skew(model: nn.Module, skew: float, seed: int = 0) -> RoutingSkew:
    """Add a Zipf offset of exponent ``skew`` (in units of each block's router logit spread) to the router
    logits of every MoE block of ``model`` (a HybridLM, sharded or not). The expert order of each block is
    drawn from ``seed``, block after block. Measuring the spread runs the model once on a fixed batch, so
    on a sharded model every rank must call this together, with the same ``seed``. Returns the handle
    that removes the offsets."""
    check_routing_skew(skew)
    moe_blocks = [block for block in model.layers if block.routes_experts]
    if not moe_blocks:
        raise ValueError(
            f"--routing-skew {skew}: the model has no MoE blocks (pattern {model.config.pattern!r}): nothing to skew"
        )
    routers = {block.index: block.mixer.gate for block in moe_blocks}
    if any(hasattr(router, "bias") for router in routers.values()):
        raise ValueError("the model's routers already carry a logit offset (a routing skew is applied)")
    spreads = router_logit_spreads(model, routers, seed)
    generator = torch.Generator().manual_seed(seed)
    handle = RoutingSkew(skew, seed)
    for index, router in routers.items():
        offset_E = spreads[index] * zipf_offsets(router.weight.shape[0], skew, generator)
        offset_E = offset_E.to(router.weight.device)
        router.register_buffer("bias", offset_E, persistent=False)  # read by the fused decode projection
        handle._hooks.append(router.register_forward_hook(_add_offset))
        handle._routers.append(router)
        handle.offsets[index] = offset_E
    return handle


CALIBRATION_SHAPE = (2, 32)  # the fixed random batch the logit spreads are measured on: [B, T]


@torch.no_grad()
def router_logit_spreads(model: nn.Module, routers: dict[int, nn.Module], seed: int = 0) -> dict[int, float]:
    """{block index: mean over tokens of the std across experts of its router logits} on a fixed random
    batch drawn from ``seed``. The logits are recomputed from each MoE block's input (a pre-hook), since
    a short input's logits come out of a fused projection, not a call of the router."""
    ids = torch.randint(0, model.config.vocab_size, CALIBRATION_SHAPE, generator=torch.Generator().manual_seed(seed))
    spreads: dict[int, float] = {}

    def measure(index: int, router: nn.Module):
        def hook(moe: nn.Module, inputs: tuple) -> None:
            x_BTD = inputs[0]
            logits_NE = router(x_BTD.reshape(-1, x_BTD.shape[-1]))
            spreads[index] = float(logits_NE.float().std(dim=-1).mean())

        return hook

    blocks = {block.index: block for block in model.layers}
    hooks = [blocks[index].mixer.register_forward_pre_hook(measure(index, r)) for index, r in routers.items()]
    was_training = model.training
    try:
        model.eval()
        model(ids.to(model.device))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return spreads


def _add_offset(router: nn.Module, inputs: tuple, logits_NE: Tensor) -> Tensor:
    return logits_NE + router.bias.to(logits_NE.dtype)
