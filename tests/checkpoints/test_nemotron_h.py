"""nemotron_h: hybridlm against transformers' NemotronHForCausalLM (docs/hf-families.md §2.1)."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

import hybridlm
from hybridlm.checkpoints import read_config
from tests.checkpoints.hf_tiny import build_nemotron_h, save_tiny
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
    hf_model = build_nemotron_h()
    path = save_tiny(hf_model, tmp_path_factory.mktemp("nemotron_h") / "tiny")
    return hf_model, hybridlm.from_pretrained(path), path


def test_config(pair):
    _, model, path = pair
    config = model.config
    assert config.pattern == "M*ME-E"
    assert config.num_hidden_layers == 6 and config.name == "tiny" and config.source == str(path)
    assert config.mamba2.time_step_limit == (0.01, math.inf)  # the clamp is time_step_min, not time_step_limit
    assert config.attention.rope_theta is None and config.attention.head_dim == 24
    moe = config.moe
    assert (moe.scoring, moe.activation, moe.num_groups, moe.topk_groups) == ("sigmoid", "relu2", 2, 1)
    assert moe.use_expert_bias and moe.routed_scaling_factor == 2.5 and not moe.has_shared_expert_gate
    assert read_config(path) == config


def test_logits(pair):
    hf_model, model, _ = pair
    check_logits(hf_model, model, prompts())


def test_greedy_generation(pair):
    hf_model, model, _ = pair
    check_greedy(hf_model, model, prompts(seed=1))


def test_chunked_prefill_then_decode(pair):
    # transformers' own cached decode skips the dt clamp: the reference is its full forward
    hf_model, model, _ = pair
    check_chunked_decode(hf_model, model, prompts(seed=2))


def test_round_trip_through_transformers(pair, tmp_path):
    hf_model, model, _ = pair
    check_round_trip(hf_model, model, tmp_path / "out", prompts())


def test_in_memory_layout_and_legacy_config(pair, tmp_path):
    """transformers 5.x names (model. prefix, stacked experts) and a legacy config.json with
    hybrid_override_pattern and mamba_* spellings load to the same model."""
    hf_model, _, path = pair
    data = json.loads((path / "config.json").read_text())
    data.pop("layers_block_type")
    data["hybrid_override_pattern"] = "M*ME-E"
    data["mamba_dt_min"] = data.pop("time_step_min")
    data["mamba_n_groups"] = data.pop("n_groups")
    data["mtp_hybrid_override_pattern"] = "*E"
    (tmp_path / "config.json").write_text(json.dumps(data))
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    assert "model.layers.3.mixer.experts.up_proj" in state
    state["mtp.layers.0.norm.weight"] = torch.ones(64)  # multi-token-prediction weights are ignored
    save_file(state, tmp_path / "model.safetensors")
    model = hybridlm.from_pretrained(tmp_path)
    assert model.config.mamba2.time_step_limit[0] == 0.01 and model.config.mamba2.num_groups == 2
    ids = prompts()
    assert max_diff(ours_logits(model, ids), hf_logits(hf_model, ids)) < 1e-4


def test_dtype_cast_keeps_router_bias_fp32(pair):
    _, _, path = pair
    model = hybridlm.from_pretrained(path, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.layers[1].mixer.q_proj.weight.dtype == torch.bfloat16
    assert model.layers[3].mixer.gate.e_score_correction_bias.dtype == torch.float32
    assert model(prompts()).logits.dtype == torch.bfloat16
