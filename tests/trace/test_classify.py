"""Kernel / operator names -> layer type, on names from the fixtures and from upstream kernels."""

from __future__ import annotations

import gzip
import json
import sqlite3
from collections import Counter

import pytest

from hybridlm.trace.classify import (
    RULE_OWN_NAME,
    RULE_RANGE_NAME,
    attribute_by_name,
    classify_kernel,
    parse_block_range,
    parse_step_range,
)
from hybridlm.trace.schema import LAYER_TYPES
from tests.helpers import FIXTURES

# fmt: off
NAMES = [
    # from the Kineto fixture (a recommender training step on an A100)
    ("ncclKernel_SendRecv_RING_SIMPLE_Sum_int8_t(ncclDevComm*, unsigned long, ncclWork*)", "comm"),
    ("nccl:all_to_all", "comm"),  # TorchRec's embedding all-to-all: not MoE
    ("c10d::alltoall_base_", "comm"),
    ("All2All_Pooled_Req", "comm"),
    ("nccl:all_reduce", "comm"),
    ("nccl:_all_gather_base", "comm"),
    ("## alltoall_fwd_single ##", "comm"),
    ("## all2all_data:kjt splits ##", "comm"),
    ("## KJTAllToAllSplitsAwaitable wait() ##", "comm"),
    ("ampere_sgemm_32x128_tn", None),
    ("void cutlass::Kernel<cutlass_80_tensorop_s1688gemm_64x64_32x6_tn_align1>(cutlass_80_tensorop_s1688gemm_64x64_32x6_tn_align1::Params)", None),  # noqa: E501
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<int>, at::detail::Array<char*, 1> >(int, at::native::FillFunctor<int>, at::detail::Array<char*, 1>)", None),  # noqa: E501
    ("void at::native::(anonymous namespace)::LayerNormForwardCUDAKernel<float, float>(long, float const*, float const*, float const*, float const*, float const*, float*)", None),  # noqa: E501
    ("aten::broadcast_tensors", None),
    ("cudaLaunchKernel", None),
    # from the Nsight and Ingero fixtures
    ("saxpy(double *, double *, double *, double, int)", None),
    ("MPI_Send", None),
    ("cuLaunchKernel", None),
    ("sched_switch", None),
    # Mamba-2 (mamba_ssm Triton SSD kernels, causal-conv1d, the decode step)
    ("_chunk_scan_fwd_kernel", "mamba2"),
    ("_chunk_state_fwd_kernel", "mamba2"),
    ("_state_passing_fwd_kernel", "mamba2"),
    ("_bmm_chunk_fwd_kernel", "mamba2"),
    ("_chunk_cumsum_fwd_kernel", "mamba2"),
    ("_selective_scan_update_kernel", "mamba2"),
    ("void selective_scan_fwd_kernel<Selective_Scan_fwd_kernel_traits<32, 4, true, true, true, false, false, c10::BFloat16, float, float>>(SSMParamsBase)", "mamba2"),  # noqa: E501
    ("void causal_conv1d_fwd_kernel<Causal_conv1d_fwd_kernel_traits<128, 4, true, c10::BFloat16>>(ConvParamsBase)", "mamba2"),  # noqa: E501
    ("aten::conv1d", "mamba2"),
    ("mamba_chunk_scan_combined", "mamba2"),
    ("ssd_combined_fwd", "mamba2"),
    ("ClassDescriptorKernel", None),  # 'ssd' inside a word is not SSD
    # Gated DeltaNet (flash-linear-attention)
    ("chunk_gated_delta_rule_fwd_kernel_h_blockdim64", "gdn"),
    ("fused_recurrent_gated_delta_rule_fwd_kernel", "gdn"),
    ("chunk_scaled_dot_kkt_fwd_kernel", "gdn"),  # not 'scaled_dot_product' attention
    ("chunk_local_cumsum_scalar_kernel", "gdn"),
    ("solve_tril_16x16_kernel", "gdn"),
    ("fla::ops::gated_delta_rule", "gdn"),
    # attention
    ("void flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 32, 4, false, false, cutlass::bfloat16_t, Flash_kernel_traits<128, 128, 32, 4, cutlass::bfloat16_t> >, false, true, false, false, true, true, false, false>(flash::Flash_fwd_params)", "attention"),  # noqa: E501
    ("void flash::flash_fwd_splitkv_kernel<Flash_fwd_kernel_traits<128, 64, 128, 4>>(flash::Flash_fwd_params)", "attention"),  # noqa: E501
    ("fmha_cutlassF_f32_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<float, cutlass::arch::Sm80, true, 64, 64, 64, true, true>::Params)", "attention"),  # noqa: E501
    ("aten::scaled_dot_product_attention", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("_attn_fwd", "attention"),
    ("void paged_attention_v2_kernel<__nv_bfloat16, 128, 16, 128>", "attention"),
    ("scaled_masked_softmax_warp_forward", "attention"),
    ("void (anonymous namespace)::softmax_warp_forward<float, float, float, 10, false, false>", None),
    # MoE
    ("fused_moe_kernel", "moe"),
    ("moe_align_block_size_kernel", "moe"),
    ("void vllm::moe::topkGatingSoftmax<4, 128, 4, 16, 32, int>", "moe"),
    ("void at::native::sbtopk::gatherTopK<float, unsigned int, 2, false>", "moe"),
    ("aten::_grouped_mm", "moe"),
    ("cutlass_grouped_gemm_kernel", "moe"),
    ("deep_ep::intranode::dispatch<8, 768>", "moe_a2a"),
    ("MoEAlltoAllTokenDispatcher.token_permutation", "moe_a2a"),  # Megatron's MoE dispatcher
    ("expert_all_to_all", "moe_a2a"),
    ("ncclDevKernel_AllToAll_RING_LL", "comm"),  # an all-to-all, but nothing says MoE
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", "comm"),
    ("", None),
    (None, None),
]
# fmt: on


@pytest.mark.parametrize(("name", "expected"), NAMES, ids=lambda v: str(v)[:40] if v else repr(v))
def test_classify_kernel(name, expected):
    assert classify_kernel(name) == expected


def test_every_fixture_kernel_classifies_to_a_known_type():
    """No kernel of the real traces crashes the rules or lands outside the known types."""
    trace = json.loads(gzip.decompress((FIXTURES / "kineto/sampled_rank-1.json.gz").read_bytes()))
    names = {e["name"] for e in trace["traceEvents"] if e.get("cat") == "kernel"}
    con = sqlite3.connect(f"{(FIXTURES / 'nsight/saxpy-mpi-cuda_nsys_perlmutter0.sqlite').as_uri()}?mode=ro", uri=True)
    names |= {r[0] for r in con.execute("SELECT value FROM StringIds")}
    found = Counter(classify_kernel(n) for n in names)
    assert set(found) - {None} <= set(LAYER_TYPES)
    # a recommender and an MPI saxpy: their kernels carry no hybrid layer names
    assert found["mamba2"] == found["gdn"] == found["attention"] == 0
    assert found["comm"] >= 1


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("L12.moe", (12, "moe")),
        ("L0.attention", (0, "attention")),
        ("L3.moe_a2a", (3, "moe_a2a")),
        ("L7.mamba2", (7, "mamba2")),
        ("L12.moe.router", (12, "moe")),
        ("L5.GDN", (5, "gdn")),
        ("L.moe", None),
        ("Layer1.moe", None),
        ("xL1.moe", None),
        ("L1", None),
        ("ProfilerStep#551", None),
        (None, None),
    ],
)
def test_parse_block_range(name, expected):
    assert parse_block_range(name) == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("ProfilerStep#551", (551, None)),
        ("hybridlm.step3.decode", (3, "decode")),
        ("hybridlm.step0.prefill", (0, "prefill")),
        ("hybridlm.step7.train", (7, "train")),
        ("hybridlm.step3.warmup", None),
        ("ProfilerStep#", None),
        ("L3.moe", None),
        (None, None),
    ],
)
def test_parse_step_range(name, expected):
    assert parse_step_range(name) == expected


