"""bench_decode's roofline accounting against an independent recount; no timings.

The truth for the bytes a decode step reads is a recount of every weight tensor from the config's
sizes, written out here shape by shape (not from hybridlm's accounting, and not by walking the
model, which is what ``benchmarks.roofline`` does). The SSD / Gated DeltaNet FLOP estimates are
models of the chunked algorithms with no independent truth, so they are not tested here.
"""

import itertools

import pytest
import torch
from benchmarks import roofline
from benchmarks.llama_cpp import write_byte_level_tokenizer

from hybridlm import HybridLM, get_preset
from hybridlm.config import HybridConfig


def mlp_matrices(hidden: int, intermediate: int, activation: str) -> int:
    return (3 if activation == "swiglu" else 2) * hidden * intermediate


def recount(config: HybridConfig) -> tuple[int, int, int]:
    """(matrix elements a token always uses without embedding and LM head, vector elements, one routed
    expert's elements), from the config's sizes."""
    D = config.hidden_size
    matrices, vectors = 0, D  # final norm
    for char in config.pattern:
        vectors += D  # the block's pre-norm
        if char == "M":
            c = config.mamba2
            inner, groups_state = c.num_heads * c.head_dim, c.num_groups * c.state_size
            conv_dim = inner + 2 * groups_state
            matrices += D * (2 * inner + 2 * groups_state + c.num_heads)  # in_proj: z, x, B, C, dt
            matrices += conv_dim * c.conv_kernel + inner * D  # depthwise conv1d, out_proj
            vectors += conv_dim * c.use_conv_bias + 3 * c.num_heads + inner  # conv bias, dt_bias/A_log/D, norm
        elif char == "G":
            c = config.gdn
            key_dim, value_dim = c.num_key_heads * c.key_head_dim, c.num_value_heads * c.value_head_dim
            conv_dim = 2 * key_dim + value_dim
            matrices += D * conv_dim + D * value_dim + 2 * D * c.num_value_heads  # qkv, z, b, a
            matrices += conv_dim * c.conv_kernel + value_dim * D  # conv1d, out_proj
            vectors += 2 * c.num_value_heads + c.value_head_dim  # dt_bias, A_log, gated norm
        elif char == "*":
            a = config.attention
            q_out = a.num_heads * a.head_dim * (2 if a.has_output_gate else 1)
            matrices += D * q_out + 2 * D * a.num_kv_heads * a.head_dim + a.num_heads * a.head_dim * D
            vectors += 2 * a.head_dim if a.has_qk_norm else 0
        elif char == "-":
            matrices += mlp_matrices(D, config.mlp.intermediate_size, config.mlp.activation)
        elif char == "E":
            e = config.moe
            matrices += e.num_experts * D  # router
            vectors += e.num_experts if e.use_expert_bias else 0
            shared = e.num_shared_experts * e.shared_intermediate_size
            matrices += mlp_matrices(D, shared, e.activation) + (D if e.has_shared_expert_gate else 0)
        else:
            raise AssertionError(f"the recount does not know block {char!r}")
    moe = config.moe
    return matrices, vectors, mlp_matrices(D, moe.intermediate_size, moe.activation)


@pytest.mark.parametrize("preset", ["debug-tiny-nemotron", "debug-tiny-qwen3-next"])
def test_decode_bytes_match_a_recount_of_every_weight(preset: str) -> None:
    config = get_preset(preset)
    model = HybridLM(config)
    matrices, vectors, per_expert = recount(config)
    lm_head = config.vocab_size * config.hidden_size
    counts = roofline.weight_counts(model)

    assert counts.dense_matmul == matrices
    assert counts.dense == matrices + vectors + lm_head
    assert counts.per_expert == [per_expert] * config.pattern.count("E")
    k = config.moe.num_experts_per_tok
    assert counts.decode_bytes(k) == 4 * (matrices + vectors + lm_head + k * per_expert * config.pattern.count("E"))
    touched = [1.5 * (i + 1) for i in range(config.pattern.count("E"))]
    assert counts.decode_bytes(touched) == pytest.approx(4 * (counts.dense + per_expert * sum(touched)))


def test_prefill_weight_and_attention_flops_match_a_recount() -> None:
    config = get_preset("debug-tiny-nemotron")
    model = HybridLM(config)
    matrices, _, per_expert = recount(config)
    T, B = 37, 3
    flops = roofline.prefill_flops(model, T, batch_size=B)

    routed = config.moe.num_experts_per_tok * per_expert * config.pattern.count("E")
    assert flops.weights == 2 * B * T * (matrices + routed)
    assert flops.lm_head == 2 * B * config.vocab_size * config.hidden_size  # the last position of each row
    a = config.attention
    causal_pairs = int(torch.ones(T, T).tril().sum())
    assert flops.attention == B * config.pattern.count("*") * 4 * a.num_heads * a.head_dim * causal_pairs


def test_a_tied_lm_head_is_read_once() -> None:
    config = get_preset("debug-tiny-nemotron", tie_word_embeddings=True)
    model = HybridLM(config)
    matrices, vectors, _ = recount(config)
    assert model.lm_head.weight is model.embeddings.weight
    assert roofline.weight_counts(model).dense == matrices + vectors + config.vocab_size * config.hidden_size


@pytest.mark.parametrize(("num_experts", "top_k", "num_tokens"), [(5, 2, 1), (5, 2, 3), (6, 3, 2), (4, 1, 4)])
def test_expected_distinct_experts_is_the_mean_over_every_routing(num_experts: int, top_k: int, num_tokens: int):
    subsets = list(itertools.combinations(range(num_experts), top_k))
    routings = list(itertools.product(subsets, repeat=num_tokens))
    mean = sum(len(set().union(*routing)) for routing in routings) / len(routings)
    assert roofline.expected_distinct_experts(num_experts, top_k, num_tokens) == pytest.approx(mean)


def test_the_converter_tokenizer_has_the_vocab_size_and_round_trips_bytes(tmp_path) -> None:
    from tokenizers import Tokenizer

    write_byte_level_tokenizer(tmp_path, 1000)
    tokenizer = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == 1000
    text = "héllo, wörld ✓"
    assert tokenizer.decode(tokenizer.encode(text).ids) == text
