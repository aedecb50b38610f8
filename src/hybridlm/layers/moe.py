"""Mixture-of-Experts FFN: router, routed experts, optional shared experts.

Router in fp32 with softmax or sigmoid scoring; an expert bias (DeepSeek-V3 / Nemotron
``e_score_correction_bias``) only chooses experts, the weights come from the unbiased scores.
Expert weights are stacked 3-D tensors in nn.Linear layout, as transformers v5 stores them.

Legend: N tokens, D hidden, E experts, K experts per token, I expert intermediate size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from hybridlm.layers.base import BlockModule, BlockParams, mlp_params
from hybridlm.layers.linear import Linear
from hybridlm.layers.mlp import MLP
from hybridlm.ops import native
from hybridlm.ops.moe import (
    moe_experts_few_tokens,
    moe_experts_grouped,
    moe_experts_sync_free,
    route,
    sync_free_applies,
    tokens_per_expert,
)
from hybridlm.ops.precision import upcast

if TYPE_CHECKING:
    from hybridlm.config import HybridConfig, MoEConfig


class Router(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, use_expert_bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        nn.init.normal_(self.weight, std=0.02)
        if use_expert_bias:  # adjusted by a balancing rule, not by gradients
            self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts), requires_grad=False)
        else:
            self.e_score_correction_bias = None

    def forward(self, x_ND: Tensor) -> Tensor:
        return native.linear(upcast(x_ND), upcast(self.weight))  # router logits (N, E), at least fp32


class Experts(nn.Module):
    # Whether this module holds every routed expert of the block. The MoE block's decode kernel routes
    # and runs the experts in one call, so it applies only then; expert parallelism (hybridlm.distributed)
    # replaces this module with one that holds a slice and says False.
    holds_all_experts = True

    def __init__(self, hidden_size: int, config: MoEConfig) -> None:
        super().__init__()
        self.activation = config.activation
        E, I, D = config.num_experts, config.intermediate_size, hidden_size
        if config.activation == "swiglu":
            self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, D))  # first I rows gate, last I up
        else:
            self.up_proj = nn.Parameter(torch.empty(E, I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))

    @property
    def input_proj(self) -> Tensor:
        return self.gate_up_proj if self.activation == "swiglu" else self.up_proj

    def forward(self, x_ND: Tensor, topk_ids_NK: Tensor, topk_weights_NK: Tensor) -> Tensor:
        # Decoding (a few tokens): the CPU kernel streams each chosen expert once, else a torch form
        # without a host synchronisation; prefill: grouped matmuls.
        pairs, up, down = topk_ids_NK.numel(), self.input_proj, self.down_proj
        if native.expert_linear_applies(x_ND, pairs, up):
            run = moe_experts_few_tokens
        elif sync_free_applies(x_ND, pairs, up, down):
            run = moe_experts_sync_free
        else:
            run = moe_experts_grouped
        return run(x_ND, topk_ids_NK, topk_weights_NK.to(x_ND.dtype), up, down, self.activation)


class MoE(BlockModule):
    """After a forward: ``last_tokens_per_expert`` [E] and, in training, ``last_aux_loss`` (a scalar)."""

    def __init__(self, hidden_size: int, config: MoEConfig) -> None:
        super().__init__()
        self.config = c = config
        self.gate = Router(hidden_size, c.num_experts, c.use_expert_bias)
        self.experts = Experts(hidden_size, c)
        if c.num_shared_experts:
            shared_size = c.num_shared_experts * c.shared_intermediate_size
            self.shared_experts = MLP(hidden_size, shared_size, c.activation)
            self.shared_expert_gate = Linear(hidden_size, 1, bias=False) if c.has_shared_expert_gate else None
        else:
            self.shared_experts = None
        self.last_tokens_per_expert: Tensor | None = None
        self.last_aux_loss: Tensor | None = None

    @classmethod
    def from_config(cls, config: HybridConfig) -> MoE:
        return cls(config.hidden_size, config.moe)

    @staticmethod
    def count_params(config: HybridConfig) -> BlockParams:
        """Active per token: the router, the shared experts and ``num_experts_per_tok`` routed experts."""
        d, e = config.hidden_size, config.moe
        router = e.num_experts * d + (e.num_experts if e.use_expert_bias else 0)
        per_expert = mlp_params(d, e.intermediate_size, e.activation)
        shared = 0
        if e.num_shared_experts:
            shared = mlp_params(d, e.num_shared_experts * e.shared_intermediate_size, e.activation)
            shared += d if e.has_shared_expert_gate else 0
        fixed = router + shared
        return BlockParams(fixed + e.num_experts * per_expert, fixed + e.num_experts_per_tok * per_expert)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, T, D] -> [B, T, D]."""
        c = self.config
        x_ND = x.reshape(-1, x.shape[-1])
        shared_ND = shared_gate_N1 = None
        if self._fuses_input_projections(x_ND):
            if not self.training and self.experts.holds_all_experts:
                result = self._block_kernel(x_ND)
                if result is not None:  # routing, routed and shared experts in one kernel call
                    out_ND, self.last_tokens_per_expert = result
                    self.last_aux_loss = None
                    return out_ND.view_as(x)
            logits_NE, shared_ND, shared_gate_N1 = self._fused_input_projections(x_ND)
            if shared_gate_N1 is not None:
                shared_ND = torch.sigmoid(shared_gate_N1) * shared_ND
        else:
            logits_NE = self.gate(x_ND)
        topk_ids_NK, topk_weights_NK, scores_NE = route(
            logits_NE,
            c.num_experts_per_tok,
            scoring=c.scoring,
            expert_bias_E=self.gate.e_score_correction_bias,
            norm_topk_prob=c.norm_topk_prob,
            routed_scaling_factor=c.routed_scaling_factor,
            num_groups=c.num_groups,
            topk_groups=c.topk_groups,
        )
        counts_E = tokens_per_expert(topk_ids_NK, c.num_experts)
        self.last_tokens_per_expert = counts_E
        out_ND = self.experts(x_ND, topk_ids_NK, topk_weights_NK)
        if self.shared_experts is not None:
            if shared_ND is None:
                shared_ND = self.shared_experts(x_ND)
                if self.shared_expert_gate is not None:
                    shared_ND = torch.sigmoid(self.shared_expert_gate(x_ND)) * shared_ND
            out_ND = out_ND + shared_ND
        # Only training forwards carry a loss; an eval forward must not leave a stale one behind.
        self.last_aux_loss = self._aux_loss(logits_NE, scores_NE, counts_E) if self.training else None
        return out_ND.view_as(x)

    def _input_projections(self) -> list[nn.Module]:
        """Everything that reads the block's input: router, shared-expert gate, shared-expert input."""
        modules: list[nn.Module] = [self.gate]
        if self.shared_experts is not None:
            if self.shared_expert_gate is not None:
                modules.append(self.shared_expert_gate)
            modules += self.shared_experts.input_projections
        return modules

    def _fuses_input_projections(self, x_ND: Tensor) -> bool:
        """In fp32 inference (decoding, and prefill on CPU): the router (always fp32) and the shared expert
        read x in one kernel call."""
        modules = self._input_projections()
        return native.fuses_projections(x_ND, [m.weight for m in modules], [getattr(m, "bias", None) for m in modules])

    def _fused_input_projections(
        self, x_ND: Tensor, with_shared: bool = True
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Router logits [N, E], the shared expert's output [N, D] and its gate's logit [N, 1] (None where
        absent or not ``with_shared``; the output is to be scaled by sigmoid(gate)), from one pass over the
        input weights."""
        has_gate = self.shared_experts is not None and self.shared_expert_gate is not None
        modules = self._input_projections()
        if not with_shared:
            modules = modules[: 1 + has_gate]  # the router and the gate
        fused = native.fused_projections(
            x_ND, [m.weight for m in modules], [getattr(m, "bias", None) for m in modules]
        )  # only after _fuses_input_projections said yes
        E = self.config.num_experts
        logits_NE = fused[:, :E]
        gate_N1 = fused[:, E : E + 1] if has_gate else None
        if self.shared_experts is None or not with_shared:
            return logits_NE, None, gate_N1
        shared_ND = self.shared_experts.from_projections(fused[:, E + has_gate :])  # gate and up side by side
        return logits_NE, shared_ND, gate_N1

    def _block_kernel(self, x_ND: Tensor) -> tuple[Tensor, Tensor] | None:
        """The block's output [N, D] and tokens per expert [E] from ``native.moe_block`` where it applies, else
        None. Decoding: the router and the shared expert's input in one pass first, then one call for the rest.
        A prompt: the router (and gate) first, then one call that runs the shared expert in the routed experts'
        passes."""
        c = self.config
        experts = (self.experts.input_proj, self.experts.down_proj)
        routing = (c.num_experts_per_tok, c.scoring, self.gate.e_score_correction_bias, c.norm_topk_prob)
        settings = (*routing, c.routed_scaling_factor, *experts, c.activation)
        if native.moe_decode_applies(x_ND, c.num_experts_per_tok, *experts, c.num_groups):
            logits_NE, shared_ND, gate_N1 = self._fused_input_projections(x_ND)
            result = native.moe_block(x_ND, logits_NE, *settings, shared_ND, gate_N1)
        else:
            shared = self._shared_projections()
            if shared is None or not native.moe_prefill_applies(
                x_ND, c.num_experts_per_tok, *experts, c.num_groups, shared
            ):
                return None
            logits_NE, _, gate_N1 = self._fused_input_projections(x_ND, with_shared=False)
            result = native.moe_block(x_ND, logits_NE, *settings, None, gate_N1, shared)
        return None if result is None else (result[0], result[3])

    def _shared_projections(self) -> tuple[Tensor, ...] | None:
        """The shared expert's weights for the prefill kernel: (gate, up, down) for swiglu, (up, down) for relu2;
        () without a shared expert; None where a projection has a bias (the kernel takes none)."""
        mlp = self.shared_experts
        if mlp is None:
            return ()
        projections = [*mlp.input_projections, mlp.down_proj]
        return None if any(p.bias is not None for p in projections) else tuple(p.weight for p in projections)

    def _aux_loss(self, logits_NE: Tensor, scores_NE: Tensor, counts_E: Tensor) -> Tensor:
        """Load balancing (Switch Transformer eq. 4: E * sum_e f_e * P_e) + router z-loss (ST-MoE eq. 5)."""
        c = self.config
        fraction_E = counts_E.float() / counts_E.sum().clamp_min(1)
        probs_NE = scores_NE / scores_NE.sum(-1, keepdim=True).clamp_min(1e-20)  # sigmoid scores normalised
        balance = c.num_experts * (fraction_E * probs_NE.mean(0)).sum()
        z_loss = torch.logsumexp(logits_NE, dim=-1).square().mean()
        return c.aux_loss_coef * balance + c.z_loss_coef * z_loss
