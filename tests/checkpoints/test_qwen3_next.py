"""qwen3_next and qwen3_5_moe (both in hf/qwen3_next.py): hybridlm against transformers'
Qwen3NextForCausalLM and Qwen3_5MoeForCausalLM (docs/hf-families.md §2.2-2.3).

The parity checks run on both families; a test for one family alone picks it with
``@pytest.mark.parametrize("pair", [...], indirect=True)``.
"""

import json

import pytest
import torch
from safetensors.torch import save_file

import hybridlm
from hybridlm.checkpoints import read_config
from hybridlm.checkpoints.hf.qwen3_next import _ba_layout, _qkvz_layout
from hybridlm.config import GatedDeltaNetConfig
from tests.checkpoints.hf_tiny import build_qwen3_5_moe, build_qwen3_next, save_tiny
from tests.checkpoints.parity import (
    check_chunked_decode,
    check_greedy,
    check_logits,
    check_round_trip,
    hf_logits,
    max_diff,
    ours_logits,
    prompts,
)

pytestmark = pytest.mark.hf

BUILDERS = {"qwen3_next": build_qwen3_next, "qwen3_5_moe": build_qwen3_5_moe}


@pytest.fixture(scope="module", params=list(BUILDERS))
def pair(request, tmp_path_factory):
    hf_model = BUILDERS[request.param]()
    path = save_tiny(hf_model, tmp_path_factory.mktemp(request.param) / "tiny")
    return hf_model, hybridlm.from_pretrained(path), path


@pytest.mark.parametrize("pair", ["qwen3_next"], indirect=True)
def test_qwen3_next_config(pair):
    config = pair[1].config
    assert config.pattern == "GEGEG-*E" and config.num_hidden_layers == 4
    assert config.is_norm_zero_centered and config.norm_eps == 1e-6
    a = config.attention
    assert (a.head_dim, a.rotary_dim, a.has_qk_norm, a.has_output_gate) == (32, 8, True, True)
    assert config.moe.has_shared_expert_gate and config.moe.norm_topk_prob and config.mlp.intermediate_size == 96


@pytest.mark.parametrize("pair", ["qwen3_5_moe"], indirect=True)
def test_qwen3_5_moe_config(pair):
    config = pair[1].config
    assert config.pattern == "GEGEGE*E" and config.extra["hf_model_type"] == "qwen3_5_moe_text"
    assert config.is_norm_zero_centered and config.attention.rotary_dim == 8 and config.moe.norm_topk_prob


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


@pytest.mark.parametrize("pair", ["qwen3_next"], indirect=True)
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


@pytest.mark.parametrize("pair", ["qwen3_5_moe"], indirect=True)
def test_composite_checkpoint(pair, tmp_path):
    """A Qwen3_5MoeForConditionalGeneration directory: text_config, model.language_model. prefix, fused
    experts, and model.visual.* / mtp.* tensors that are ignored."""
    hf_model, _, path = pair
    text = json.loads((path / "config.json").read_text())
    composite = {
        "model_type": "qwen3_5_moe",
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "text_config": text,
        "vision_config": {"depth": 1},
        "tie_word_embeddings": False,
    }
    (tmp_path / "config.json").write_text(json.dumps(composite))
    state = {}
    for name, tensor in hf_model.state_dict().items():  # in-memory names: experts.gate_up_proj [E, 2I, H]
        state[name.replace("model.", "model.language_model.", 1)] = tensor.contiguous()
    state["model.visual.patch_embed.proj.weight"] = torch.zeros(4, 3)
    state["mtp.layers.0.mlp.experts.0.up_proj.weight"] = torch.zeros(4, 3)
    save_file(state, tmp_path / "model.safetensors")
    model = hybridlm.from_pretrained(tmp_path)
    ids = prompts()
    assert max_diff(ours_logits(model, ids), hf_logits(hf_model, ids)) < 1e-4
