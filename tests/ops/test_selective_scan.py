"""selective_scan_chunked and selective_scan_step against the loop reference, and the reference
against transformers' Jamba scan."""

import pytest
import torch

from hybridlm.ops.selective_scan import (
    selective_scan_chunked,
    selective_scan_reference,
    selective_scan_step,
)
from tests.helpers import assert_close

BATCH, CHANNELS = 2, 60


def make_scan_inputs(T, N, use_D=True, use_z=True, use_initial_state=True, use_delta_bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "u": torch.randn(BATCH, T, CHANNELS, generator=g),
        # delta around softplus(-1..1) and A = -(1..N) scaled per channel, as Mamba's S4D-real init
        "delta": torch.randn(BATCH, T, CHANNELS, generator=g) * 0.5,
        "A": -torch.arange(1, N + 1.0).expand(CHANNELS, N) * torch.rand(CHANNELS, 1, generator=g) * 2,
        "B": torch.randn(BATCH, T, N, generator=g),
        "C": torch.randn(BATCH, T, N, generator=g),
        "D": torch.randn(CHANNELS, generator=g) if use_D else None,
        "z": torch.randn(BATCH, T, CHANNELS, generator=g) if use_z else None,
        "delta_bias": torch.randn(CHANNELS, generator=g) * 0.5 if use_delta_bias else None,
        "delta_softplus": use_delta_bias,
        "initial_state": torch.randn(BATCH, CHANNELS, N, generator=g) if use_initial_state else None,
    }
    if not use_delta_bias:  # without softplus delta must already be positive
        inputs["delta"] = inputs["delta"].abs() + 0.05
    return inputs


CASES = [
    # T, chunk_size, N, use_D, use_z, use_initial_state, use_delta_bias
    (1, 16, 16, True, True, True, True),
    (5, 16, 7, False, False, False, False),
    (5, 64, 16, True, False, True, False),
    (63, 16, 16, True, True, True, True),
    (63, 64, 7, False, True, False, True),
    (130, 16, 16, True, True, True, True),
    (130, 64, 7, False, False, True, True),
]
CASE_IDS = [
    f"T{t}-L{l}-N{n}" + "".join(f"-{k}" for k, on in zip(["D", "z", "h0", "dtbias"], flags, strict=True) if on)
    for t, l, n, *flags in CASES
]


