"""granitemoehybrid: hybridlm against transformers' GraniteMoeHybridForCausalLM (docs/hf-families.md §2.4)."""

import json
from pathlib import Path

import pytest

import hybridlm
from hybridlm.checkpoints import read_config
from tests.checkpoints.hf_tiny import build_granitemoehybrid, save_tiny
from tests.checkpoints.parity import check_chunked_decode, check_greedy, check_logits, check_round_trip, prompts

pytestmark = pytest.mark.hf

VARIANTS = {
    "rope": {},
    "nope": {"position_embedding_type": "nope"},  # what Granite 4.0-H ships
    "dense": {"num_local_experts": 0, "position_embedding_type": "nope"},  # shared MLP alone: '-' blocks
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    hf_model = build_granitemoehybrid(**VARIANTS[request.param])
    path = save_tiny(hf_model, tmp_path_factory.mktemp("granite") / request.param)
    return hf_model, hybridlm.from_pretrained(path), request.param


def test_config(pair):
    _, model, variant = pair
    config = model.config
    assert config.pattern == ("M-*-M-M-" if variant == "dense" else "ME*EMEME")
    assert (config.embedding_multiplier, config.residual_multiplier, config.logits_scaling) == (3.0, 0.5, 2.5)
    assert config.attention.softmax_scale == 0.3 and config.tie_word_embeddings
    assert (config.attention.rope_theta is None) == (variant != "rope")
    if variant != "dense":
        assert config.moe.num_shared_experts == 1 and not config.moe.has_shared_expert_gate


def test_logits(pair):
    hf_model, model, _ = pair
    check_logits(hf_model, model, prompts())


def test_greedy_generation(pair):
    hf_model, model, _ = pair
    check_greedy(hf_model, model, prompts(seed=1))


def test_chunked_prefill_then_decode(pair):
    hf_model, model, _ = pair
    check_chunked_decode(hf_model, model, prompts(seed=2))


def test_round_trip_through_transformers(pair, tmp_path):
    hf_model, model, _ = pair
    check_round_trip(hf_model, model, tmp_path / "out", prompts())


def test_legacy_layer_type_spelling(pair, tmp_path):
    """Published Granite 4.0-H config.json files say "mamba" / "attention" (transformers remaps them)."""
    model = pair[1]
    data = json.loads((Path(model.config.source) / "config.json").read_text())
    legacy = {"linear_attention": "mamba", "full_attention": "attention"}
    data["layers_block_type"] = [legacy[t] for t in data.pop("layer_types")]
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert read_config(tmp_path).pattern == model.config.pattern
