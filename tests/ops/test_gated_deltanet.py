"""The chunked and step forms of the gated delta rule against the reference loop, and the reference
against transformers' Qwen3-Next implementation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hybridlm.ops import gated_deltanet as gated_deltanet_module
from hybridlm.ops.gated_deltanet import gated_deltanet_chunked, gated_deltanet_reference, gated_deltanet_step
from tests.helpers import assert_close

INPUT_NAMES = ("q", "k", "v", "g", "beta", "initial_state")
# Per-step log-decay scales: "mild" keeps most of the state across a 64-token chunk, "strong"
# forgets almost everything within a few tokens (cumulative decay down to ~exp(-250) per chunk).
# "mixed" alternates them over the batch, so one case covers both regimes.
DECAY_SCALES = {"mild": (0.1,), "strong": (4.0,), "mixed": (0.1, 4.0)}


@pytest.fixture(autouse=True, scope="module")
def single_threaded():
    """Run this module on one intra-op thread, restoring the setting afterwards.

    The ops here are many small matmuls; with two threads on a busy two-core machine, OpenMP
    barriers waiting on a descheduled thread made the module 5-10x slower (60 s instead of 6 s).
    """
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


def make_inputs(
    batch: int,
    seq_len: int,
    num_heads: int,
    key_dim: int,
    value_dim: int,
    decay: str = "mixed",
    has_initial_state: bool = True,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, torch.Tensor | None]:
    """Random inputs shaped as the op expects them: q and k L2-normalised, g <= 0, beta in (0, 1)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    lead = (batch, seq_len, num_heads)
    decay_scales = DECAY_SCALES[decay]
    decay_scale_B = torch.tensor([decay_scales[i % len(decay_scales)] for i in range(batch)])
    inputs = {
        "q": F.normalize(randn(*lead, key_dim), dim=-1),
        "k": F.normalize(randn(*lead, key_dim), dim=-1),
        "v": randn(*lead, value_dim),
        "g": -F.softplus(randn(*lead)) * decay_scale_B.view(batch, 1, 1),
        "beta": randn(*lead).sigmoid(),
        "initial_state": randn(batch, num_heads, key_dim, value_dim) if has_initial_state else None,
    }
    return {name: None if x is None else x.to(dtype) for name, x in inputs.items()}


