"""Parameter and memory accounting, checked against real instantiations and published figures."""

import pytest
import torch

from hybridlm.accounting import ParamCount, block_params, cache_bytes, count_params, pure_attention_kv_bytes
from hybridlm.model import HybridLM
from hybridlm.presets import get_preset
from tests.helpers import tiny_config


def counts_of_built_model(model: HybridLM) -> ParamCount:
    """The ParamCount of a real model, from its parameter tensors: the truth count_params predicts from the
    config. Active = total less the routed experts each token skips (num_experts - top_k of num_experts)."""
    config = model.config
    total = sum(p.numel() for p in model.parameters())  # a tied LM head is the embedding's tensor, counted once
    embedding = model.embeddings.weight.numel()
    lm_head = 0 if model.lm_head.weight is model.embeddings.weight else model.lm_head.weight.numel()
    by_layer_type: dict[str, dict[str, int]] = {}
    skipped = 0
    for block in model.layers:
        block_total = sum(p.numel() for p in block.parameters())
        block_active = block_total
        if block.routes_experts:
            routed = sum(p.numel() for p in block.mixer.experts.parameters())
            num_experts, top_k = config.moe.num_experts, config.moe.num_experts_per_tok
            block_active -= routed * (num_experts - top_k) // num_experts
        skipped += block_total - block_active
        row = by_layer_type.setdefault(block.layer_type, {"blocks": 0, "total": 0, "active": 0})
        row["blocks"] += 1
        row["total"] += block_total
        row["active"] += block_active
        row["per_block_total"], row["per_block_active"] = block_total, block_active
    return ParamCount(
        total=total,
        active=total - skipped,
        embedding=embedding,
        lm_head=lm_head,
        final_norm=model.norm_f.weight.numel(),
        by_layer_type=by_layer_type,
    )


SMALL_CONFIGS = {
    "debug-tiny": lambda: get_preset("debug-tiny"),
    "debug-small": lambda: get_preset("debug-small"),
    "debug-tiny-nemotron": lambda: get_preset("debug-tiny-nemotron"),
    "debug-tiny-qwen3-next": lambda: get_preset("debug-tiny-qwen3-next"),
    "tied": lambda: tiny_config(tie_word_embeddings=True),
    "parallel": lambda: tiny_config("P-"),
    "mamba1": lambda: tiny_config("mE", mamba={"use_bias": True, "use_conv_bias": False, "has_inner_norms": False}),
    "all": lambda: tiny_config("MEGm*-EMP"),
    "mamba2-variants": lambda: tiny_config(
        "M*", mamba2={"has_gated_norm": False, "use_bias": True, "use_conv_bias": False}
    ),
    "attention-variants": lambda: tiny_config(
        "*-", attention={"has_qk_norm": True, "has_output_gate": True, "bias": True}, mlp={"activation": "relu2"}
    ),
    "moe-variants": lambda: tiny_config(
        "EE", moe={"num_shared_experts": 0, "activation": "relu2", "use_expert_bias": True, "num_experts_per_tok": 3}
    ),
    "moe-gated-shared": lambda: tiny_config("E", moe={"has_shared_expert_gate": True}),
}


@pytest.mark.parametrize("name", list(SMALL_CONFIGS))
def test_param_count_equals_built_model(name):
    config = SMALL_CONFIGS[name]()
    model = HybridLM(config)
    assert count_params(config) == counts_of_built_model(model)
    for index, block in enumerate(model.layers):
        assert block_params(config.pattern[index], config).total == sum(p.numel() for p in block.parameters())


