"""Mamba2Mixer against a per-timestep re-derivation: causal depthwise conv, the SSM recurrence, gated norm."""

from __future__ import annotations

import math

import pytest
import torch

from hybridlm.config import Mamba2Config
from hybridlm.layers.mamba2 import Mamba2Mixer
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
HIDDEN = 20

CONFIGS = {
    "H4-P12-N8-G2-K4-L5": Mamba2Config(num_heads=4, head_dim=12, state_size=8, num_groups=2, chunk_size=5),
    "H3-P6-N5-G1-K3-L4-bias": Mamba2Config(
        num_heads=3, head_dim=6, state_size=5, num_groups=1, conv_kernel=3, chunk_size=4, use_bias=True
    ),
    "H6-P4-N7-G3-L3-norm-first-no-conv-bias": Mamba2Config(
        num_heads=6, head_dim=4, state_size=7, num_groups=3, chunk_size=3, use_conv_bias=False, norm_before_gate=True
    ),
    "H2-P12-N4-G2-dt-limit": Mamba2Config(
        num_heads=2, head_dim=12, state_size=4, num_groups=2, chunk_size=6, time_step_limit=(0.03, 0.1)
    ),
}


def make_layer(name, dtype=torch.float32, seed=1):
    layer = Mamba2Mixer(HIDDEN, CONFIGS[name], EPS)
    return perturb_(layer, std=0.1, seed=seed).to(dtype)


def silu(x):
    return x * torch.sigmoid(x)


def mamba2_truth(layer, x, token_mask=None, conv_state=None, ssm_state=None):
    """float64 truth, one timestep at a time. x: (B, T, hidden).

    Returns (y, final conv state (B, conv_dim, K-1) of pre-conv inputs, final ssm state (B, H, P, N)).
    """
    c, p = layer.config, params64(layer)
    x = x.double()
    B, T, _ = x.shape
    H, P, N, G, K = c.num_heads, c.head_dim, c.state_size, c.num_groups, c.conv_kernel
    inner, conv_dim = H * P, H * P + 2 * G * N

    zxbcdt = x @ p["in_proj.weight"].T
    if c.use_bias:
        zxbcdt = zxbcdt + p["in_proj.bias"]
    z, xBC, dt_raw = zxbcdt[..., :inner], zxbcdt[..., inner : inner + conv_dim], zxbcdt[..., inner + conv_dim :]
    if token_mask is not None:
        xBC = xBC * token_mask[..., None]

    # Depthwise causal conv: out[t] = bias + sum_j w[:, j] * in[t - (K-1) + j]; inputs before t=0 from the state.
    weight = p["conv1d.weight"][:, 0, :]  # (conv_dim, K)
    history = torch.zeros(B, K - 1, conv_dim, dtype=torch.float64) if conv_state is None else conv_state.double().mT
    padded = torch.cat([history, xBC], dim=1)  # padded[t + K - 1] is input t
    conv_out = torch.zeros(B, T, conv_dim, dtype=torch.float64)
    for t in range(T):
        acc = p["conv1d.bias"].clone() if c.use_conv_bias else torch.zeros(conv_dim, dtype=torch.float64)
        for j in range(K):
            acc = acc + weight[:, j] * padded[:, t + j]
        conv_out[:, t] = silu(acc)
    if token_mask is not None:
        conv_out = conv_out * token_mask[..., None]
    final_conv = padded[:, T:].mT  # the last K-1 inputs, oldest first

    xs = conv_out[..., :inner].reshape(B, T, H, P)
    Bs = conv_out[..., inner : inner + G * N].reshape(B, T, G, N)
    Cs = conv_out[..., inner + G * N :].reshape(B, T, G, N)
    dt = torch.log1p(torch.exp(dt_raw + p["dt_bias"]))  # softplus
    low, high = c.time_step_limit
    dt = dt.clamp(min=low, max=high) if (low > 0 or high < math.inf) else dt
    A = -torch.exp(p["A_log"])

    h = torch.zeros(B, H, P, N, dtype=torch.float64) if ssm_state is None else ssm_state.double().clone()
    y = torch.zeros(B, T, H, P, dtype=torch.float64)
    for t in range(T):
        for head in range(H):
            g = head // (H // G)  # heads are split evenly over the B/C groups, in order
            decay = torch.exp(dt[:, t, head] * A[head])  # (B,)
            h[:, head] = decay[:, None, None] * h[:, head] + dt[:, t, head, None, None] * (
                xs[:, t, head, :, None] * Bs[:, t, g, None, :]
            )
            y[:, t, head] = torch.einsum("bpn,bn->bp", h[:, head], Cs[:, t, g]) + p["D"][head] * xs[:, t, head]
    y = y.reshape(B, T, inner)

    # Gated RMSNorm over G groups of inner / G channels.
    gate = silu(z)
    pre = y if c.norm_before_gate else y * gate
    group = inner // G
    normed = torch.cat(
        [
            pre[..., s : s + group] / torch.sqrt((pre[..., s : s + group] ** 2).mean(-1, keepdim=True) + EPS)
            for s in range(0, inner, group)
        ],
        dim=-1,
    )
    normed = normed * p["norm.weight"]
    if c.norm_before_gate:
        normed = normed * gate
    out = normed @ p["out_proj.weight"].T
    if c.use_bias:
        out = out + p["out_proj.bias"]
    return out, final_conv, h


