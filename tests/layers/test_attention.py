"""Attention against an explicit softmax(Q K^T * scale + causal mask) V loop with GQA heads repeated by hand."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hybridlm.config import AttentionConfig
from hybridlm.layers.attention import Attention
from tests.helpers import assert_close
from tests.layers.common import (
    assert_finite_grads_of_call,
    assert_rows_match_alone,
    context,
    gradcheck_layer,
    left_padded_call,
    left_padding_mask,
    params64,
    perturb_,
    run_in_pieces,
)

EPS = 1e-5
HIDDEN = 20

CONFIGS = {
    "gqa-H4-KV2-D12": AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=12),
    "mha-H3-D12": AttentionConfig(num_heads=3, num_kv_heads=3, head_dim=12),
    "mqa-H4-KV1-D60-bias": AttentionConfig(num_heads=4, num_kv_heads=1, head_dim=60, bias=True),
    "gqa-H6-KV3-D12-scale": AttentionConfig(num_heads=6, num_kv_heads=3, head_dim=12, softmax_scale=0.37),
    "output-gate": AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=12, has_output_gate=True),
    "qk-norm": AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=12, has_qk_norm=True),
    "partial-rope-D60-R24": AttentionConfig(num_heads=2, num_kv_heads=1, head_dim=60, partial_rotary_factor=0.4),
    "no-rope": AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=12, rope_theta=None),
    "qwen3-next-like": AttentionConfig(
        num_heads=4,
        num_kv_heads=2,
        head_dim=12,
        rope_theta=1e6,
        partial_rotary_factor=0.5,
        has_qk_norm=True,
        has_output_gate=True,
    ),
}
ZERO_CENTERED = {"qwen3-next-like"}  # qk norms scale by (1 + w) there


def make_layer(name, dtype=torch.float32, seed=1):
    layer = Attention(HIDDEN, CONFIGS[name], EPS, is_norm_zero_centered=name in ZERO_CENTERED)
    return perturb_(layer, std=0.1, seed=seed).to(dtype)


def linear(x, p, name):
    y = x @ p[f"{name}.weight"].T
    return y + p[f"{name}.bias"] if f"{name}.bias" in p else y


def rms_norm(x, weight, is_zero_centered):
    scale = 1 + weight if is_zero_centered else weight
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + EPS) * scale


def rotate(x, positions, rotary_dim, theta):
    """Pairs (i, i + R/2) as complex numbers, rotated by pos * theta^(-2i/R); x: (T, H, D), positions: (T,)."""
    out = x.clone()
    half = rotary_dim // 2
    for i in range(half):
        angle = positions.double()[:, None] * theta ** (-2 * i / rotary_dim)
        z = torch.complex(x[..., i], x[..., i + half]) * torch.polar(torch.ones_like(angle), angle)
        out[..., i], out[..., i + half] = z.real, z.imag
    return out


def attention_truth(layer, x, positions, key_is_real=None):
    """float64 truth for one call over a whole sequence; x: (B, T, hidden), positions: (B, T).

    key_is_real: (B, T) bool or None; a query attends to keys j <= i that are real.
    """
    c, p = layer.config, params64(layer)
    zero_centered = layer.q_norm.is_zero_centered if c.has_qk_norm else False
    x = x.double()
    B, T, _ = x.shape
    H, H_kv, D = c.num_heads, c.num_kv_heads, c.head_dim
    scale = c.softmax_scale if c.softmax_scale is not None else D**-0.5
    out = torch.zeros(B, T, H * D, dtype=torch.float64)
    for b in range(B):
        q_all = linear(x[b], p, "q_proj")
        if c.has_output_gate:  # per head: D query dims, then D gate dims
            q_all = q_all.view(T, H, 2 * D)
            q, gate = q_all[..., :D], q_all[..., D:]
        else:
            q, gate = q_all.view(T, H, D), None
        k = linear(x[b], p, "k_proj").view(T, H_kv, D)
        v = linear(x[b], p, "v_proj").view(T, H_kv, D)
        if c.has_qk_norm:
            q = rms_norm(q, p["q_norm.weight"], zero_centered)
            k = rms_norm(k, p["k_norm.weight"], zero_centered)
        if c.rotary_dim:
            q = rotate(q, positions[b], c.rotary_dim, c.rope_theta)
            k = rotate(k, positions[b], c.rotary_dim, c.rope_theta)
        for h in range(H):
            kv_head = h // (H // H_kv)  # each kv head serves H // H_kv consecutive query heads
            for i in range(T):
                allowed = torch.arange(T) <= i
                if key_is_real is not None:
                    allowed &= key_is_real[b]
                scores = (k[:, kv_head] @ q[i, h]) * scale
                scores = scores.masked_fill(~allowed, float("-inf"))
                weights = torch.exp(scores - scores.max())
                weights = weights / weights.sum()
                row = weights @ v[:, kv_head]
                if gate is not None:
                    row = row * torch.sigmoid(gate[i, h])
                out[b, i, h * D : (h + 1) * D] = row
    return linear(out, p, "o_proj")


@pytest.mark.parametrize("seq_len", [1, 13], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("name", list(CONFIGS))
def test_attention_matches_explicit_loop(name, seq_len):
    layer = make_layer(name)
    x = torch.randn(2, seq_len, HIDDEN)
    y = layer(x, context(2, seq_len))
    assert y.shape == x.shape
    assert_close(y, attention_truth(layer, x, context(2, seq_len).positions))


def test_attention_float64_keeps_float64_precision():
    """A .double() layer must compute in float64 (RoPE and qk norm upcast with .float(), which downcasts)."""
    layer = make_layer("qwen3-next-like", torch.float64)
    # inv_freq is built in fp32 at init (as transformers does) and only converted by .double(): its ~6e-8
    # relative rounding is a design choice, not the bug looked for here, so use exact float64 frequencies.
    c = layer.config
    layer.rotary.inv_freq = c.rope_theta ** (-torch.arange(0, c.rotary_dim, 2, dtype=torch.float64) / c.rotary_dim)
    x = torch.randn(2, 13, HIDDEN, dtype=torch.float64)
    y = layer(x, context(2, 13))
    assert y.dtype == torch.float64
    assert_close(y, attention_truth(layer, x, context(2, 13).positions))


def test_attention_positions_come_from_context():
    """RoPE reads context.positions, not the index in the call: shifted positions change nothing else."""
    layer = make_layer("gqa-H4-KV2-D12")
    x = torch.randn(2, 7, HIDDEN)
    positions = torch.tensor([[3, 4, 5, 6, 7, 8, 9], [100, 101, 102, 103, 104, 105, 106]])
    ctx = dataclasses.replace(context(2, 7), positions=positions)
    assert_close(layer(x, ctx), attention_truth(layer, x, positions))


@pytest.mark.parametrize("name", ["gqa-H4-KV2-D12", "qwen3-next-like", "no-rope"])
def test_attention_left_padding(name):
    """Padded query rows stay finite; each real row equals the call on its unpadded sequence alone."""
    layer = make_layer(name)
    T, pads = 13, [0, 4, 12]
    x = torch.randn(len(pads), T, HIDDEN)
    y, _ = left_padded_call(layer, x, pads)
    assert torch.isfinite(y).all()
    for b, pad in enumerate(pads):
        alone = x[b : b + 1, pad:]
        expected = attention_truth(layer, alone, torch.arange(T - pad)[None])
        assert_close(y[b : b + 1, pad:], expected, name=f"row {b}")
        assert_close(layer(alone, context(1, T - pad)), expected, name=f"row {b} alone")


@pytest.mark.parametrize("name", ["gqa-H4-KV2-D12", "qwen3-next-like", "mqa-H4-KV1-D60-bias"])
@pytest.mark.parametrize("splits", [(13,), (6, 1, 1), (1, 1, 1), (5, 4, 1, 1)], ids=lambda s: "+".join(map(str, s)))
def test_attention_cache_prefill_then_steps_equals_full(name, splits):
    """Prefill (and a second prefill chunk) then one-token steps against one full call."""
    layer = make_layer(name)
    T, B = 13, 2
    x = torch.randn(B, T, HIDDEN)
    full = layer(x, context(B, T))
    state = layer.new_state(B, T + 3, torch.device("cpu"), torch.float32)
    assert_close(run_in_pieces(layer, x, splits, state), full)
    assert_close(full, attention_truth(layer, x, context(B, T).positions))


def test_attention_cache_with_left_padding():
    """Left-padded prefill then decode steps: the real rows equal the unpadded full call of each sequence."""
    layer = make_layer("qwen3-next-like")
    prompt_len, num_steps, pads = 9, 4, [0, 3, 8]
    B, T = len(pads), prompt_len + num_steps
    x = torch.randn(B, T, HIDDEN)
    prompt_mask = left_padding_mask(prompt_len, pads)
    token_mask = torch.cat([prompt_mask, torch.ones(B, num_steps, dtype=torch.bool)], dim=1)
    state = layer.new_state(B, T, torch.device("cpu"), torch.float32)
    outputs = [layer(x[:, :prompt_len], context(B, prompt_len, token_mask=prompt_mask), state)]
    num_real = prompt_mask.sum(-1)
    for step in range(num_steps):
        past = prompt_len + step
        ctx = context(B, 1, past_len=past, token_mask=token_mask[:, : past + 1])
        assert torch.equal(ctx.positions, (num_real + step)[:, None])
        outputs.append(layer(x[:, past : past + 1], ctx, state))
    y = torch.cat(outputs, dim=1)
    assert torch.isfinite(y).all()
    assert_rows_match_alone(y, x, pads, lambda row: attention_truth(layer, row, torch.arange(row.shape[1])[None]))


@pytest.mark.parametrize("name", ["qwen3-next-like", "mqa-H4-KV1-D60-bias", "partial-rope-D60-R24"])
def test_attention_gradients_are_finite(name):
    layer = make_layer(name)
    x = torch.randn(2, 13, HIDDEN, requires_grad=True)
    assert_finite_grads_of_call(layer, x)
    assert torch.isfinite(x.grad).all()


GRADCHECK_CONFIGS = {
    "no-rope": AttentionConfig(num_heads=2, num_kv_heads=1, head_dim=4, rope_theta=None, bias=True),
    "rope": AttentionConfig(num_heads=2, num_kv_heads=1, head_dim=4),
    "qk-norm-gate-partial-rope": AttentionConfig(
        num_heads=2, num_kv_heads=1, head_dim=4, partial_rotary_factor=0.5, has_qk_norm=True, has_output_gate=True
    ),
}


@pytest.mark.parametrize("name", list(GRADCHECK_CONFIGS))
def test_attention_gradcheck(name):
    layer = perturb_(Attention(6, GRADCHECK_CONFIGS[name], EPS), std=0.2).double()
    x = torch.randn(1, 3, 6, dtype=torch.float64, requires_grad=True)
    gradcheck_layer(layer, (x,), lambda m, x: m(x, context(1, 3)))
