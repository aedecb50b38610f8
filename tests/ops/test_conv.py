"""causal_conv1d (F.conv1d) and causal_conv1d_step against the tap-loop reference."""

from __future__ import annotations

import pytest
import torch

from hybridlm.ops.conv import causal_conv1d, causal_conv1d_reference, causal_conv1d_step
from tests.helpers import assert_close

BATCH = 2

# (seq_len, channels, kernel_width): T=1 and T < K-1 (state reaches into initial_state), odd C.
SHAPES = [
    pytest.param(1, 60, 4, id="T1-C60-K4"),
    pytest.param(2, 37, 4, id="T2-C37-K4"),
    pytest.param(5, 60, 4, id="T5-C60-K4"),
    pytest.param(63, 37, 4, id="T63-C37-K4"),
    pytest.param(64, 60, 2, id="T64-C60-K2"),
    pytest.param(130, 60, 4, id="T130-C60-K4"),
    pytest.param(5, 8, 1, id="T5-C8-K1"),
]
WITH_STATE = [pytest.param(False, id="no-state"), pytest.param(True, id="state")]
WITH_BIAS = [pytest.param(False, id="no-bias"), pytest.param(True, id="bias")]
ACTIVATIONS = [pytest.param("silu", id="silu"), pytest.param(None, id="linear")]


def make_inputs(seq_len, channels, kernel_width, *, with_state, with_bias, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    return {
        "x": randn(BATCH, seq_len, channels),
        "weight": randn(channels, kernel_width) / kernel_width**0.5,
        "bias": randn(channels) if with_bias else None,
        "initial_state": randn(BATCH, channels, kernel_width - 1) if with_state else None,
    }


def run_with_grads(fn, inputs, activation):
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items() if v is not None}
    args = {k: leaves.get(k) for k in inputs}
    y, final_state = fn(**args, activation=activation)
    gen = torch.Generator().manual_seed(123)
    loss = (y * torch.randn(y.shape, generator=gen)).sum() + (
        final_state * torch.randn(final_state.shape, generator=gen)
    ).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return y, final_state, dict(zip(leaves, grads, strict=True))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("with_bias", WITH_BIAS)
@pytest.mark.parametrize("with_state", WITH_STATE)
@pytest.mark.parametrize(("seq_len", "channels", "kernel_width"), SHAPES)
def test_conv_matches_reference(seq_len, channels, kernel_width, with_state, with_bias, activation):
    inputs = make_inputs(seq_len, channels, kernel_width, with_state=with_state, with_bias=with_bias)
    y_ref, state_ref, grads_ref = run_with_grads(causal_conv1d_reference, inputs, activation)
    y, state, grads = run_with_grads(causal_conv1d, inputs, activation)

    assert y.shape == (BATCH, seq_len, channels)
    assert state.shape == (BATCH, channels, kernel_width - 1)
    assert_close(y, y_ref)
    torch.testing.assert_close(state, state_ref, rtol=0, atol=0)
    for name, grad_ref in grads_ref.items():
        assert_close(grads[name], grad_ref)


@pytest.mark.parametrize("with_state", WITH_STATE)
@pytest.mark.parametrize(("seq_len", "channels", "kernel_width"), SHAPES)
def test_final_state_is_last_inputs(seq_len, channels, kernel_width, with_state):
    inputs = make_inputs(seq_len, channels, kernel_width, with_state=with_state, with_bias=False)
    state = inputs["initial_state"]
    if state is None:
        state = torch.zeros(BATCH, channels, kernel_width - 1)
    history = torch.cat([state, inputs["x"].transpose(1, 2)], dim=-1)
    expected = history[:, :, history.shape[-1] - (kernel_width - 1) :]
    for fn in (causal_conv1d_reference, causal_conv1d):
        _, final_state = fn(**inputs)
        torch.testing.assert_close(final_state, expected, rtol=0, atol=0)


@pytest.mark.parametrize("with_bias", WITH_BIAS)
@pytest.mark.parametrize("with_state", WITH_STATE)
@pytest.mark.parametrize(("seq_len", "channels", "kernel_width"), SHAPES)
def test_step_loop_matches_reference(seq_len, channels, kernel_width, with_state, with_bias):
    inputs = make_inputs(seq_len, channels, kernel_width, with_state=with_state, with_bias=with_bias)
    y_ref, state_ref = causal_conv1d_reference(**inputs)

    state = inputs["initial_state"]
    if state is None:
        state = torch.zeros(BATCH, channels, kernel_width - 1)
    ys = []
    for t in range(seq_len):
        y_t, state = causal_conv1d_step(inputs["x"][:, t], state, inputs["weight"], inputs["bias"])
        ys.append(y_t)
    assert_close(torch.stack(ys, dim=1), y_ref)
    assert_close(state, state_ref)


def test_step_does_not_modify_state():
    inputs = make_inputs(1, 6, 4, with_state=True, with_bias=True)
    state = inputs["initial_state"]
    before = state.clone()
    _, new_state = causal_conv1d_step(inputs["x"][:, 0], state, inputs["weight"], inputs["bias"])
    torch.testing.assert_close(state, before, rtol=0, atol=0)
    assert new_state.data_ptr() != state.data_ptr()


@pytest.mark.parametrize("split", [1, 2, 40, 129], ids=lambda s: f"split{s}")
@pytest.mark.parametrize("fn", [causal_conv1d_reference, causal_conv1d], ids=["reference", "fast"])
def test_split_sequence_matches_one_call(fn, split):
    inputs = make_inputs(130, 37, 4, with_state=True, with_bias=True)
    y_full, state_full = fn(**inputs)

    x = inputs["x"]
    y_a, state_a = fn(x[:, :split], inputs["weight"], inputs["bias"], inputs["initial_state"])
    y_b, state_b = fn(x[:, split:], inputs["weight"], inputs["bias"], state_a)
    assert_close(torch.cat([y_a, y_b], dim=1), y_full)
    torch.testing.assert_close(state_b, state_full, rtol=0, atol=0)


def test_gradcheck_fast():
    inputs = make_inputs(5, 3, 4, with_state=True, with_bias=True, dtype=torch.float64)
    leaves = tuple(v.requires_grad_(True) for v in inputs.values())
    assert torch.autograd.gradcheck(lambda *args: causal_conv1d(*args), leaves)


def test_half_precision_matches_fp32():
    inputs = make_inputs(63, 60, 4, with_state=True, with_bias=True)
    y_ref, _ = causal_conv1d_reference(**inputs)
    y, state = causal_conv1d(**{k: v.to(torch.bfloat16) for k, v in inputs.items()})
    assert y.dtype == state.dtype == torch.bfloat16
    # bf16 inputs (rounded by 2^-9 each) against the fp32 truth on unrounded ones: measured 3.1e-3 of the
    # largest |y|; one bf16 step (2^-7) allows for that input rounding while a bf16 accumulation would not fit.
    assert_close(y.float(), y_ref, rtol=2**-7, name="y")


def test_rejects_unknown_activation():
    inputs = make_inputs(5, 4, 4, with_state=False, with_bias=False)
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(**inputs, activation="relu")


def test_rejects_bad_state_shape():
    inputs = make_inputs(5, 4, 4, with_state=False, with_bias=False)
    inputs["initial_state"] = torch.zeros(BATCH, 4, 4)
    with pytest.raises(ValueError, match=r"initial_state must have shape \[B, C, K-1\]"):
        causal_conv1d(**inputs)
