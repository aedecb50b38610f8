"""jamba: hybridlm against transformers' JambaForCausalLM (docs/hf-families.md §2.5)."""

import pytest

import hybridlm
from hybridlm.checkpoints.hf.jamba import config_to_hf
from tests.checkpoints.hf_tiny import build_jamba, save_tiny
from tests.checkpoints.parity import check_chunked_decode, check_greedy, check_logits, check_round_trip, prompts

pytestmark = pytest.mark.hf


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf_model = build_jamba()
    path = save_tiny(hf_model, tmp_path_factory.mktemp("jamba") / "tiny")
    return hf_model, hybridlm.from_pretrained(path)


def test_config(pair):
    config = pair[1].config
    assert config.pattern == "m-*Em-mE*-mE" and config.num_hidden_layers == 6
    assert not config.moe.norm_topk_prob and config.moe.num_shared_experts == 0
    assert (config.mamba.intermediate_size, config.mamba.dt_rank, config.mamba.has_inner_norms) == (128, 4, True)
    hf = config_to_hf(config)
    assert (hf["attn_layer_period"], hf["attn_layer_offset"]) == (3, 1)
    assert (hf["expert_layer_period"], hf["expert_layer_offset"]) == (2, 1)


def test_logits(pair):
    hf_model, model = pair
    check_logits(hf_model, model, prompts())


def test_greedy_generation(pair):
    hf_model, model = pair
    check_greedy(hf_model, model, prompts(seed=1))


def test_chunked_prefill_then_decode(pair):
    # transformers' multi-token continuation over a cache is wrong (docs §1.4): compare with full forwards
    hf_model, model = pair
    check_chunked_decode(hf_model, model, prompts(seed=2))


def test_round_trip_through_transformers(pair, tmp_path):
    hf_model, model = pair
    check_round_trip(hf_model, model, tmp_path / "out", prompts())
