"""moe_experts_grouped and moe_experts_sync_free against the reference loop; route against a re-derivation
and transformers."""

import ctypes
import itertools
import os
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from hybridlm.ops import native
from hybridlm.ops.moe import (
    grouped_mm_supported,
    moe_experts_grouped,
    moe_experts_reference,
    moe_experts_sync_free,
    route,
    sync_free_applies,
    tokens_per_expert,
)
from tests.helpers import assert_close, torch_threads

NUM_EXPERTS = 8
USED_EXPERTS = 6  # experts 6 and 7 never receive a token
HAS_GROUPED_MM = hasattr(F, "grouped_mm")


def make_experts(N, D, I, K, activation, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    rows = 2 * I if activation == "swiglu" else I
    hidden_ND = torch.randn(N, D, generator=g).to(dtype)
    up_proj_EFD = (torch.randn(NUM_EXPERTS, rows, D, generator=g) / D**0.5).to(dtype)
    down_proj_EDI = (torch.randn(NUM_EXPERTS, D, I, generator=g) / I**0.5).to(dtype)
    topk_ids_NK = torch.rand(N, USED_EXPERTS, generator=g).argsort(dim=-1)[:, :K]
    topk_weights_NK = torch.rand(N, K, generator=g)
    return hidden_ND, topk_ids_NK, topk_weights_NK, up_proj_EFD, down_proj_EDI


@pytest.fixture
def grouped_mm_calls(monkeypatch):
    """Records each F.grouped_mm call, to tell which path moe_experts_grouped took."""
    calls = []
    if HAS_GROUPED_MM:
        real = F.grouped_mm

        def counting(*args, **kwargs):
            calls.append(tuple(args[0].shape))
            return real(*args, **kwargs)

        monkeypatch.setattr(F, "grouped_mm", counting)
    return calls


SHAPES = list(itertools.product([1, 37], [60, 64], [20, 24], [1, 2, 6], ["swiglu", "relu2"]))
SHAPE_IDS = [f"N{n}-D{d}-I{i}-K{k}-{a}" for n, d, i, k, a in SHAPES]


@pytest.mark.parametrize(("N", "D", "I", "K", "activation"), SHAPES, ids=SHAPE_IDS)
def test_grouped_forward_matches_reference_on_grouped_mm_path(N, D, I, K, activation, grouped_mm_calls, monkeypatch):
    monkeypatch.setattr(native, "expert_matmuls", lambda *args: None)  # as where torch has no MKL
    inputs = make_experts(N, D, I, K, activation)
    with torch.no_grad():
        expected = moe_experts_reference(*inputs, activation)
        # fp32 on CPU with D and I multiples of 4 and no autograd: grouped_mm runs
        assert grouped_mm_supported(inputs[0], inputs[3], inputs[4], inputs[2]) == HAS_GROUPED_MM
        actual = moe_experts_grouped(*inputs, activation)
    assert len(grouped_mm_calls) == (2 if HAS_GROUPED_MM else 0)
    assert_close(actual, expected)


@pytest.mark.skipif(not native.blas_available(), reason="needs the kernels and torch's MKL")
@pytest.mark.parametrize(("N", "D", "I", "K", "activation"), SHAPES, ids=SHAPE_IDS)
def test_grouped_forward_on_the_kernel_pool_matches_reference(N, D, I, K, activation, grouped_mm_calls):
    """Inference in fp32 on CPU: tiles of single-threaded sgemm on the kernels' pool, no grouped_mm."""
    inputs = make_experts(N, D, I, K, activation, seed=3)
    with torch.no_grad(), torch_threads(2):
        expected = moe_experts_reference(*inputs, activation)
        actual = moe_experts_grouped(*inputs, activation)
    assert grouped_mm_calls == []
    assert_close(actual, expected)


@pytest.mark.skipif(not native.blas_available(), reason="needs the kernels and torch's MKL")
@pytest.mark.parametrize(("I", "activation"), [(300, "swiglu"), (600, "relu2"), (256, "relu2")])
def test_pool_tiles_cover_every_column_under_skewed_routing(I, activation, grouped_mm_calls):
    """Prefill-sized: several 256-column tiles an expert (the last one partial), experts of very different
    sizes handed out most rows first, two experts empty; a NaN in a token stays in that token's output."""
    hidden, ids, weights, up, down = make_experts(257, 96, I, 2, activation, seed=4)
    ids[:200, 0] = 3  # expert 3 takes most first slots; the second slot keeps its draw unless that is 3
    ids[:200, 1] = torch.where(ids[:200, 1] == 3, torch.tensor(0), ids[:200, 1])
    hidden[5, 7] = float("nan")
    with torch.no_grad(), torch_threads(2):
        expected = moe_experts_reference(hidden, ids, weights, up, down, activation)
        actual = moe_experts_grouped(hidden, ids, weights, up, down, activation)
    assert grouped_mm_calls == []
    assert torch.isnan(actual[5]).all() and not torch.isnan(torch.cat([actual[:5], actual[6:]])).any()
    keep = torch.arange(257) != 5
    assert_close(actual[keep], expected[keep])


@pytest.mark.skipif(not native.blas_available(), reason="needs the kernels and torch's MKL")
def test_pool_runs_each_tile_on_one_thread_whatever_torch_set():
    """torch.set_num_threads sets MKL's own count, which overrides OpenMP's: a tile's sgemm that followed
    it would start an OpenMP team of its own on each pool worker (new threads, two cores oversubscribed).
    The caller's MKL count is left as it was."""
    torch_cpu = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
    with torch_threads(2), torch.no_grad():
        gate = torch.randn(512, 512)
        native.swiglu(gate @ gate, gate)  # torch's OpenMP threads and the pool's workers exist from here on
        before = (len(os.listdir("/proc/self/task")), torch_cpu.MKL_Get_Max_Threads())
        inputs = make_experts(512, 256, 512, 2, "relu2", seed=5)
        for _ in range(3):
            moe_experts_grouped(*inputs, "relu2")
        after = (len(os.listdir("/proc/self/task")), torch_cpu.MKL_Get_Max_Threads())
    assert after == before, (before, after)


@pytest.mark.parametrize(("N", "D", "I", "K", "activation"), SHAPES, ids=SHAPE_IDS)
def test_grouped_gradients_match_reference_on_fallback_path(N, D, I, K, activation, grouped_mm_calls):
    hidden, ids, weights, up, down = make_experts(N, D, I, K, activation, seed=1)
    leaves = [t.clone().requires_grad_() for t in (hidden, weights, up, down)]
    grad_out = torch.randn(N, D, generator=torch.Generator().manual_seed(2))

    expected = moe_experts_reference(leaves[0], ids, leaves[1], leaves[2], leaves[3], activation)
    expected_grads = torch.autograd.grad(expected, leaves, grad_out)
    assert not grouped_mm_supported(leaves[0], leaves[2], leaves[3], leaves[1])
    actual = moe_experts_grouped(leaves[0], ids, leaves[1], leaves[2], leaves[3], activation)
    actual_grads = torch.autograd.grad(actual, leaves, grad_out)

    assert grouped_mm_calls == []
    assert_close(actual, expected)
    for name, a, e in zip(
        ["hidden", "topk_weights", "up_proj", "down_proj"], actual_grads, expected_grads, strict=True
    ):
        assert_close(a, e, name=name)


@pytest.mark.parametrize(("N", "D", "I", "K", "activation"), SHAPES, ids=SHAPE_IDS)
def test_sync_free_forward_and_gradients_match_reference(N, D, I, K, activation):
    hidden, ids, weights, up, down = make_experts(N, D, I, K, activation, seed=3)
    leaves = [t.clone().requires_grad_() for t in (hidden, weights, up, down)]
    grad_out = torch.randn(N, D, generator=torch.Generator().manual_seed(4))
    expected = moe_experts_reference(leaves[0], ids, leaves[1], leaves[2], leaves[3], activation)
    expected_grads = torch.autograd.grad(expected, leaves, grad_out)
    actual = moe_experts_sync_free(leaves[0], ids, leaves[1], leaves[2], leaves[3], activation)
    actual_grads = torch.autograd.grad(actual, leaves, grad_out)
    assert_close(actual, expected)
    for name, a, e in zip(
        ["hidden", "topk_weights", "up_proj", "down_proj"], actual_grads, expected_grads, strict=True
    ):
        assert_close(a, e, name=name)


def test_sync_free_form_is_for_decode_sized_batches_where_grouped_mm_does_not_run(monkeypatch):
    hidden, _, _, up, down = make_experts(4, 64, 24, 2, "swiglu")
    per_expert = (up[0].numel() + down[0].numel()) * 4
    monkeypatch.setattr("hybridlm.ops.moe.grouped_mm_supported", lambda *args: False)
    monkeypatch.setattr("hybridlm.ops.moe.GATHERED_MAX_BYTES", 3 * per_expert)
    assert sync_free_applies(hidden, 3, up, down)  # 3 copies of an expert fit
    assert not sync_free_applies(hidden, 4, up, down)  # 4 do not, and 4 < 8 experts: all would read more
    assert sync_free_applies(hidden, NUM_EXPERTS, up, down)  # every expert once
    assert sync_free_applies(hidden, native.MAX_EXPERT_ROWS, up, down)
    assert not sync_free_applies(hidden, native.MAX_EXPERT_ROWS + 1, up, down)  # prefill: grouped
    assert not sync_free_applies(hidden, 0, up, down)
    monkeypatch.setattr("hybridlm.ops.moe.grouped_mm_supported", lambda *args: True)
    assert not sync_free_applies(hidden, 2, up, down)  # grouped_mm reads each expert once


@pytest.mark.parametrize(("D", "I"), [(62, 24), (64, 21), (61, 19)])
def test_unaligned_shapes_take_the_fallback(D, I, grouped_mm_calls, monkeypatch):
    monkeypatch.setattr(native, "expert_matmuls", lambda *args: None)
    inputs = make_experts(37, D, I, 2, "swiglu")
    with torch.no_grad():
        assert not grouped_mm_supported(inputs[0], inputs[3], inputs[4])
        actual = moe_experts_grouped(*inputs, "swiglu")
        expected = moe_experts_reference(*inputs, "swiglu")
    assert grouped_mm_calls == []
    assert_close(actual, expected)


@pytest.mark.skipif(not HAS_GROUPED_MM, reason="needs torch.nn.functional.grouped_mm")
def test_bf16_grouped_mm_close_to_fp32_reference(grouped_mm_calls):
    inputs = make_experts(37, 64, 24, 2, "relu2")
    bf16_inputs = [t.bfloat16() if t.is_floating_point() else t for t in inputs]
    with torch.no_grad():
        actual = moe_experts_grouped(*bf16_inputs, "relu2")
        expected = moe_experts_reference(*inputs, "relu2")
    assert len(grouped_mm_calls) == 2
    assert actual.dtype == torch.bfloat16
    # bf16 inputs, bf16 matmuls and a bf16 intermediate against the fp32 truth: measured 6.1e-3 of the
    # largest entry; 3e-2 is five times that.
    assert_close(actual.float(), expected, rtol=3e-2)


def test_grouped_mm_supported_rejects_what_grouped_mm_cannot_run():
    hidden, _, weights, up, down = make_experts(4, 64, 24, 2, "swiglu")
    with torch.no_grad():
        assert grouped_mm_supported(hidden, up, down, weights) == HAS_GROUPED_MM
        assert not grouped_mm_supported(hidden.double(), up.double(), down.double())
        assert not grouped_mm_supported(hidden, up.bfloat16(), down)
        misaligned_up = torch.empty(up.numel() + 1)[1:].view_as(up).copy_(up)  # data_ptr off by 4 bytes
        assert not grouped_mm_supported(hidden, misaligned_up, down)
        assert not grouped_mm_supported(hidden, up.transpose(1, 2).contiguous().transpose(1, 2), down)
        assert grouped_mm_supported(hidden.bfloat16(), up.bfloat16(), down.bfloat16()) == HAS_GROUPED_MM
        # D = 60: 240 bytes per fp32 row is fine, 120 bytes per bf16 row is not a multiple of 16
        hidden, _, _, up, down = make_experts(4, 60, 24, 2, "swiglu")
        assert grouped_mm_supported(hidden, up, down) == HAS_GROUPED_MM
        assert not grouped_mm_supported(hidden.bfloat16(), up.bfloat16(), down.bfloat16())


def test_expert_shape_errors_name_the_expected_shapes():
    hidden, ids, weights, up, down = make_experts(4, 64, 24, 2, "swiglu")
    with pytest.raises(ValueError, match=r"up_proj \(8, 24, 64\)"):
        moe_experts_grouped(hidden, ids, weights, up, down, "relu2")
    with pytest.raises(ValueError, match="activation must be one of"):
        moe_experts_reference(hidden, ids, weights, up, down, "gelu")


def test_no_tokens_gives_empty_output():
    hidden, ids, weights, up, down = make_experts(0, 64, 24, 2, "swiglu")
    assert moe_experts_grouped(hidden, ids, weights, up, down, "swiglu").shape == (0, 64)


def test_tokens_per_expert_matches_counter():
    ids = make_experts(37, 8, 4, 6, "relu2")[1]
    counts = tokens_per_expert(ids, NUM_EXPERTS)
    expected = Counter(ids.flatten().tolist())
    assert counts.dtype == torch.int64
    assert counts.tolist() == [expected[e] for e in range(NUM_EXPERTS)]


def route_one_token(scores, top_k, bias, num_groups, topk_groups, norm, scale):
    """Plain-Python DeepSeek-V3 routing of one token, from the formulas."""
    num_experts = len(scores)
    choice = [s + b for s, b in zip(scores, bias, strict=True)]
    size = num_experts // num_groups
    group_score = [sum(sorted(choice[g * size : (g + 1) * size])[-2:]) for g in range(num_groups)]
    kept = sorted(range(num_groups), key=lambda g: -group_score[g])[:topk_groups]
    eligible = [e for e in range(num_experts) if e // size in kept]
    chosen = sorted(eligible, key=lambda e: -choice[e])[:top_k]
    weights = [scores[e] for e in chosen]
    total = sum(weights) if norm else 1.0
    return {e: w / total * scale for e, w in zip(chosen, weights, strict=True)}


def as_dicts(ids_NK, weights_NK):
    return [dict(zip(i, w, strict=True)) for i, w in zip(ids_NK.tolist(), weights_NK.tolist(), strict=True)]


def assert_same_routing(ids_NK, weights_NK, expected):
    got = as_dicts(ids_NK, weights_NK)
    for n, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert set(g) == set(e), f"token {n}: chose {sorted(g)}, expected {sorted(e)}"
        for expert in e:
            assert g[expert] == pytest.approx(e[expert], rel=1e-5), f"token {n}, expert {expert}"


@pytest.mark.parametrize(
    ("scoring", "top_k", "num_groups", "topk_groups", "use_bias", "norm", "scale"),
    [
        ("softmax", 2, 1, 1, False, True, 1.0),
        ("softmax", 3, 1, 1, False, False, 1.0),
        ("sigmoid", 6, 1, 1, True, True, 2.5),
        ("sigmoid", 4, 4, 2, True, True, 2.5),
        ("sigmoid", 3, 8, 3, False, False, 1.0),
        ("softmax", 5, 2, 1, True, True, 1.0),
    ],
)
def test_route_matches_plain_rederivation(scoring, top_k, num_groups, topk_groups, use_bias, norm, scale):
    g = torch.Generator().manual_seed(3)
    logits_NE = torch.randn(29, 16, generator=g)
    bias_E = torch.randn(16, generator=g) * 0.3 if use_bias else None
    ids, weights, scores = route(logits_NE, top_k, scoring, bias_E, norm, scale, num_groups, topk_groups)
    assert ids.shape == weights.shape == (29, top_k)
    assert weights.dtype == scores.dtype == torch.float32
    plain_scores = logits_NE.softmax(-1) if scoring == "softmax" else logits_NE.sigmoid()
    assert_close(scores, plain_scores, name="scores")
    bias = bias_E.tolist() if use_bias else [0.0] * 16
    expected = [route_one_token(s, top_k, bias, num_groups, topk_groups, norm, scale) for s in plain_scores.tolist()]
    assert_same_routing(ids, weights, expected)


def test_route_keeps_weights_in_fp32_for_bf16_logits():
    logits = torch.randn(5, 8).bfloat16()
    _, weights, scores = route(logits, 2)
    assert weights.dtype == scores.dtype == torch.float32
    assert_close(weights.sum(-1), torch.ones(5), name="weight sums")


def test_route_rejects_impossible_groups():
    with pytest.raises(ValueError, match="divisible"):
        route(torch.randn(3, 10), 2, num_groups=4, topk_groups=2)
    with pytest.raises(ValueError, match="exceeds"):
        route(torch.randn(3, 16), 5, num_groups=8, topk_groups=2)


@pytest.mark.hf
@pytest.mark.parametrize(("num_groups", "topk_groups", "norm"), [(1, 1, True), (4, 2, True), (2, 1, False)])
def test_route_matches_nemotron_h_router(num_groups, topk_groups, norm):
    modeling = pytest.importorskip("transformers.models.nemotron_h.modeling_nemotron_h")
    config = SimpleNamespace(
        num_experts_per_tok=4,
        num_local_experts=16,
        hidden_size=32,
        routed_scaling_factor=2.5,
        n_group=num_groups,
        topk_group=topk_groups,
        norm_topk_prob=norm,
    )
    router = modeling.NemotronHTopkRouter(config)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        router.weight.copy_(torch.randn(16, 32, generator=g))
        router.e_score_correction_bias.copy_(torch.randn(16, generator=g) * 0.5)
        hidden = torch.randn(23, 32, generator=g)
        logits, hf_weights, hf_ids = router(hidden)
    ids, weights, _ = route(logits, 4, "sigmoid", router.e_score_correction_bias, norm, 2.5, num_groups, topk_groups)
    assert_same_routing(ids, weights, as_dicts(hf_ids, hf_weights))


@pytest.mark.hf
@pytest.mark.parametrize("norm", [True, False])
def test_route_matches_qwen3_next_router(norm):
    modeling = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    config = SimpleNamespace(num_experts_per_tok=3, num_experts=10, norm_topk_prob=norm, hidden_size=32)
    router = modeling.Qwen3NextTopKRouter(config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        router.weight.copy_(torch.randn(10, 32, generator=g))
        logits, hf_weights, hf_ids = router(torch.randn(23, 32, generator=g))
    ids, weights, _ = route(logits, 3, "softmax", norm_topk_prob=norm)
    assert_same_routing(ids, weights, as_dicts(hf_ids, hf_weights))


@pytest.mark.hf
@pytest.mark.parametrize(
    ("module", "experts_class", "activation"),
    [("nemotron_h", "NemotronHExperts", "relu2"), ("qwen3_next", "Qwen3NextExperts", "swiglu")],
)
def test_experts_match_transformers_eager_experts(module, experts_class, activation):
    modeling = pytest.importorskip(f"transformers.models.{module}.modeling_{module}")
    config = SimpleNamespace(
        n_routed_experts=NUM_EXPERTS,
        num_experts=NUM_EXPERTS,
        hidden_size=64,
        moe_intermediate_size=24,
        moe_latent_size=None,
        mlp_hidden_act="relu2",
        hidden_act="silu",
        _experts_implementation="eager",  # the per-expert loop, not transformers' own grouped_mm path
    )
    experts = getattr(modeling, experts_class)(config)
    hidden, ids, weights, up, down = make_experts(37, 64, 24, 2, activation)
    with torch.no_grad():
        (experts.gate_up_proj if activation == "swiglu" else experts.up_proj).copy_(up)
        experts.down_proj.copy_(down)
        expected = experts(hidden, ids, weights)
        actual = moe_experts_grouped(hidden, ids, weights, up, down, activation)
    assert_close(actual, expected)