@pytest.mark.parametrize(("T", "chunk_size", "N", "use_D", "use_z", "use_h0", "use_bias"), CASES, ids=CASE_IDS)
def test_chunked_matches_reference(T, chunk_size, N, use_D, use_z, use_h0, use_bias):
    inputs = make_scan_inputs(T, N, use_D, use_z, use_h0, use_bias)
    leaves = {k: v.requires_grad_() for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    y_ref, state_ref = selective_scan_reference(**inputs)
    y, state = selective_scan_chunked(**inputs, chunk_size=chunk_size)
    assert y.shape == (BATCH, T, CHANNELS) and state.shape == (BATCH, CHANNELS, N)
    assert_close(y, y_ref, name="y")
    assert_close(state, state_ref, name="final_state")

    g = torch.Generator().manual_seed(1)
    grad_y, grad_state = torch.randn(y.shape, generator=g), torch.randn(state.shape, generator=g)
    grads_ref = torch.autograd.grad((y_ref, state_ref), list(leaves.values()), (grad_y, grad_state))
    grads = torch.autograd.grad((y, state), list(leaves.values()), (grad_y, grad_state))
    for name, a, e in zip(leaves, grads, grads_ref, strict=True):
        assert_close(a, e, name=f"grad {name}")


@pytest.mark.parametrize("use_options", [True, False])
def test_step_loop_matches_reference(use_options):
    inputs = make_scan_inputs(9, 16, *[use_options] * 4)
    y_ref, state_ref = selective_scan_reference(**inputs)
    state = inputs["initial_state"]
    if state is None:
        state = torch.zeros(BATCH, CHANNELS, 16)
    ys = []
    for t in range(9):
        per_token = {k: inputs[k][:, t] for k in ("u", "delta", "B", "C")}
        z_t = inputs["z"][:, t] if use_options else None
        y_t, state = selective_scan_step(
            **per_token,
            A=inputs["A"],
            D=inputs["D"],
            z=z_t,
            state=state,
            delta_bias=inputs["delta_bias"],
            delta_softplus=inputs["delta_softplus"],
        )
        ys.append(y_t)
    assert_close(torch.stack(ys, dim=1), y_ref, name="y")
    assert_close(state, state_ref, name="final_state")


@pytest.mark.parametrize("scan", [selective_scan_reference, selective_scan_chunked])
def test_split_in_two_equals_one_call(scan):
    inputs = make_scan_inputs(45, 7)
    y_full, state_full = scan(**inputs)
    first = {k: v[:, :20] if k in ("u", "delta", "B", "C", "z") else v for k, v in inputs.items()}
    second = {k: v[:, 20:] if k in ("u", "delta", "B", "C", "z") else v for k, v in inputs.items()}
    y_first, state_mid = scan(**first)
    y_second, state_end = scan(**{**second, "initial_state": state_mid})
    assert_close(torch.cat([y_first, y_second], dim=1), y_full, name="y")
    assert_close(state_end, state_full, name="final_state")


def test_bf16_inputs_return_bf16_output_and_fp32_state():
    inputs = make_scan_inputs(20, 7)
    bf16 = {k: v.bfloat16() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    y, state = selective_scan_chunked(**bf16, chunk_size=8)
    y_ref, state_ref = selective_scan_reference(**bf16)
    assert y.dtype == torch.bfloat16 and state.dtype == torch.float32
    assert_close(y, y_ref, name="y")  # both fp32 math rounded once to bf16: one rounding step apart at most
    assert_close(state, state_ref, name="final_state")


def test_chunked_stays_accurate_after_a_large_decay():
    # One huge step early in the chunk drives the cumulative log-decay S to about -3e4; the steps after
    # it decay by exp(S_t - S_s) close to 1. Differencing two fp32 cumulative sums would get those
    # factors wrong by ~|S| * 6e-8 ~ 2e-3 (measured 1.7e-4 on y); the segment sum stays at ~4e-7.
    inputs = make_scan_inputs(40, 16, use_delta_bias=False)
    inputs["delta"] = torch.full_like(inputs["delta"], 0.05)
    inputs["delta"][:, 3] = 1000.0
    y_ref, state_ref = selective_scan_reference(**inputs)
    y, state = selective_scan_chunked(**inputs, chunk_size=64)
    assert_close(y, y_ref, name="y")
    assert_close(state, state_ref, name="final_state")


@pytest.mark.hf
def test_reference_matches_transformers_jamba_scan():
    modeling = pytest.importorskip("transformers.models.jamba.modeling_jamba")
    inputs = make_scan_inputs(33, 16, use_initial_state=False)
    y, state = selective_scan_reference(**inputs)

    def channels_first(x):  # transformers' kernel layout: [B, Dn, T] and [B, N, T]
        return x.transpose(1, 2)

    hf_y, hf_state = modeling.mamba_selective_scan(
        channels_first(inputs["u"]),
        channels_first(inputs["delta"]),
        inputs["A"],
        channels_first(inputs["B"]),
        channels_first(inputs["C"]),
        D=inputs["D"],
        z=channels_first(inputs["z"]),
        delta_bias=inputs["delta_bias"],
        delta_softplus=True,
        return_last_state=True,
    )
    assert_close(y, channels_first(hf_y), name="y")
    assert_close(state, hf_state, name="final_state")

    # one decode step against transformers' in-place state update
    step = {k: inputs[k][:, 0] for k in ("u", "delta", "B", "C", "z")}
    hf_state_0 = torch.randn(BATCH, CHANNELS, 16)
    y_step, state_step = selective_scan_step(
        **step, A=inputs["A"], D=inputs["D"], state=hf_state_0, delta_bias=inputs["delta_bias"], delta_softplus=True
    )
    hf_state_1 = hf_state_0.clone()
    hf_y_step = modeling.mamba_selective_state_update(
        hf_state_1,
        step["u"],
        step["delta"],
        inputs["A"],
        step["B"],
        step["C"],
        D=inputs["D"],
        dt_bias=inputs["delta_bias"],
        dt_softplus=True,
        z=step["z"],
    )
    assert_close(y_step, hf_y_step, name="step y")
    assert_close(state_step, hf_state_1, name="step state")
