"""--routing-skew's knob: S = 0 changes nothing, the imbalance rises with S on every router path (prefill
through the router module, decode through the fused projection), the offsets are the same on every rank."""

from __future__ import annotations

import math

import pytest
import torch

from hybridlm import HybridLM
from hybridlm.distributed.skew import apply_routing_skew, check_routing_skew, zipf_offsets
from hybridlm.presets import get_preset
from tests.distributed.spawn import run_ranks
from tests.helpers import tiny_config

# softmax routing with a shared expert; sigmoid routing with an expert bias (Nemotron-H)
CONFIGS = {"softmax": lambda: tiny_config("ME*E"), "sigmoid": lambda: get_preset("debug-tiny-nemotron")}


def _model(name: str) -> HybridLM:
    torch.manual_seed(0)
    return HybridLM(CONFIGS[name]()).eval()


@torch.no_grad()
def _run(model: HybridLM) -> dict:
    """Logits of a prefill (8 x 16 tokens: past the fused projection's 64 rows) and of 6 decode steps
    (8 rows: the fused projection), and each MoE block's tokens per expert, summed per phase."""
    ids = torch.randint(0, model.config.vocab_size, (8, 16), generator=torch.Generator().manual_seed(1))
    moes = [block.mixer for block in model.layers if block.routes_experts]
    cache = model.new_cache(batch_size=8, max_seq_len=24)
    prefill = model(ids, cache=cache).logits
    counts = {"prefill": [m.last_tokens_per_expert.clone() for m in moes]}
    decode, decode_counts = [], [0] * len(moes)
    for step in range(6):
        decode.append(model.decode_step(ids[:, step], cache))
        decode_counts = [c + m.last_tokens_per_expert for c, m in zip(decode_counts, moes, strict=True)]
    counts["decode"] = decode_counts
    return {"prefill": prefill, "decode": torch.stack(decode), "counts": counts}


def _imbalance(counts: list[torch.Tensor]) -> float:
    """Max / mean tokens per expert, averaged over the MoE blocks."""
    return sum(float(c.max() / c.float().mean()) for c in counts) / len(counts)


@pytest.mark.parametrize("name", CONFIGS)
def test_zero_skew_changes_nothing_and_removing_a_skew_restores_the_model(name):
    model = _model(name)
    plain = _run(model)
    skew = apply_routing_skew(model, 0.0)
    assert all(bool((offset == 0).all()) for offset in skew.offsets.values())
    zero = _run(model)
    skew.remove()
    apply_routing_skew(model, 2.0).remove()
    restored = _run(model)
    for phase in ("prefill", "decode"):
        assert torch.equal(zero[phase], plain[phase]), phase
        assert torch.equal(restored[phase], plain[phase]), phase


@pytest.mark.parametrize("name", CONFIGS)
def test_imbalance_rises_with_the_skew_in_prefill_and_decode(name):
    model = _model(name)
    imbalance = {}
    for exponent in (0.0, 1.0, 4.0):
        skew = apply_routing_skew(model, exponent)
        run = _run(model)
        skew.remove()
        imbalance[exponent] = {phase: _imbalance(run["counts"][phase]) for phase in ("prefill", "decode")}
    top_k, num_experts = model.config.moe.num_experts_per_tok, model.config.moe.num_experts
    for phase in ("prefill", "decode"):
        assert imbalance[0.0][phase] < imbalance[1.0][phase] < imbalance[4.0][phase], (phase, imbalance)
        # S = 4: nearly every token on the first top_k experts of the order, the most imbalance there is
        assert imbalance[4.0][phase] > 0.9 * num_experts / top_k, (phase, imbalance)


def test_a_skew_changes_the_outputs_and_favours_the_experts_it_names():
    model = _model("sigmoid")
    plain = _run(model)
    skew = apply_routing_skew(model, 2.0, seed=3)
    skewed = _run(model)
    assert not torch.allclose(skewed["prefill"], plain["prefill"])
    moe_layers = [block.index for block in model.layers if block.routes_experts]
    for layer, counts_E in zip(moe_layers, skewed["counts"]["prefill"], strict=True):
        assert int(counts_E.argmax()) == skew.hottest_experts(layer, 1)[0], f"layer {layer}"


def test_offsets_follow_the_zipf_law_over_a_seeded_order():
    first = zipf_offsets(8, 1.5, torch.Generator().manual_seed(7))
    again = zipf_offsets(8, 1.5, torch.Generator().manual_seed(7))
    assert torch.equal(first, again)
    expected = sorted(-1.5 * math.log(1 + position) for position in range(8))
    assert sorted(first.tolist()) == pytest.approx(expected)
    assert not torch.equal(first, zipf_offsets(8, 1.5, torch.Generator().manual_seed(8)))


@pytest.mark.parametrize("value", [-0.5, math.nan, math.inf])
def test_bad_exponents_are_refused_naming_the_flag(value):
    with pytest.raises(ValueError, match=r"^--routing-skew .*: give an exponent >= 0"):
        check_routing_skew(value)


def test_a_model_without_moe_blocks_or_already_skewed_is_refused():
    with pytest.raises(ValueError, match="has no MoE blocks"):
        apply_routing_skew(HybridLM(tiny_config("M*-")), 1.0)
    model = _model("softmax")
    apply_routing_skew(model, 1.0)
    with pytest.raises(ValueError, match="already carry a logit offset"):
        apply_routing_skew(model, 1.0)


def sharded_offsets_worker(rank: int, world_size: int) -> dict:
    from hybridlm.distributed import shard_experts

    skew = apply_routing_skew(shard_experts(_model("sigmoid")), 2.0, seed=5)
    return {layer: offset.clone() for layer, offset in skew.offsets.items()}


def test_every_rank_of_a_sharded_model_gets_the_single_process_offsets():
    single = apply_routing_skew(_model("sigmoid"), 2.0, seed=5).offsets
    for rank, offsets in enumerate(run_ranks(2, sharded_offsets_worker)):
        assert offsets.keys() == single.keys()
        for layer, offset in offsets.items():
            torch.testing.assert_close(offset, single[layer], rtol=1e-5, atol=0, msg=f"rank {rank} layer {layer}")