@pytest.mark.parametrize("seq_len", [1, 13], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("name", list(CONFIGS))
def test_mamba2_matches_timestep_loop(name, seq_len):
    layer = make_layer(name)
    x = torch.randn(2, seq_len, HIDDEN)
    y = layer(x, context(2, seq_len))
    assert y.shape == x.shape
    assert_close(y, mamba2_truth(layer, x)[0])


def test_mamba2_float64_keeps_float64_precision():
    """A .double() mixer must compute in float64 (dt, A and the norm go through .float(), which downcasts)."""
    layer = make_layer("H4-P12-N8-G2-K4-L5", torch.float64)
    x = torch.randn(2, 13, HIDDEN, dtype=torch.float64)
    y = layer(x, context(2, 13))
    assert y.dtype == torch.float64
    assert_close(y, mamba2_truth(layer, x)[0])


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("splits", [(13,), (7, 1), (5, 4, 1), (1,), (2, 1)], ids=lambda s: "+".join(map(str, s)))
def test_mamba2_state_prefill_then_steps_equals_full(name, splits):
    """A RecurrentState carried through prefill chunks and one-token steps gives the full call's outputs and
    ends holding the truth's conv inputs and SSM state."""
    layer = make_layer(name)
    B, T = 2, 13
    x = torch.randn(B, T, HIDDEN)
    full = layer(x, context(B, T))
    state = layer.new_state(B, T, torch.device("cpu"), torch.float32)
    assert_close(run_in_pieces(layer, x, splits, state), full)
    expected, conv_state, ssm_state = mamba2_truth(layer, x)
    assert_close(full, expected)
    assert_state_close(state, conv_state, ssm_state, "ssm state")


def test_mamba2_continues_from_given_state():
    """Starting from a non-zero state matches the truth started from the same state."""
    layer = make_layer("H4-P12-N8-G2-K4-L5")
    B, T = 2, 13
    state, conv0, ssm0 = random_state(layer, B, T)
    x = torch.randn(B, T, HIDDEN)
    y = layer(x, context(B, T, past_len=5), state)
    expected, conv_state, ssm_state = mamba2_truth(layer, x, conv_state=conv0, ssm_state=ssm0)
    assert_close(y, expected)
    assert_state_close(state, conv_state, ssm_state, "ssm state")


@pytest.mark.parametrize("name", ["H4-P12-N8-G2-K4-L5", "H3-P6-N5-G1-K3-L4-bias"])
def test_mamba2_left_padding(name):
    """Left padding leaks nothing: each real row equals the call on its unpadded sequence alone."""
    layer = make_layer(name)
    pads = [0, 4, 12]
    x = torch.randn(len(pads), 13, HIDDEN)
    y, token_mask = left_padded_call(layer, x, pads)
    assert torch.isfinite(y).all()
    assert_close(y, mamba2_truth(layer, x, token_mask=token_mask)[0])
    assert_rows_match_alone(y, x, pads, lambda row: mamba2_truth(layer, row)[0])


@pytest.mark.parametrize("name", ["H4-P12-N8-G2-K4-L5", "H3-P6-N5-G1-K3-L4-bias"])
def test_mamba2_gradients_are_finite(name):
    layer = make_layer(name)
    x = torch.randn(2, 13, HIDDEN, requires_grad=True)
    assert_finite_grads_of_call(layer, x)
    assert torch.isfinite(x.grad).all()


def test_mamba2_gradcheck():
    config = Mamba2Config(num_heads=2, head_dim=2, state_size=2, num_groups=2, conv_kernel=3, chunk_size=2)
    layer = perturb_(Mamba2Mixer(4, config, EPS), std=0.2).double()
    x = torch.randn(1, 5, 4, dtype=torch.float64, requires_grad=True)
    gradcheck_layer(layer, (x,), lambda m, x: m(x, context(1, 5)))