def outputs_and_grads(op, inputs: dict, **kwargs) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Run ``op`` and backpropagate a fixed random-weighted sum of its output and final state."""
    leaves = {name: x.clone().requires_grad_() for name, x in inputs.items() if x is not None}
    o, final_state = op(**leaves, **kwargs)
    gen = torch.Generator().manual_seed(1234)
    loss = (o * torch.randn(o.shape, generator=gen)).sum()
    loss = loss + (final_state * torch.randn(final_state.shape, generator=gen)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return o.detach(), final_state.detach(), dict(zip(leaves, grads, strict=True))


@pytest.mark.parametrize("has_initial_state", [False, True], ids=["zero_state", "initial_state"])
@pytest.mark.parametrize("num_heads", [1, 3], ids=["H1", "H3"])
@pytest.mark.parametrize(("key_dim", "value_dim"), [(60, 60), (32, 48)], ids=["K60V60", "K32V48"])
@pytest.mark.parametrize("chunk_size", [16, 64], ids=["C16", "C64"])
@pytest.mark.parametrize("seq_len", [1, 5, 63, 64, 130], ids=lambda t: f"T{t}")
def test_chunked_matches_reference(seq_len, chunk_size, key_dim, value_dim, num_heads, has_initial_state):
    inputs = make_inputs(2, seq_len, num_heads, key_dim, value_dim, "mixed", has_initial_state)

    o_ref, state_ref, grads_ref = outputs_and_grads(gated_deltanet_reference, inputs)
    o, state, grads = outputs_and_grads(gated_deltanet_chunked, inputs, chunk_size=chunk_size)

    assert o.shape == (2, seq_len, num_heads, value_dim)
    assert state.shape == (2, num_heads, key_dim, value_dim)
    assert_close(o, o_ref)
    assert_close(state, state_ref)
    assert grads.keys() == grads_ref.keys()
    # One scale for all gradients: some are structurally zero (with a zero initial state the first decay
    # g[:, 0] multiplies nothing), and the chunked form computes those zeros as sums of cancelling terms
    # of gradient size, so a tensor-local scale of 0 would demand exact cancellation.
    grad_scale = max(grad.abs().max().item() for grad in grads_ref.values())
    for name in grads:
        assert_close(grads[name], grads_ref[name], scale=grad_scale)


@pytest.mark.parametrize("has_initial_state", [False, True], ids=["zero_state", "initial_state"])
def test_step_loop_matches_reference(has_initial_state):
    inputs = make_inputs(2, 37, 3, 32, 48, has_initial_state=has_initial_state)
    o_ref, state_ref = gated_deltanet_reference(**inputs)

    state = inputs["initial_state"]
    if state is None:
        state = torch.zeros(2, 3, 32, 48)
    outputs = []
    for t in range(37):
        state_before = state.clone()
        o_t, new_state = gated_deltanet_step(*(inputs[name][:, t] for name in INPUT_NAMES[:5]), state=state)
        torch.testing.assert_close(state, state_before, rtol=0, atol=0)  # input state untouched
        outputs.append(o_t)
        state = new_state

    assert_close(torch.stack(outputs, dim=1), o_ref)
    assert_close(state, state_ref)


@pytest.mark.parametrize("op", [gated_deltanet_reference, gated_deltanet_chunked], ids=["reference", "chunked"])
def test_state_carried_across_calls_equals_one_call(op):
    inputs = make_inputs(2, 100, 3, 32, 48)
    split = 37  # not a chunk boundary for chunk_size=16
    kwargs = {"chunk_size": 16} if op is gated_deltanet_chunked else {}
    first = {name: None if x is None else x[:, :split] for name, x in inputs.items()}
    second = {name: None if x is None else x[:, split:] for name, x in inputs.items()}
    first["initial_state"] = second["initial_state"] = inputs["initial_state"]

    o_full, state_full = op(**inputs, **kwargs)
    o_first, state_mid = op(**first, **kwargs)
    second["initial_state"] = state_mid
    o_second, state_end = op(**second, **kwargs)

    assert_close(torch.cat([o_first, o_second], dim=1), o_full)
    assert_close(state_end, state_full)


def test_long_input_in_segments_matches_reference(monkeypatch):
    # Segments of 32 tokens (two chunks of 16) over T=130: four full segments and a padded 2-token one.
    monkeypatch.setattr(gated_deltanet_module, "SEGMENT_TOKENS", 40)
    inputs = make_inputs(2, 130, 3, 32, 48)
    o_ref, state_ref, grads_ref = outputs_and_grads(gated_deltanet_reference, inputs)
    o, state, grads = outputs_and_grads(gated_deltanet_chunked, inputs, chunk_size=16)

    assert_close(o, o_ref)
    assert_close(state, state_ref)
    grad_scale = max(grad.abs().max().item() for grad in grads_ref.values())
    for name in grads:
        assert_close(grads[name], grads_ref[name], scale=grad_scale, name=f"grad {name}")


def test_empty_sequence_returns_the_initial_state():
    inputs = make_inputs(2, 0, 3, 16, 8)
    o, state = gated_deltanet_chunked(**inputs)
    assert o.shape == (2, 0, 3, 8)
    torch.testing.assert_close(state, inputs["initial_state"], rtol=0, atol=0)


def test_custom_scale_is_used_by_all_forms():
    inputs = make_inputs(1, 20, 2, 16, 8)
    o_ref, _ = gated_deltanet_reference(**inputs, scale=0.3)
    o_chunked, _ = gated_deltanet_chunked(**inputs, scale=0.3, chunk_size=8)
    o_step, _ = gated_deltanet_step(
        *(inputs[name][:, 0] for name in INPUT_NAMES[:5]), state=inputs["initial_state"], scale=0.3
    )
    o_default, _ = gated_deltanet_reference(**inputs)

    assert_close(o_chunked, o_ref)
    assert_close(o_step, o_ref[:, 0])
    assert_close(o_ref, o_default * 0.3 * 16**0.5)


def test_chunked_gradcheck_float64():
    # T=5 with chunk_size=2: three chunks, the last one padded.
    inputs = make_inputs(1, 5, 2, 3, 4, dtype=torch.float64)
    leaves = tuple(inputs[name].clone().requires_grad_() for name in INPUT_NAMES)

    def op(*args):
        return gated_deltanet_chunked(*args, chunk_size=2)

    assert torch.autograd.gradcheck(op, leaves)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_inputs_compute_in_fp32(dtype):
    inputs = make_inputs(2, 21, 3, 16, 24, dtype=dtype)
    upcast = {name: x.float() for name, x in inputs.items()}

    o, state = gated_deltanet_chunked(**inputs, chunk_size=8)
    o_fp32, state_fp32 = gated_deltanet_chunked(**upcast, chunk_size=8)
    o_step, state_step = gated_deltanet_step(
        *(inputs[name][:, 0] for name in INPUT_NAMES[:5]), state=inputs["initial_state"]
    )

    assert o.dtype == o_step.dtype == dtype
    assert state.dtype == state_step.dtype == torch.float32
    torch.testing.assert_close(o, o_fp32.to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(state, state_fp32, rtol=0, atol=0)


def test_shape_mismatch_names_the_tensor():
    inputs = make_inputs(2, 7, 3, 16, 8)
    inputs["beta"] = inputs["beta"][:, :, :2]
    with pytest.raises(ValueError, match=r"beta has shape \[2, 7, 2\], expected \[2, 7, 3\]"):
        gated_deltanet_chunked(**inputs)
    inputs = make_inputs(2, 7, 3, 16, 8)
    inputs["initial_state"] = inputs["initial_state"].transpose(-1, -2)
    with pytest.raises(ValueError, match=r"initial_state has shape \[2, 3, 8, 16\], expected \[2, 3, 16, 8\]"):
        gated_deltanet_reference(**inputs)


@pytest.mark.hf
@pytest.mark.parametrize("has_initial_state", [False, True], ids=["zero_state", "initial_state"])
@pytest.mark.parametrize("decay", ["mild", "strong", "mixed"])
def test_reference_matches_transformers_qwen3_next(decay, has_initial_state):
    qwen3_next = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    # Same [B, T, H, D] layout; it scales q by K ** -0.5 itself and L2-normalises only on request.
    inputs = make_inputs(2, 70, 3, 32, 48, decay, has_initial_state)

    o_hf, state_hf = qwen3_next.torch_recurrent_gated_delta_rule(
        inputs["q"],
        inputs["k"],
        inputs["v"],
        inputs["g"],
        inputs["beta"],
        initial_state=inputs["initial_state"],
        output_final_state=True,
        use_qk_l2norm_in_kernel=False,
    )
    o_ref, state_ref = gated_deltanet_reference(**inputs)
    o_chunked, state_chunked = gated_deltanet_chunked(**inputs, chunk_size=16)

    assert_close(o_ref, o_hf)
    assert_close(state_ref, state_hf)
    assert_close(o_chunked, o_hf)
    assert_close(state_chunked, state_hf)


def test_a_chunk_longer_than_the_input_costs_only_the_input():
    """chunk_size 10**12 on 5 tokens used to pad the input to 10**12 positions (a 256 TB allocation)."""
    inputs = make_inputs(2, 5, 3, 32, 48, "mixed", True)
    o_ref, state_ref = gated_deltanet_reference(**inputs)
    o, state = gated_deltanet_chunked(**inputs, chunk_size=10**12)
    assert_close(o, o_ref)
    assert_close(state, state_ref)
