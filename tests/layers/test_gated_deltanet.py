"""GatedDeltaNetMixer against a plain delta-rule loop over time."""

from __future__ import annotations

import pytest
import torch

from hybridlm.config import GatedDeltaNetConfig
from hybridlm.layers.gated_deltanet import GatedDeltaNetMixer
from tests.helpers import assert_close
from tests.layers.common import (
    assert_finite_grads_of_call,
    assert_rows_match_alone,
    assert_state_close,
    context,
    gradcheck_layer,
    left_padded_call,
    params64,
    perturb_,
    random_state,
    run_in_pieces,
)

EPS = 1e-5
L2_EPS = 1e-6  # q / sqrt(sum q^2 + 1e-6), as fla's l2norm and transformers' Qwen3-Next
HIDDEN = 20

CONFIGS = {
    "Hk2-Hv4-K12-V8-L5": GatedDeltaNetConfig(
        num_key_heads=2, num_value_heads=4, key_head_dim=12, value_head_dim=8, chunk_size=5
    ),
    "Hk3-Hv3-K6-V10-conv3-L4": GatedDeltaNetConfig(
        num_key_heads=3, num_value_heads=3, key_head_dim=6, value_head_dim=10, conv_kernel=3, chunk_size=4
    ),
    "Hk1-Hv3-K60-V12-L6": GatedDeltaNetConfig(
        num_key_heads=1, num_value_heads=3, key_head_dim=60, value_head_dim=12, chunk_size=6
    ),
}


def make_layer(name, dtype=torch.float32, seed=1):
    layer = GatedDeltaNetMixer(HIDDEN, CONFIGS[name], EPS)
    return perturb_(layer, std=0.1, seed=seed).to(dtype)


def silu(x):
    return x * torch.sigmoid(x)


def gated_deltanet_truth(layer, x, token_mask=None, conv_state=None, recurrent_state=None):
    """float64 truth, one timestep at a time. x: (B, T, hidden).

    Returns (y, final conv state (B, conv_dim, K-1) of pre-conv inputs, final state S (B, H_v, K, V)).
    """
    c, p = layer.config, params64(layer)
    x = x.double()
    B, T, _ = x.shape
    Hk, Hv, Dk, Dv, W = c.num_key_heads, c.num_value_heads, c.key_head_dim, c.value_head_dim, c.conv_kernel
    conv_dim = 2 * Hk * Dk + Hv * Dv

    qkv = x @ p["in_proj_qkv.weight"].T
    if token_mask is not None:
        qkv = qkv * token_mask[..., None]
    weight = p["conv1d.weight"][:, 0, :]  # (conv_dim, W), no bias
    history = torch.zeros(B, W - 1, conv_dim, dtype=torch.float64) if conv_state is None else conv_state.double().mT
    padded = torch.cat([history, qkv], dim=1)  # padded[t + W - 1] is input t
    conv_out = torch.zeros(B, T, conv_dim, dtype=torch.float64)
    for t in range(T):
        acc = torch.zeros(B, conv_dim, dtype=torch.float64)
        for j in range(W):
            acc = acc + weight[:, j] * padded[:, t + j]
        conv_out[:, t] = silu(acc)
    if token_mask is not None:
        conv_out = conv_out * token_mask[..., None]
    final_conv = padded[:, T:].mT

    q = conv_out[..., : Hk * Dk].reshape(B, T, Hk, Dk)
    k = conv_out[..., Hk * Dk : 2 * Hk * Dk].reshape(B, T, Hk, Dk)
    v = conv_out[..., 2 * Hk * Dk :].reshape(B, T, Hv, Dv)
    q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + L2_EPS)
    k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + L2_EPS)
    beta = torch.sigmoid(x @ p["in_proj_b.weight"].T)  # (B, T, Hv)
    a = x @ p["in_proj_a.weight"].T + p["dt_bias"]
    g = -torch.exp(p["A_log"]) * torch.log1p(torch.exp(a))  # softplus

    S = torch.zeros(B, Hv, Dk, Dv, dtype=torch.float64) if recurrent_state is None else recurrent_state.double().clone()
    o = torch.zeros(B, T, Hv, Dv, dtype=torch.float64)
    for t in range(T):
        for h in range(Hv):
            kh = h // (Hv // Hk)  # repeat_interleave: each key head serves Hv // Hk consecutive value heads
            k_t, q_t, v_t = k[:, t, kh], q[:, t, kh], v[:, t, h]  # (B, Dk), (B, Dk), (B, Dv)
            S[:, h] = torch.exp(g[:, t, h])[:, None, None] * S[:, h]
            predicted = torch.einsum("bkv,bk->bv", S[:, h], k_t)  # S^T k
            S[:, h] = S[:, h] + beta[:, t, h, None, None] * k_t[:, :, None] * (v_t - predicted)[:, None, :]
            o[:, t, h] = torch.einsum("bkv,bk->bv", S[:, h], q_t) * Dk**-0.5

    z = (x @ p["in_proj_z.weight"].T).reshape(B, T, Hv, Dv)
    o = o / torch.sqrt((o * o).mean(-1, keepdim=True) + EPS) * p["norm.weight"] * silu(z)
    return o.reshape(B, T, Hv * Dv) @ p["out_proj.weight"].T, final_conv, S