SENDRECV = "ncclKernel_SendRecv_RING_SIMPLE_Sum_int8_t(ncclDevComm*, unsigned long, ncclWork*)"


@pytest.mark.parametrize(
    ("name", "range_name", "expected"),
    [
        (SENDRECV, "nccl:all_reduce", ("comm", RULE_RANGE_NAME)),
        (SENDRECV, "nccl:all_to_all", ("comm", RULE_RANGE_NAME)),
        (SENDRECV, "MoELayer.forward", ("moe_a2a", RULE_RANGE_NAME)),  # a collective an MoE range launched
        ("flash_fwd_kernel", "nccl:all_reduce", ("comm", RULE_RANGE_NAME)),  # the range first, not the name
        ("_chunk_scan_fwd_kernel", "## encoder fp8 None ##", ("mamba2", RULE_OWN_NAME)),  # the range says nothing
        ("fused_moe_kernel", None, ("moe", RULE_OWN_NAME)),
        ("ampere_sgemm_32x128_tn", "## forward ##", (None, None)),
    ],
)
def test_the_launching_range_speaks_before_the_kernel_name(name, range_name, expected):
    assert attribute_by_name(name, range_name) == expected


def test_every_rule_gives_a_known_layer_type():
    for name, expected in NAMES:
        assert expected is None or expected in LAYER_TYPES, name