def nemotron_3_nano_counts_from_config_json() -> dict[str, int]:
    """Parameter counts worked out by hand from the fields of Nemotron 3 Nano's published config.json (the
    preset's source) and the nemotron_h module layout (docs/hf-families.md), independently of hybridlm's formulas."""
    hidden, vocab = 2688, 131072
    # Mamba-2: in_proj to z, x (64 heads x 64), B, C (8 groups x 128) and dt (64); a depthwise conv of width 4
    # with bias over x, B, C; dt_bias, A_log and D per head; the gated norm over x; out_proj.
    inner, groups, state, heads = 64 * 64, 8, 128, 64
    conv_dim = inner + 2 * groups * state
    mamba2 = hidden * (2 * inner + 2 * groups * state + heads) + conv_dim * (4 + 1) + 3 * heads + inner
    mamba2 += inner * hidden
    # Attention: 32 query heads, 2 KV heads, head_dim 128, no biases, no RoPE parameters.
    attention = hidden * (32 + 2 + 2) * 128 + 32 * 128 * hidden
    # MoE: 128 routed relu2 experts (up and down, no gate) of 1856, one shared of 3712, a router with the
    # e_score_correction_bias.
    expert, shared, router = 2 * hidden * 1856, 2 * hidden * 3712, 128 * hidden + 128
    moe_total, moe_active = 128 * expert + shared + router, 6 * expert + shared + router
    # Every block has its pre-norm; 23 Mamba-2, 6 attention, 23 MoE blocks; untied embedding and head.
    mamba2, attention, moe_total, moe_active = (n + hidden for n in (mamba2, attention, moe_total, moe_active))
    outer = 2 * vocab * hidden + hidden
    return {
        "mamba2": mamba2,
        "attention": attention,
        "moe_total": moe_total,
        "moe_active": moe_active,
        "total": outer + 23 * mamba2 + 6 * attention + 23 * moe_total,
        "active": outer + 23 * mamba2 + 6 * attention + 23 * moe_active,
        "embedding": vocab * hidden,
    }


def test_nemotron_3_nano_counts_equal_the_config_json_arithmetic():
    params = count_params(get_preset("nemotron-3-nano-30b-a3b"))
    expected = nemotron_3_nano_counts_from_config_json()
    assert params.by_layer_type["mamba2"]["per_block_total"] == expected["mamba2"]
    assert params.by_layer_type["attention"]["per_block_total"] == expected["attention"]
    assert params.by_layer_type["moe"]["per_block_total"] == expected["moe_total"]
    assert params.by_layer_type["moe"]["per_block_active"] == expected["moe_active"]
    assert params.total == expected["total"]
    assert params.active == expected["active"]
    assert params.embedding == expected["embedding"]


def test_nemotron_3_nano_rounds_to_the_published_figures():
    # NVIDIA publishes only rounded figures: 31.6B total, 3.2B active counting the LM head but not the input
    # embedding, 3.6B counting both. The exact counts must round to exactly those.
    params = count_params(get_preset("nemotron-3-nano-30b-a3b"))
    assert f"{params.total / 1e9:.1f}" == "31.6"
    assert f"{params.active_without_embedding / 1e9:.1f}" == "3.2"
    assert f"{params.active / 1e9:.1f}" == "3.6"


def test_qwen3_next_reproduces_the_published_counts_exactly():
    # The exact counts recorded for the preset's source config.json (the project's reference notes).
    params = count_params(get_preset("qwen3-next-80b-a3b"))
    assert params.total == 79_674_391_296
    assert params.active == 3_874_929_408  # counting the embedding and the LM head
    vocab, hidden = 151936, 2048
    assert params.active_without_embedding_and_head == 3_874_929_408 - 2 * vocab * hidden


def test_nemotron_kv_cache_is_6_of_52_of_pure_attention():
    config = get_preset("nemotron-3-nano-30b-a3b")
    context = 128 * 1024
    memory = cache_bytes(config, 1, context)
    assert memory.kv == 6 * 2 * 2 * 128 * 2 * context  # blocks x KV heads x dims x (K, V) x bf16 bytes
    assert memory.kv / pure_attention_kv_bytes(config, 1, context) == pytest.approx(6 / 52)
    # Mamba-2 state per sequence: 23 x 64 heads x 64 x 128 x 4 bytes = 46 MiB
    assert memory.recurrent == 23 * 64 * 64 * 128 * 4


@pytest.mark.parametrize("pattern", ["MEGm*-EM", "*", "GG", "M-", "m", "P-"])
def test_cache_bytes_equal_allocated_cache(pattern):
    config = tiny_config(pattern)
    model = HybridLM(config)
    cache = model.new_cache(batch_size=3, max_seq_len=40, dtype=torch.float32)
    predicted = cache_bytes(config, 3, 40, torch.float32)
    assert cache.nbytes() == predicted.total
    assert cache.bytes_by_kind() == {"kv": predicted.kv, "conv": predicted.conv, "recurrent": predicted.recurrent}
