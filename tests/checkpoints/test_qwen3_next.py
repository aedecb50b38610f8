"""qwen3_next: hybridlm against transformers' Qwen3NextForCausalLM (docs/hf-families.md §2.2)."""

import json

import pytest
import torch

import hybridlm
from hybridlm.checkpoints import read_config
from hybridlm.checkpoints.hf.qwen3_next import _ba_layout, _qkvz_layout
from hybridlm.config import GatedDeltaNetConfig
from tests.checkpoints.hf_tiny import build_qwen3_next, save_tiny
from tests.checkpoints.parity import check_chunked_decode, check_greedy, check_logits, check_round_trip, prompts

pytestmark = pytest.mark.hf


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf_model = build_qwen3_next()
    path = save_tiny(hf_model, tmp_path_factory.mktemp("qwen3_next") / "tiny")
    return hf_model, hybridlm.from_pretrained(path), path


def test_config(pair):
    config = pair[1].config
    assert config.pattern == "GEGEG-*E" and config.num_hidden_layers == 4
    assert config.is_norm_zero_centered and config.norm_eps == 1e-6
    a = config.attention
    assert (a.head_dim, a.rotary_dim, a.has_qk_norm, a.has_output_gate) == (32, 8, True, True)
    assert config.moe.has_shared_expert_gate and config.moe.norm_topk_prob and config.mlp.intermediate_size == 96


@pytest.mark.parametrize("length", [20, 80])  # 80 crosses the DeltaNet's 64-token chunk
def test_logits(pair, length):
    hf_model, model, _ = pair
    check_logits(hf_model, model, prompts(length))


def test_greedy_generation(pair):
    hf_model, model, _ = pair
    check_greedy(hf_model, model, prompts(seed=1))


# at T = 80 the first prefill chunk (70 tokens) crosses the DeltaNet's 64-token chunk, and the second
# (10 tokens) starts from a carried state
@pytest.mark.parametrize(("length", "split"), [(20, 11), (80, 70)])
def test_chunked_prefill_then_decode(pair, length, split):
    hf_model, model, _ = pair
    check_chunked_decode(hf_model, model, prompts(length, seed=2), split)


def test_round_trip_through_transformers(pair, tmp_path):
    hf_model, model, _ = pair
    check_round_trip(hf_model, model, tmp_path / "out", prompts())


def test_interleaved_projection_conversion_is_exact():
    """in_proj_qkvz / in_proj_ba (per key-head group) <-> in_proj_qkv, z, b, a (blocked), both ways."""
    gdn = GatedDeltaNetConfig(num_key_heads=2, num_value_heads=6, key_head_dim=4, value_head_dim=3)
    r = 3
    qkvz = torch.arange(2 * (4 + 4 + 2 * r * 3) * 5, dtype=torch.float32).view(-1, 5)
    qkv, z = _qkvz_layout("k", gdn).to_ours([qkvz])
    # group 1's query rows come right after group 0's in the blocked layout
    group = 4 + 4 + 2 * r * 3
    assert torch.equal(qkv[4:8], qkvz[group : group + 4])
    assert torch.equal(z[:9], qkvz[4 + 4 + 9 : group])
    assert torch.equal(_qkvz_layout("k", gdn).to_disk([qkv, z])[0], qkvz)
    ba = torch.randn(2 * 6, 5)
    b, a = _ba_layout("k", gdn).to_ours([ba])
    assert torch.equal(b[3:], ba[6:9]) and torch.equal(a[:3], ba[3:6])
    assert torch.equal(_ba_layout("k", gdn).to_disk([b, a])[0], ba)


def test_old_config_spellings(pair, tmp_path):
    """transformers 4.x config.json: top-level rope_theta / partial_rotary_factor, no layer_types."""
    _, model, path = pair
    data = json.loads((path / "config.json").read_text())
    rope = data.pop("rope_parameters")
    data.pop("layer_types")
    data.update(rope_theta=rope["rope_theta"], partial_rotary_factor=rope["partial_rotary_factor"])
    data["full_attention_interval"] = 4
    (tmp_path / "config.json").write_text(json.dumps(data))
    config = read_config(tmp_path)
    assert config.pattern == model.config.pattern and config.attention == model.config.attention
