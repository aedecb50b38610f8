"""MoE against a per-token loop: router scores, expert choice, weighted expert outputs, shared experts, aux loss."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from hybridlm.config import MoEConfig
from hybridlm.layers.moe import MoE
from hybridlm.ops.moe import grouped_mm_supported
from tests.helpers import assert_close
from tests.layers.common import assert_finite_grads, gradcheck_layer, params64

HIDDEN = 12

CONFIGS = {
    "softmax-top2-norm": MoEConfig(num_experts=8, num_experts_per_tok=2, intermediate_size=6),
    "softmax-top3-no-norm-scaled": MoEConfig(
        num_experts=6, num_experts_per_tok=3, intermediate_size=5, norm_topk_prob=False, routed_scaling_factor=2.5
    ),
    "softmax-top1-no-norm": MoEConfig(num_experts=4, num_experts_per_tok=1, intermediate_size=6, norm_topk_prob=False),
    "softmax-top4-of-4": MoEConfig(num_experts=4, num_experts_per_tok=4, intermediate_size=3),
    "sigmoid-top2-norm-bias-scaled": MoEConfig(
        num_experts=8,
        num_experts_per_tok=2,
        intermediate_size=6,
        scoring="sigmoid",
        use_expert_bias=True,
        routed_scaling_factor=2.5,
    ),
    "sigmoid-grouped-G4-keep2-top3-bias": MoEConfig(
        num_experts=8,
        num_experts_per_tok=3,
        intermediate_size=6,
        scoring="sigmoid",
        use_expert_bias=True,
        num_groups=4,
        topk_groups=2,
        routed_scaling_factor=1.5,
    ),
    "softmax-grouped-G6-keep3-groups-of-1": MoEConfig(
        num_experts=6, num_experts_per_tok=2, intermediate_size=6, num_groups=6, topk_groups=3
    ),
    "sigmoid-no-norm": MoEConfig(
        num_experts=6, num_experts_per_tok=2, intermediate_size=6, scoring="sigmoid", norm_topk_prob=False
    ),
    "relu2-sigmoid-bias-shared": MoEConfig(  # Nemotron-H
        num_experts=8,
        num_experts_per_tok=3,
        intermediate_size=7,
        activation="relu2",
        scoring="sigmoid",
        use_expert_bias=True,
        routed_scaling_factor=2.5,
        num_shared_experts=1,
        shared_intermediate_size=10,
    ),
    "softmax-shared-gated": MoEConfig(  # Qwen3-Next
        num_experts=8,
        num_experts_per_tok=2,
        intermediate_size=6,
        num_shared_experts=1,
        shared_intermediate_size=9,
        has_shared_expert_gate=True,
    ),
    "softmax-2-shared": MoEConfig(
        num_experts=6, num_experts_per_tok=2, intermediate_size=6, num_shared_experts=2, shared_intermediate_size=5
    ),
}


def make_moe(config, hidden=HIDDEN, seed=1, dtype=torch.float32):
    """Every parameter random: experts (left uninitialised by the layer), router, bias, shared experts."""
    moe = MoE(hidden, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in moe.named_parameters():
            fan_in = p.shape[-1]
            std = 0.1 if name == "gate.e_score_correction_bias" else 1.0 if name == "gate.weight" else fan_in**-0.5
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return moe.to(dtype)


def expert_truth(p, activation, e, x_n):
    """One routed expert on one token; weights in nn.Linear layout [out, in]."""
    if activation == "swiglu":
        gate_up = p["experts.gate_up_proj"][e]
        half = gate_up.shape[0] // 2  # first I rows gate, last I rows up
        gate, up = gate_up[:half] @ x_n, gate_up[half:] @ x_n
        hidden = gate * torch.sigmoid(gate) * up
    else:
        hidden = torch.clamp(p["experts.up_proj"][e] @ x_n, min=0) ** 2
    return p["experts.down_proj"][e] @ hidden


def shared_truth(p, activation, x_n):
    if activation == "swiglu":
        gate = p["shared_experts.gate_proj.weight"] @ x_n
        hidden = gate * torch.sigmoid(gate) * (p["shared_experts.up_proj.weight"] @ x_n)
    else:
        hidden = torch.clamp(p["shared_experts.up_proj.weight"] @ x_n, min=0) ** 2
    y = p["shared_experts.down_proj.weight"] @ hidden
    if "shared_expert_gate.weight" in p:
        y = y * torch.sigmoid(p["shared_expert_gate.weight"] @ x_n)
    return y


def choose_experts(c, choice):
    """The K best experts by choice score (a Python list), among the experts of the kept groups."""
    E = len(choice)
    eligible = list(range(E))
    if c.num_groups > 1:
        size = E // c.num_groups
        group_score = []
        for group in range(c.num_groups):
            members = sorted(choice[group * size : (group + 1) * size], reverse=True)
            group_score.append(sum(members[:2]))  # DeepSeek-V3: a group scores its two best experts
        kept = sorted(range(c.num_groups), key=lambda g: group_score[g], reverse=True)[: c.topk_groups]
        eligible = [e for e in range(E) if e // size in kept]
    return sorted(eligible, key=lambda e: choice[e], reverse=True)[: c.num_experts_per_tok]


def moe_truth(moe, x, weights_from_biased_scores=False):
    """float64 per-token loop. Returns (out (B, T, D), counts (E,), aux loss).

    weights_from_biased_scores: a deliberately wrong variant (the expert bias leaking into the weights),
    to show the tests can tell it apart.
    """
    c, p = moe.config, params64(moe)
    x_ND = x.double().reshape(-1, x.shape[-1])
    N, E, K = x_ND.shape[0], c.num_experts, c.num_experts_per_tok
    bias = p.get("gate.e_score_correction_bias", torch.zeros(E, dtype=torch.float64))
    out = torch.zeros_like(x_ND)
    counts = torch.zeros(E, dtype=torch.long)
    probs_sum = torch.zeros(E, dtype=torch.float64)
    z_sum = 0.0
    for n in range(N):
        logits = p["gate.weight"] @ x_ND[n]
        if c.scoring == "softmax":
            scores = torch.exp(logits - logits.max())
            scores = scores / scores.sum()
        else:
            scores = 1 / (1 + torch.exp(-logits))
        choice = scores + bias
        ids = choose_experts(c, choice.tolist())
        weights = (choice if weights_from_biased_scores else scores)[ids]
        if c.norm_topk_prob:
            weights = weights / weights.sum()
        weights = weights * c.routed_scaling_factor
        for e, w in zip(ids, weights, strict=True):
            counts[e] += 1
            out[n] += w * expert_truth(p, c.activation, e, x_ND[n])
        if c.num_shared_experts:
            out[n] += shared_truth(p, c.activation, x_ND[n])
        # aux loss pieces: per-token router probabilities (sigmoid scores normalised to sum 1), log-sum-exp
        probs_sum += scores / scores.sum()
        z_sum += (logits.max() + torch.log(torch.exp(logits - logits.max()).sum())) ** 2
    fraction = counts.double() / (N * K)  # share of the N*K assignments
    balance = E * (fraction * probs_sum / N).sum()
    aux = c.aux_loss_coef * balance + c.z_loss_coef * z_sum / N
    return out.view(x.shape), counts, aux


@pytest.mark.parametrize("shape", [(1, 1), (2, 13)], ids=["N1", "B2-T13"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_moe_matches_per_token_loop(name, shape):
    moe = make_moe(CONFIGS[name])
    x = torch.randn(*shape, HIDDEN)
    y = moe(x)
    expected, counts, _ = moe_truth(moe, x)
    assert y.shape == x.shape
    assert_close(y, expected)
    assert torch.equal(moe.last_tokens_per_expert, counts)
    assert moe.last_tokens_per_expert.sum() == x.shape[0] * x.shape[1] * CONFIGS[name].num_experts_per_tok


@pytest.mark.parametrize("name", ["softmax-top2-norm", "relu2-sigmoid-bias-shared"])
def test_moe_grouped_mm_path_matches_per_token_loop(name):
    """Without autograd and with 16-byte aligned sizes the experts run through F.grouped_mm where torch has it."""
    config = dataclasses.replace(CONFIGS[name], intermediate_size=8, shared_intermediate_size=8)
    moe = make_moe(config, hidden=16)
    x = torch.randn(2, 13, 16)
    with torch.no_grad():
        y = moe(x)
        uses_grouped_mm = grouped_mm_supported(x.view(-1, 16), moe.experts.input_proj, moe.experts.down_proj)
    assert uses_grouped_mm == hasattr(torch.nn.functional, "grouped_mm")
    expected, counts, _ = moe_truth(moe, x)
    assert_close(y, expected)
    assert torch.equal(moe.last_tokens_per_expert, counts)


def test_moe_float64_keeps_float64_precision():
    """A .double() MoE must route in float64 (the router computes in .float(), which downcasts)."""
    moe = make_moe(CONFIGS["sigmoid-top2-norm-bias-scaled"], dtype=torch.float64)
    x = torch.randn(2, 13, HIDDEN, dtype=torch.float64)
    y = moe(x)
    assert y.dtype == torch.float64
    assert_close(y, moe_truth(moe, x)[0])


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_expert_bias_changes_choice_but_not_weights(scoring):
    """A bias on expert 0 pulls tokens to it; the weights stay the unbiased (renormalised) scores."""
    config = MoEConfig(num_experts=6, num_experts_per_tok=2, intermediate_size=6, scoring=scoring, use_expert_bias=True)
    moe = make_moe(config)
    x = torch.randn(2, 13, HIDDEN)
    with torch.no_grad():
        moe.gate.e_score_correction_bias.zero_()
    moe(x)
    counts_unbiased = moe.last_tokens_per_expert.clone()
    with torch.no_grad():
        moe.gate.e_score_correction_bias.copy_(torch.tensor([0.15, 0, 0, 0, 0, 0]))
    y = moe(x)
    # The construction works: the bias moves some, not all, tokens onto expert 0.
    assert 0 < moe.last_tokens_per_expert[0] - counts_unbiased[0] < 26 - counts_unbiased[0]
    expected, counts, _ = moe_truth(moe, x)
    assert torch.equal(moe.last_tokens_per_expert, counts)
    assert_close(y, expected)
    # ... and the test tells the wrong convention (weights from the biased scores) apart.
    wrong, _, _ = moe_truth(moe, x, weights_from_biased_scores=True)
    assert (y.double() - wrong).abs().max() > 1e-3


def test_grouped_topk_excludes_dropped_groups():
    """One group holds the best single expert but a weak partner: the group sum drops it."""
    config = MoEConfig(num_experts=4, num_experts_per_tok=2, intermediate_size=6, num_groups=2, topk_groups=1)
    moe = make_moe(config)
    x = torch.randn(1, 1, HIDDEN)
    direction = x[0, 0] / x[0, 0].norm() ** 2
    with torch.no_grad():  # logits 2.0, -5.0 in group 0; 1.5, 1.4 in group 1
        moe.gate.weight.copy_(torch.tensor([2.0, -5.0, 1.5, 1.4])[:, None] * direction)
    moe(x)
    assert moe.last_tokens_per_expert.tolist() == [0, 0, 1, 1]
    assert torch.equal(moe_truth(moe, x)[1], moe.last_tokens_per_expert)


@pytest.mark.parametrize(
    "name", ["softmax-top2-norm", "sigmoid-top2-norm-bias-scaled", "sigmoid-grouped-G4-keep2-top3-bias"]
)
def test_moe_aux_loss_in_training(name):
    """coef * E * sum_e f_e P_e (f_e: share of the N*K assignments, P_e: mean per-token-normalised score)
    plus z_coef * mean(logsumexp(logits)^2)."""
    config = dataclasses.replace(CONFIGS[name], aux_loss_coef=0.03, z_loss_coef=0.002)
    moe = make_moe(config).train()
    x = torch.randn(2, 13, HIDDEN)
    y = moe(x)
    expected_out, _, expected_aux = moe_truth(moe, x)
    assert_close(y, expected_out)
    assert moe.last_aux_loss.shape == ()
    assert_close(moe.last_aux_loss, expected_aux)


def test_moe_aux_loss_of_a_uniform_router():
    """All logits zero: P_e = 1/E whatever f is, so the balance term is exactly 1 and the z-loss log(E)^2."""
    config = MoEConfig(num_experts=4, num_experts_per_tok=2, intermediate_size=3, aux_loss_coef=0.5, z_loss_coef=0.25)
    moe = make_moe(config).train()
    with torch.no_grad():
        moe.gate.weight.zero_()
    moe(torch.randn(1, 7, HIDDEN))
    assert math.isclose(moe.last_aux_loss.item(), 0.5 + 0.25 * math.log(4) ** 2, rel_tol=1e-6)


def test_moe_no_aux_loss_in_eval():
    moe = make_moe(CONFIGS["softmax-top2-norm"]).eval()
    moe(torch.randn(2, 3, HIDDEN))
    assert moe.last_aux_loss is None


@pytest.mark.parametrize(
    "name", ["sigmoid-grouped-G4-keep2-top3-bias", "softmax-shared-gated", "relu2-sigmoid-bias-shared"]
)
def test_moe_gradients_are_finite(name):
    moe = make_moe(CONFIGS[name]).train()
    x = torch.randn(2, 13, HIDDEN, requires_grad=True)
    y = moe(x)
    assert_finite_grads(moe, (y * torch.randn_like(y)).sum() + moe.last_aux_loss)
    assert torch.isfinite(x.grad).all()
    # The router learns through the routing weights and the aux loss; the expert bias not at all.
    assert moe.gate.weight.grad.abs().sum() > 0
    if moe.gate.e_score_correction_bias is not None:
        assert moe.gate.e_score_correction_bias.grad is None


GRADCHECK_CONFIGS = {
    "softmax-shared-gated": MoEConfig(
        num_experts=4,
        num_experts_per_tok=2,
        intermediate_size=3,
        num_shared_experts=1,
        shared_intermediate_size=2,
        has_shared_expert_gate=True,
        z_loss_coef=0.1,
    ),
    "sigmoid-bias-relu2": MoEConfig(
        num_experts=4,
        num_experts_per_tok=2,
        intermediate_size=3,
        activation="relu2",
        scoring="sigmoid",
        use_expert_bias=True,
        routed_scaling_factor=2.0,
        z_loss_coef=0.1,
    ),
}


@pytest.mark.parametrize("name", list(GRADCHECK_CONFIGS))
def test_moe_gradcheck(name):
    """Output and aux loss, w.r.t. the input and every trainable parameter (the choice is piecewise constant)."""
    moe = make_moe(GRADCHECK_CONFIGS[name], hidden=4, dtype=torch.float64).train()
    x = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)

    def run(m, x):
        return m(x), m.last_aux_loss

    gradcheck_layer(moe, (x,), run)
