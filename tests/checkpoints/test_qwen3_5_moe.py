"""qwen3_5_moe: hybridlm against transformers' Qwen3_5MoeForCausalLM (docs/hf-families.md §2.3)."""

import json

import pytest
import torch
from safetensors.torch import save_file

import hybridlm
from tests.checkpoints.hf_tiny import build_qwen3_5_moe, save_tiny
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


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf_model = build_qwen3_5_moe()
    path = save_tiny(hf_model, tmp_path_factory.mktemp("qwen3_5_moe") / "tiny")
    return hf_model, hybridlm.from_pretrained(path), path


def test_config(pair):
    config = pair[1].config
    assert config.pattern == "GEGEGE*E" and config.extra["hf_model_type"] == "qwen3_5_moe_text"
    assert config.is_norm_zero_centered and config.attention.rotary_dim == 8 and config.moe.norm_topk_prob


@pytest.mark.parametrize("length", [20, 80])
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
