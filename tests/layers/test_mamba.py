"""MambaMixer (Mamba-1, Jamba) against a per-timestep re-derivation written from the formulas."""

from __future__ import annotations

import pytest
import torch

from hybridlm.config import MambaConfig
from hybridlm.layers.mamba import MambaMixer
from tests.helpers import assert_close
from tests.layers.common import (
    assert_finite_grads_of_call,
    assert_rows_match_alone,
    context,
    gradcheck_layer,
    left_padded_call,
    params64,
    perturb_,
    run_in_pieces,
)

EPS = 1e-6
HIDDEN = 20

CONFIGS = {
    "I24-N8-R4-K4-L5": MambaConfig(intermediate_size=24, state_size=8, dt_rank=4, chunk_size=5),
    "I12-N5-R3-K3-L4-bias-no-norms": MambaConfig(
        intermediate_size=12, state_size=5, dt_rank=3, conv_kernel=3, chunk_size=4, use_bias=True, has_inner_norms=False
    ),
}


def make_layer(name, dtype=torch.float32, seed=1):
    layer = MambaMixer(HIDDEN, CONFIGS[name], EPS)
    with torch.no_grad():
        layer.A_log.add_(torch.randn(layer.A_log.shape, generator=torch.Generator().manual_seed(seed)) * 0.1)
    return perturb_(layer, std=0.1, seed=seed).to(dtype)


def silu(x):
    return x * torch.sigmoid(x)


def rms(x, w):
    return x / torch.sqrt((x**2).mean(-1, keepdim=True) + EPS) * w


def mamba_truth(layer, x, token_mask=None):
    """float64 truth: in_proj -> [x | z], conv + silu, x_proj -> dt/B/C (normed), softplus(dt_proj(dt) + bias),
    h_t = exp(dt A) h + dt B x per channel, y = h C + D x, y * silu(z), out_proj."""
    c, p = layer.config, params64(layer)
    x = x.double()
    B, T, _ = x.shape
    I, N, R, K = c.intermediate_size, c.state_size, c.dt_rank, c.conv_kernel
    xz = x @ p["in_proj.weight"].T + (p["in_proj.bias"] if c.use_bias else 0)
    xs, z = xz[..., :I], xz[..., I:]
    if token_mask is not None:
        xs = xs * token_mask[..., None]
    padded = torch.cat([torch.zeros(B, K - 1, I, dtype=torch.float64), xs], dim=1)
    conv = torch.stack(
        [sum(p["conv1d.weight"][:, 0, j] * padded[:, t + j] for j in range(K)) + p["conv1d.bias"] for t in range(T)],
        dim=1,
    )
    xs = silu(conv)
    if token_mask is not None:
        xs = xs * token_mask[..., None]
    dbc = xs @ p["x_proj.weight"].T
    dt, Bm, Cm = dbc[..., :R], dbc[..., R : R + N], dbc[..., R + N :]
    if c.has_inner_norms:
        dt, Bm, Cm = (
            rms(dt, p["dt_layernorm.weight"]),
            rms(Bm, p["b_layernorm.weight"]),
            rms(Cm, p["c_layernorm.weight"]),
        )
    delta = torch.log1p(torch.exp(dt @ p["dt_proj.weight"].T + p["dt_proj.bias"]))  # (B, T, I)
    A = -torch.exp(p["A_log"])  # (I, N)
    h = torch.zeros(B, I, N, dtype=torch.float64)
    ys = []
    for t in range(T):
        h = torch.exp(delta[:, t, :, None] * A) * h + delta[:, t, :, None] * Bm[:, t, None, :] * xs[:, t, :, None]
        ys.append((h * Cm[:, t, None, :]).sum(-1) + p["D"] * xs[:, t])
    y = torch.stack(ys, dim=1) * silu(z)
    return y @ p["out_proj.weight"].T + (p["out_proj.bias"] if c.use_bias else 0), h


@pytest.mark.parametrize("seq_len", [1, 13], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("name", list(CONFIGS))
def test_mamba_matches_timestep_loop(name, seq_len):
    layer = make_layer(name)
    x = torch.randn(2, seq_len, HIDDEN)
    assert_close(layer(x, context(2, seq_len)), mamba_truth(layer, x)[0])


def test_mamba_float64_keeps_float64_precision():
    layer = make_layer("I24-N8-R4-K4-L5", torch.float64)
    x = torch.randn(2, 13, HIDDEN, dtype=torch.float64)
    y = layer(x, context(2, 13))
    assert y.dtype == torch.float64
    assert_close(y, mamba_truth(layer, x)[0])


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("splits", [(7, 1), (5, 4, 1), (1,)], ids=lambda s: "+".join(map(str, s)))
def test_mamba_state_prefill_then_steps_equals_full(name, splits):
    layer = make_layer(name)
    B, T = 2, 13
    x = torch.randn(B, T, HIDDEN)
    full = layer(x, context(B, T))
    state = layer.new_state(B, T, torch.device("cpu"), torch.float32)
    assert_close(run_in_pieces(layer, x, splits, state), full)
    assert_close(state.recurrent, mamba_truth(layer, x)[1], name="ssm state")


def test_mamba_left_padding():
    layer = make_layer("I24-N8-R4-K4-L5")
    pads = [0, 5, 12]
    x = torch.randn(len(pads), 13, HIDDEN)
    y, _ = left_padded_call(layer, x, pads)
    assert_rows_match_alone(y, x, pads, lambda row: mamba_truth(layer, row)[0])


def test_mamba_gradients_are_finite():
    layer = make_layer("I24-N8-R4-K4-L5")
    x = torch.randn(2, 13, HIDDEN, requires_grad=True)
    assert_finite_grads_of_call(layer, x)


def test_mamba_gradcheck():
    config = MambaConfig(intermediate_size=4, state_size=2, dt_rank=2, conv_kernel=3, chunk_size=2)
    layer = perturb_(MambaMixer(4, config, EPS), std=0.2).double()
    x = torch.randn(1, 5, 4, dtype=torch.float64, requires_grad=True)
    gradcheck_layer(layer, (x,), lambda m, x: m(x, context(1, 5)))
