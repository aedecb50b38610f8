"""hybridlm's own checkpoints fed what a hostile tester would: float8 weights and dtypes, devices the
machine lacks, config.json edited by hand (strict-JSON readers, bad values, bytes that are not UTF-8).

Real files written by save_pretrained and edited on disk; the CLI cases run the real ``hybridlm``."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import hybridlm
from hybridlm.checkpoints import read_config, save_pretrained
from hybridlm.model import HybridLM
from hybridlm.presets import get_preset
from tests.helpers import run_cli


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    torch.manual_seed(0)
    return save_pretrained(HybridLM(get_preset("debug-tiny")).eval(), tmp_path_factory.mktemp("native") / "ckpt")


@pytest.fixture
def ckpt(original, tmp_path):
    return shutil.copytree(original, tmp_path / "ckpt")


def _edit_hybridlm_config(path, **changes) -> None:
    data = json.loads((path / "config.json").read_text())
    data["hybridlm"].update(changes)
    (path / "config.json").write_text(json.dumps(data))


def test_a_weight_stored_as_float8_is_refused_by_name(ckpt):
    state = load_file(ckpt / "model.safetensors")
    state["norm_f.weight"] = state["norm_f.weight"].to(torch.float8_e4m3fn)
    save_file(state, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        ValueError,
        match=r"model\.safetensors: tensor norm_f\.weight has dtype F8_E4M3, expected a floating-point type",
    ):
        hybridlm.from_pretrained(ckpt)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, "float8_e4m3fn"])
def test_a_float8_dtype_is_refused(original, dtype):
    with pytest.raises(ValueError, match=r"float8|dtype"):
        hybridlm.from_pretrained(original, dtype=dtype)


@pytest.mark.parametrize("device", ["foo", 0, "tpu"])
def test_from_pretrained_refuses_unknown_devices(original, device):
    with pytest.raises(ValueError, match="device"):
        hybridlm.from_pretrained(original, device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_from_pretrained_on_cuda_without_cuda_is_one_clear_error(original):
    with pytest.raises(ValueError, match="CUDA is not available"):
        hybridlm.from_pretrained(original, device="cuda")


def test_the_native_config_is_strict_json(original):
    text = (original / "config.json").read_text()

    def refuse(token: str) -> None:
        raise ValueError(f"not strict JSON: {token}")

    data = json.loads(text, parse_constant=refuse)  # what a strict parser (JavaScript, Go, jq) accepts
    assert data["hybridlm"]["mamba2"]["time_step_limit"][1] == "inf"
    assert read_config(original).mamba2.time_step_limit == (0.0, math.inf)


def test_an_old_native_config_with_bare_infinity_still_reads(ckpt):
    data = json.loads((ckpt / "config.json").read_text())
    data["hybridlm"]["mamba2"]["time_step_limit"] = [0.0, math.inf]
    (ckpt / "config.json").write_text(json.dumps(data))  # Python writes the bare token Infinity
    assert "Infinity" in (ckpt / "config.json").read_text()
    assert read_config(ckpt).mamba2.time_step_limit == (0.0, math.inf)
    hybridlm.from_pretrained(ckpt)


def test_a_bad_native_config_value_names_the_file(ckpt):
    _edit_hybridlm_config(ckpt, hidden_size=0)
    with pytest.raises(ValueError, match=r"ckpt/config\.json: .*hidden_size must be positive, got 0"):
        read_config(ckpt)
    result = run_cli("info", str(ckpt))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "ckpt/config.json: " in result.stderr and "hidden_size" in result.stderr


def test_a_config_that_is_not_utf8_names_the_file(ckpt):
    (ckpt / "config.json").write_bytes(b'{"model_type": "hybridlm", "name": "\xff\xfe"}')
    with pytest.raises(ValueError, match=r"ckpt/config\.json: not UTF-8 text"):
        read_config(ckpt)
    with pytest.raises(ValueError, match=r"ckpt/config\.json: not UTF-8 text"):
        hybridlm.from_pretrained(ckpt)
