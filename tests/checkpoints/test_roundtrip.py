"""Export to Hugging Face formats, round trips between formats, the convert CLI and tokenizers."""

import json
import math
import subprocess

import pytest
import torch
from safetensors.torch import load_file

import hybridlm
from hybridlm.checkpoints import load_tokenizer, read_config, save_pretrained
from hybridlm.model import HybridLM
from hybridlm.presets import get_preset
from hybridlm.tokenizer import ByteTokenizer
from tests.checkpoints.hf_tiny import build_nemotron_h, save_tiny
from tests.checkpoints.parity import LOGIT_ATOL, hf_logits, max_diff, ours_logits, prompts
from tests.helpers import run_cli

pytestmark = pytest.mark.hf
transformers = pytest.importorskip("transformers")


def _random_model(preset: str, seed: int = 0, **overrides) -> HybridLM:
    """A preset with random weights whose 1-D parameters are moved off their init (so norms and biases count)."""
    torch.manual_seed(seed)
    model = HybridLM(get_preset(preset, **overrides)).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(0.1 * torch.randn_like(param))
    return model


EXPORTS = {
    "nemotron": ("debug-tiny-nemotron", {}, "NemotronHForCausalLM"),
    # no dt clamp at all: nemotron_h's time_step_min = 0
    "nemotron-unclamped": (
        "debug-tiny-nemotron",
        {"mamba2": {"time_step_limit": (0.0, math.inf)}},
        "NemotronHForCausalLM",
    ),
    "qwen3-next": ("debug-tiny-qwen3-next", {}, "Qwen3NextForCausalLM"),
}


@pytest.mark.parametrize("name", list(EXPORTS))
def test_preset_exports_load_in_transformers(name, tmp_path):
    preset, overrides, architecture = EXPORTS[name]
    model = _random_model(preset, **overrides)
    save_pretrained(model, tmp_path / "hf", format="hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == [architecture]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(reloaded).__name__ == architecture
    ids = prompts()
    assert max_diff(ours_logits(model, ids), hf_logits(reloaded, ids)) < LOGIT_ATOL
    back = hybridlm.from_pretrained(tmp_path / "hf")
    assert back.config.pattern == model.config.pattern
    assert max_diff(ours_logits(back, ids), ours_logits(model, ids)) < LOGIT_ATOL


def test_family_choice_and_inexpressible_configs(tmp_path):
    with pytest.raises(ValueError, match=r"G \(gdn: qwen3_next, qwen3_5_moe\), M \(mamba2: nemotron_h, granite"):
        save_pretrained(HybridLM(get_preset("debug-tiny")), tmp_path / "x", format="hf")
    qwen = HybridLM(get_preset("debug-tiny-qwen3-next"))
    with pytest.raises(ValueError, match=r"cannot export to nemotron_h: block type\(s\) G"):
        save_pretrained(qwen, tmp_path / "x", format="hf", family="nemotron_h")
    rope = HybridLM(get_preset("debug-tiny-nemotron", attention={"rope_theta": 10000.0}))
    with pytest.raises(ValueError, match=r"nemotron_h: attention\.rope_theta = 10000\.0"):
        save_pretrained(rope, tmp_path / "x", format="hf")
    swiglu = HybridLM(get_preset("debug-tiny-nemotron", moe={"activation": "swiglu"}))
    with pytest.raises(ValueError, match=r"nemotron_h: moe\.activation = 'swiglu'"):
        save_pretrained(swiglu, tmp_path / "x", format="hf")
    with pytest.raises(ValueError, match=r"cannot export to jamba: pattern\[0\] = 'M'"):
        save_pretrained(HybridLM(get_preset("debug-tiny-nemotron")), tmp_path / "x", format="hf", family="jamba")
    assert not (tmp_path / "x").exists()


def test_native_and_hf_round_trip_is_lossless(tmp_path):
    original = save_tiny(build_nemotron_h(), tmp_path / "hf")
    save_pretrained(hybridlm.from_pretrained(original), tmp_path / "native")
    assert read_config(tmp_path / "native").extra["hf_model_type"] == "nemotron_h"
    save_pretrained(hybridlm.from_pretrained(tmp_path / "native"), tmp_path / "hf2", format="hf")
    before, after = load_file(original / "model.safetensors"), load_file(tmp_path / "hf2" / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return run_cli(*args, env={"OMP_NUM_THREADS": "1"})


def _write_tokenizer(directory) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    words = ["<unk>", "<s>", "</s>", "the", "cat", "sat", "on", "mat"]
    tokenizer = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.add_special_tokens(words[:3])
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))


def test_cli_convert_both_ways_info_and_generate(tmp_path):
    hf_model = build_nemotron_h()
    source = save_tiny(hf_model, tmp_path / "hf")
    _write_tokenizer(source)

    result = _cli("convert", str(source), str(tmp_path / "native"), "--to", "hybridlm")
    assert result.returncode == 0, result.stderr
    for name in ("tokenizer.json", "tokenizer_config.json"):  # tokenizer files travel along, unchanged
        assert (tmp_path / "native" / name).read_bytes() == (source / name).read_bytes()
    result = _cli("convert", str(tmp_path / "native"), str(tmp_path / "back"), "--to", "hf", "--family", "nemotron_h")
    assert result.returncode == 0, result.stderr
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    ids = prompts()
    assert max_diff(hf_logits(reloaded, ids), hf_logits(hf_model, ids)) == 0.0

    result = _cli("info", str(source), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["pattern"] == "M*ME-E"
    result = _cli("generate", str(source), "--prompt", "the cat sat", "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("the cat sat")
    result = _cli("convert", "debug-tiny", str(tmp_path / "bad"), "--to", "hf")
    assert result.returncode == 2 and "no Hugging Face family" in result.stderr and "Traceback" not in result.stderr


def test_load_tokenizer(tmp_path):
    _write_tokenizer(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.encode("the cat sat") == [3, 4, 5]
    assert tokenizer.decode([3, 4, 2]) == "the cat"  # special tokens are not printed
    assert tokenizer.eos_token_id == 2
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2]}))
    assert load_tokenizer(tmp_path).eos_token_id == 7
    assert isinstance(load_tokenizer("debug-tiny"), ByteTokenizer)
    assert isinstance(load_tokenizer(tmp_path / "nothing-here"), ByteTokenizer)