@pytest.mark.parametrize("seq_len", [1, 13], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("name", list(CONFIGS))
def test_gated_deltanet_matches_delta_rule_loop(name, seq_len):
    layer = make_layer(name)
    x = torch.randn(2, seq_len, HIDDEN)
    y = layer(x, context(2, seq_len))
    assert y.shape == x.shape
    assert_close(y, gated_deltanet_truth(layer, x)[0])


def test_gated_deltanet_float64_keeps_float64_precision():
    """A .double() mixer must compute in float64 (q, k, v, beta, g and the norm go through .float())."""
    layer = make_layer("Hk2-Hv4-K12-V8-L5", torch.float64)
    x = torch.randn(2, 13, HIDDEN, dtype=torch.float64)
    y = layer(x, context(2, 13))
    assert y.dtype == torch.float64
    assert_close(y, gated_deltanet_truth(layer, x)[0])


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("splits", [(13,), (7, 1), (5, 4, 1), (1,), (2, 1)], ids=lambda s: "+".join(map(str, s)))
def test_gated_deltanet_state_prefill_then_steps_equals_full(name, splits):
    """A RecurrentState carried through prefill chunks and one-token steps gives the full call's outputs and
    ends holding the truth's conv inputs and delta-rule state."""
    layer = make_layer(name)
    B, T = 2, 13
    x = torch.randn(B, T, HIDDEN)
    full = layer(x, context(B, T))
    state = layer.new_state(B, T, torch.device("cpu"), torch.float32)
    assert_close(run_in_pieces(layer, x, splits, state), full)
    expected, conv_state, recurrent_state = gated_deltanet_truth(layer, x)
    assert_close(full, expected)
    assert_state_close(state, conv_state, recurrent_state, "recurrent state")


def test_gated_deltanet_continues_from_given_state():
    layer = make_layer("Hk2-Hv4-K12-V8-L5")
    B, T = 2, 13
    state, conv0, recurrent0 = random_state(layer, B, T)
    x = torch.randn(B, T, HIDDEN)
    y = layer(x, context(B, T, past_len=5), state)
    expected, conv_state, recurrent_state = gated_deltanet_truth(layer, x, conv_state=conv0, recurrent_state=recurrent0)
    assert_close(y, expected)
    assert_state_close(state, conv_state, recurrent_state, "recurrent state")


@pytest.mark.parametrize("name", ["Hk2-Hv4-K12-V8-L5", "Hk3-Hv3-K6-V10-conv3-L4"])
def test_gated_deltanet_left_padding(name):
    """Left padding leaks nothing: each real row equals the call on its unpadded sequence alone."""
    layer = make_layer(name)
    pads = [0, 4, 12]
    x = torch.randn(len(pads), 13, HIDDEN)
    y, token_mask = left_padded_call(layer, x, pads)
    assert torch.isfinite(y).all()
    assert_close(y, gated_deltanet_truth(layer, x, token_mask=token_mask)[0])
    assert_rows_match_alone(y, x, pads, lambda row: gated_deltanet_truth(layer, row)[0])


@pytest.mark.parametrize("name", ["Hk2-Hv4-K12-V8-L5", "Hk1-Hv3-K60-V12-L6"])
def test_gated_deltanet_gradients_are_finite(name):
    layer = make_layer(name)
    x = torch.randn(2, 13, HIDDEN, requires_grad=True)
    assert_finite_grads_of_call(layer, x)
    assert torch.isfinite(x.grad).all()


def test_gated_deltanet_gradcheck():
    config = GatedDeltaNetConfig(
        num_key_heads=1, num_value_heads=2, key_head_dim=3, value_head_dim=2, conv_kernel=3, chunk_size=2
    )
    layer = perturb_(GatedDeltaNetMixer(4, config, EPS), std=0.2).double()
    x = torch.randn(1, 5, 4, dtype=torch.float64, requires_grad=True)
    gradcheck_layer(layer, (x,), lambda m, x: m(x, context(1, 5)))
