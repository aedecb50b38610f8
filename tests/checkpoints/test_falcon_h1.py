"""falcon_h1: hybridlm against transformers' FalconH1ForCausalLM (docs/hf-families.md §2.6)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import hybridlm
from hybridlm.checkpoints import read_config, save_pretrained
from hybridlm.model import HybridLM
from hybridlm.presets import get_preset
from tests.checkpoints.hf_tiny import build_falcon_h1, save_tiny
from tests.checkpoints.parity import (
    LOGIT_ATOL,
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
transformers = pytest.importorskip("transformers")

VARIANTS = {
    "gated-norm": {},  # G2, gate then norm (the tiny model's default)
    "no-norm": {"mamba_rms_norm": False},  # G3: y * silu(z), no norm.weight (Falcon-H1-0.5B)
    "norm-before-gate": {"mamba_norm_before_gate": True},  # G2, norm then gate
    # every bias the family has, with the multipliers that reach them, and tied embeddings
    "biases-tied": {
        "attention_bias": True,
        "mlp_bias": True,
        "mamba_proj_bias": True,
        "projectors_bias": True,
        "tie_word_embeddings": True,
    },
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    hf_model = build_falcon_h1(**VARIANTS[request.param])
    path = save_tiny(hf_model, tmp_path_factory.mktemp("falcon_h1") / request.param)
    return hf_model, hybridlm.from_pretrained(path), path


def _keys(path: Path) -> set[str]:
    keys = set()
    for file in path.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            keys.update(f.keys())
    return keys


def test_config(pair):
    hf_model, model, path = pair
    config, hf = model.config, hf_model.config
    assert config.pattern == "P-P-P-" and config.num_hidden_layers == 3
    assert config.attention.head_dim == 24 and config.attention.rope_theta == 10000.0
    assert config.mamba2.intermediate_size == 96 and config.mamba2.num_groups == 2
    assert config.mamba2.has_gated_norm == hf.mamba_rms_norm
    assert config.mamba2.norm_before_gate == hf.mamba_norm_before_gate
    assert config.embedding_multiplier == 1.7 and config.logits_scaling == pytest.approx(1 / 0.6)
    folded = config.extra["folded_multipliers"]
    assert folded["ssm_multipliers"] == [0.35, 0.25, 0.45, 0.5, 0.3] and folded["key_multiplier"] == 0.4
    assert read_config(path) == config


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
    """Export divides the multipliers back out: transformers reads the same logits, the same tensor
    names, and (to fp32 round-off) the original tensors."""
    hf_model, model, path = pair
    out = tmp_path / "out"
    check_round_trip(hf_model, model, out, prompts())
    assert _keys(out) == _keys(path)
    original = {k: v for k, v in hf_model.state_dict().items() if k in _keys(path)}
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
    worst = max(max_diff(v, reloaded[k]) / (v.abs().max().item() or 1.0) for k, v in original.items())
    assert worst < 1e-6, f"unfolded tensors differ from the originals by {worst:.1e} (relative)"
    written = json.loads((out / "config.json").read_text())
    for key in ("ssm_multipliers", "ssm_in_multiplier", "key_multiplier", "mlp_multipliers", "embedding_multiplier"):
        assert written[key] == pytest.approx(getattr(hf_model.config, key)), key


def test_export_picks_falcon_h1_for_parallel_patterns(tmp_path):
    """A P/- model not read from falcon_h1 exports there by default, with neutral folded multipliers."""
    torch.manual_seed(0)
    config = get_preset("debug-tiny", pattern="P-P-", embedding_multiplier=1.5, logits_scaling=2.0)
    model = HybridLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(0.1 * torch.randn_like(param))
    save_pretrained(model, tmp_path / "hf", format="hf")
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["architectures"] == ["FalconH1ForCausalLM"] and written["lm_head_multiplier"] == 0.5
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = prompts()
    assert max_diff(ours_logits(model, ids), hf_logits(reloaded, ids)) < LOGIT_ATOL


def _edit_config(path: Path, **changes) -> None:
    data = json.loads((path / "config.json").read_text())
    data.update(changes)
    (path / "config.json").write_text(json.dumps(data))


def test_inexpressible_options_are_refused(tmp_path):
    path = save_tiny(build_falcon_h1(), tmp_path / "ckpt")
    _edit_config(path, mamba_proj_bias=True, projectors_bias=False)
    with pytest.raises(ValueError, match=r"ckpt/config\.json: mamba_proj_bias = True with projectors_bias = False"):
        hybridlm.from_pretrained(path)
    _edit_config(path, mamba_proj_bias=False, hidden_act="gelu")
    with pytest.raises(ValueError, match=r"ckpt/config\.json: hidden_act = 'gelu' is not supported"):
        hybridlm.from_pretrained(path)
    _edit_config(path, hidden_act="silu", ssm_multipliers=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"ssm_multipliers = \[1\.0, 2\.0\]; expected a list of 5 numbers"):
        hybridlm.from_pretrained(path)
    residual = HybridLM(get_preset("debug-tiny", pattern="P-", residual_multiplier=0.5))
    with pytest.raises(ValueError, match=r"cannot export to falcon_h1: residual_multiplier = 0\.5"):
        save_pretrained(residual, tmp_path / "x", format="hf")
    with pytest.raises(ValueError, match=r"cannot export to falcon_h1: pattern\[1\] = 'P'"):
        save_pretrained(HybridLM(get_preset("debug-tiny", pattern="PP")), tmp_path / "x", format="hf")
    assert not (tmp_path / "x").exists()
