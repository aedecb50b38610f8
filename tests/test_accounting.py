"""Parameter and memory accounting, checked against real instantiations and published figures."""

import pytest
import torch

from hybridlm.accounting import block_params, cache_bytes, count_params, pure_attention_kv_bytes
from hybridlm.config import HybridConfig
from hybridlm.model import HybridLM
from tests.helpers import tiny_config


@pytest.mark.parametrize("name", ["debug-tiny", "debug-small"])
def test_param_count_equals_instantiated_model(name):
    config = HybridConfig.from_preset(name)
    model = HybridLM(config)
    params = count_params(config)
    assert params.total == sum(p.numel() for p in model.parameters())
    for index, block in enumerate(model.layers):
        assert block_params(config.pattern[index], config).total == sum(p.numel() for p in block.parameters())


def test_active_params_of_moe_block_count_only_chosen_experts():
    config = tiny_config("E")
    model = HybridLM(config)
    moe = model.layers[0]
    experts = sum(p.numel() for p in moe.mixer.experts.parameters())
    all_params = sum(p.numel() for p in moe.parameters())
    k, e = config.moe.num_experts_per_tok, config.moe.num_experts
    assert block_params("E", config).active == all_params - experts + experts * k // e


def test_tied_embeddings_are_counted_once():
    config = tiny_config(tie_word_embeddings=True)
    model = HybridLM(config)
    assert count_params(config).total == sum(p.numel() for p in model.parameters())


def test_nemotron_3_nano_matches_published_counts():
    params = count_params(HybridConfig.from_preset("nemotron-3-nano-30b-a3b"))
    assert params.total == pytest.approx(31.6e9, rel=0.02)
    # NVIDIA's "3.2B active" counts the LM head but not the input embedding (REFERENCE.md).
    assert params.active_without_embedding == pytest.approx(3.2e9, rel=0.02)
    assert params.by_layer_type["mamba2"]["per_block_total"] == pytest.approx(38.74e6, rel=1e-3)
    assert params.by_layer_type["attention"]["per_block_total"] == pytest.approx(23.40e6, rel=1e-3)
    assert params.by_layer_type["moe"]["per_block_total"] == pytest.approx(1297.5e6, rel=1e-3)
    assert params.by_layer_type["moe"]["per_block_active"] == pytest.approx(80.17e6, rel=1e-3)


def test_qwen3_next_matches_published_counts():
    params = count_params(HybridConfig.from_preset("qwen3-next-80b-a3b"))
    assert params.total == pytest.approx(79.67e9, rel=0.02)
    assert params.active == pytest.approx(3.87e9, rel=0.02)
    assert params.active_without_embedding_and_head == pytest.approx(3.25e9, rel=0.02)


def test_nemotron_kv_cache_is_6_of_52_of_pure_attention():
    config = HybridConfig.from_preset("nemotron-3-nano-30b-a3b")
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


@pytest.mark.parametrize(
    ("pattern", "overrides"),
    [("P-", {}), ("mE", {}), ("MEGm*-EMP", {}), ("M*", {"mamba2": {"has_gated_norm": False}})],
    ids=["parallel", "mamba1", "all", "mamba2-without-norm"],
)
def test_param_count_equals_instantiated_model_for_every_block_type(pattern, overrides):
    config = tiny_config(pattern, **overrides)
    assert count_params(config).total == sum(p.numel() for p in HybridLM(config).parameters())
