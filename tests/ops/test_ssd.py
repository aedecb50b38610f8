"""ssd_chunked and ssd_step against the sequential reference (the spec)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hybridlm.ops import ssd as ssd_module
from hybridlm.ops.ssd import ssd_chunked, ssd_reference, ssd_step
from tests.helpers import assert_close

BATCH = 2
HEAD_DIM = 60

# (seq_len, chunk_size, num_heads, num_groups, state_size): T=1, T < L, T a multiple of L, T not one.
SHAPES = [
    pytest.param(1, 16, 4, 2, 16, id="T1-L16-H4G2-N16"),
    pytest.param(5, 16, 3, 1, 7, id="T5-L16-H3G1-N7"),
    pytest.param(63, 16, 6, 3, 16, id="T63-L16-H6G3-N16"),
    pytest.param(64, 16, 4, 2, 7, id="T64-L16-H4G2-N7"),
    pytest.param(64, 64, 3, 1, 16, id="T64-L64-H3G1-N16"),
    pytest.param(130, 64, 4, 2, 16, id="T130-L64-H4G2-N16"),
    pytest.param(130, 16, 6, 3, 7, id="T130-L16-H6G3-N7"),
]
WITH_STATE = [pytest.param(False, id="no-state"), pytest.param(True, id="state")]
WITH_D = [pytest.param(False, id="no-D"), pytest.param(True, id="D")]


def make_inputs(
    seq_len,
    num_heads,
    num_groups,
    state_size,
    *,
    with_state,
    with_d,
    head_dim=HEAD_DIM,
    dtype=torch.float32,
    seed=0,
):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    return {
        "x": randn(BATCH, seq_len, num_heads, head_dim),
        # softplus of N(0, 1) - 1: mostly ~0.1-1, with a tail down to ~0.01 and up to ~2.
        "dt": F.softplus(randn(BATCH, seq_len, num_heads) - 1),
        "A": -torch.exp(torch.rand(num_heads, generator=gen, dtype=dtype)),
        "B": randn(BATCH, seq_len, num_groups, state_size),
        "C": randn(BATCH, seq_len, num_groups, state_size),
        "D": randn(num_heads) if with_d else None,
        "initial_state": randn(BATCH, num_heads, head_dim, state_size) if with_state else None,
    }


def run_with_grads(fn, inputs, **kwargs):
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items() if v is not None}
    args = {k: leaves.get(k) for k in inputs}
    y, final_state = fn(**args, **kwargs)
    gen = torch.Generator().manual_seed(123)
    loss = (y * torch.randn(y.shape, generator=gen)).sum() + (
        final_state * torch.randn(final_state.shape, generator=gen)
    ).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return y, final_state, dict(zip(leaves, grads, strict=True))


@pytest.mark.parametrize("with_d", WITH_D)
@pytest.mark.parametrize("with_state", WITH_STATE)
@pytest.mark.parametrize(("seq_len", "chunk_size", "num_heads", "num_groups", "state_size"), SHAPES)
def test_chunked_matches_reference(seq_len, chunk_size, num_heads, num_groups, state_size, with_state, with_d):
    inputs = make_inputs(seq_len, num_heads, num_groups, state_size, with_state=with_state, with_d=with_d)
    y_ref, state_ref, grads_ref = run_with_grads(ssd_reference, inputs)
    y, state, grads = run_with_grads(ssd_chunked, inputs, chunk_size=chunk_size)

    assert y.shape == (BATCH, seq_len, num_heads, HEAD_DIM)
    assert state.shape == (BATCH, num_heads, HEAD_DIM, state_size)
    assert_close(y, y_ref)
    assert_close(state, state_ref)
    assert set(grads) == set(grads_ref)
    for name, grad_ref in grads_ref.items():
        assert_close(grads[name], grad_ref)


@pytest.mark.parametrize("with_state", WITH_STATE)
@pytest.mark.parametrize(("seq_len", "chunk_size", "num_heads", "num_groups", "state_size"), SHAPES)
def test_chunked_without_autograd_matches_reference(seq_len, chunk_size, num_heads, num_groups, state_size, with_state):
    # Without autograd the chunk states are passed on in place (another code path than with gradients).
    inputs = make_inputs(seq_len, num_heads, num_groups, state_size, with_state=with_state, with_d=True)
    y_ref, state_ref = ssd_reference(**inputs)
    with torch.no_grad():
        y, state = ssd_chunked(**inputs, chunk_size=chunk_size)
    assert_close(y, y_ref)
    assert_close(state, state_ref)


@pytest.mark.parametrize("with_grads", [False, True], ids=["no-grad", "grad"])
def test_long_input_in_segments_matches_reference(monkeypatch, with_grads):
    # Segments of 32 tokens (two chunks of 16) over T=130: four full segments and a padded 2-token one.
    monkeypatch.setattr(ssd_module, "SEGMENT_TOKENS", 40)
    inputs = make_inputs(130, 6, 3, 7, with_state=True, with_d=True)
    if with_grads:
        y_ref, state_ref, grads_ref = run_with_grads(ssd_reference, inputs)
        y, state, grads = run_with_grads(ssd_chunked, inputs, chunk_size=16)
        for name, grad_ref in grads_ref.items():
            assert_close(grads[name], grad_ref, name=f"grad {name}")
    else:
        y_ref, state_ref = ssd_reference(**inputs)
        with torch.no_grad():
            y, state = ssd_chunked(**inputs, chunk_size=16)
    assert_close(y, y_ref)
    assert_close(state, state_ref)


@pytest.mark.parametrize("with_d", WITH_D)
@pytest.mark.parametrize("with_state", WITH_STATE)
@pytest.mark.parametrize(("seq_len", "chunk_size", "num_heads", "num_groups", "state_size"), SHAPES)
def test_step_loop_matches_reference(seq_len, chunk_size, num_heads, num_groups, state_size, with_state, with_d):
    inputs = make_inputs(seq_len, num_heads, num_groups, state_size, with_state=with_state, with_d=with_d)
    y_ref, state_ref = ssd_reference(**inputs)

    state = inputs["initial_state"]
    if state is None:
        state = torch.zeros(BATCH, num_heads, HEAD_DIM, state_size)
    ys = []
    for t in range(seq_len):
        x, dt, B, C = (inputs[k][:, t] for k in ("x", "dt", "B", "C"))
        y_t, state = ssd_step(x, dt, inputs["A"], B, C, inputs["D"], state)
        ys.append(y_t)
    assert_close(torch.stack(ys, dim=1), y_ref)
    assert_close(state, state_ref)


def test_step_does_not_modify_state():
    inputs = make_inputs(1, 4, 2, 7, with_state=True, with_d=True)
    state = inputs["initial_state"]
    before = state.clone()
    x, dt, B, C = (inputs[k][:, 0] for k in ("x", "dt", "B", "C"))
    _, new_state = ssd_step(x, dt, inputs["A"], B, C, inputs["D"], state)
    torch.testing.assert_close(state, before, rtol=0, atol=0)
    assert new_state.data_ptr() != state.data_ptr()


@pytest.mark.parametrize("split", [1, 16, 50, 129], ids=lambda s: f"split{s}")
@pytest.mark.parametrize(
    "fn",
    [
        pytest.param(ssd_reference, id="reference"),
        pytest.param(lambda **kw: ssd_chunked(**kw, chunk_size=16), id="chunked"),
    ],
)
def test_split_sequence_matches_one_call(fn, split):
    inputs = make_inputs(130, 6, 3, 7, with_state=True, with_d=True)
    y_full, state_full = fn(**inputs)

    first = {k: v[:, :split] if k in ("x", "dt", "B", "C") else v for k, v in inputs.items()}
    y_a, state_a = fn(**first)
    second = {k: v[:, split:] if k in ("x", "dt", "B", "C") else v for k, v in inputs.items()}
    y_b, state_b = fn(**{**second, "initial_state": state_a})
    assert_close(torch.cat([y_a, y_b], dim=1), y_full)
    assert_close(state_b, state_full)


def test_gradcheck_chunked():
    # T=5 with L=2: two full chunks and one padded, so the padding path is differentiated too.
    inputs = make_inputs(5, 2, 1, 3, with_state=True, with_d=True, head_dim=3, dtype=torch.float64)
    names = list(inputs)
    leaves = tuple(v.requires_grad_(True) for v in inputs.values())

    def fn(*args):
        return ssd_chunked(**dict(zip(names, args, strict=True)), chunk_size=2)

    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_computes_in_fp32(dtype):
    inputs = make_inputs(63, 4, 2, 16, with_state=True, with_d=True)
    half = {k: v.to(dtype) for k, v in inputs.items()}
    # The fp32 reference on the rounded inputs isolates the op's own precision from input rounding.
    y_ref, state_ref = ssd_reference(**{k: v.float() for k, v in half.items()})
    for fn in (ssd_reference, ssd_chunked):
        y, state = fn(**half)
        assert y.dtype == dtype
        assert state.dtype == torch.float32
        assert_close(state, state_ref, name="state")  # fp32, measured 5e-8 of its largest entry
        # y is computed in fp32 and rounded once: it may differ from the rounded truth by one rounding step.
        assert_close(y, y_ref.to(dtype), name="y")


def test_chunked_padding_leaves_final_state_untouched():
    # A chunk size that does not divide T must give the same final state as one that does.
    inputs = make_inputs(48, 3, 1, 7, with_state=True, with_d=False)
    _, state_even = ssd_chunked(**inputs, chunk_size=16)
    _, state_padded = ssd_chunked(**inputs, chunk_size=20)
    assert_close(state_padded, state_even)


def test_rejects_heads_not_divisible_by_groups():
    inputs = make_inputs(5, 3, 2, 7, with_state=False, with_d=False)
    with pytest.raises(ValueError, match=r"heads \(3\) must be divisible by the number of B/C groups \(2\)"):
        ssd_chunked(**inputs)
