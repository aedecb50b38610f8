"""hybridlm's own checkpoint format: save -> load gives the same logits; bad files are named."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from hybridlm.checkpoints import from_pretrained, save_pretrained
from hybridlm.model import HybridLM
from tests.helpers import tiny_config


def test_round_trip_same_logits(tmp_path):
    model = HybridLM(tiny_config()).eval()
    save_pretrained(model, tmp_path / "m")
    loaded = from_pretrained(tmp_path / "m")
    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_tied_round_trip_and_dtype(tmp_path):
    model = HybridLM(tiny_config(tie_word_embeddings=True)).eval()
    save_pretrained(model, tmp_path / "m")
    loaded = from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert loaded.lm_head.weight is loaded.embeddings.weight
    assert loaded.dtype == torch.bfloat16


def test_shape_mismatch_names_tensor_and_shapes(tmp_path):
    save_pretrained(HybridLM(tiny_config()), tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    state = load_file(path)
    state["layers.4.mixer.q_proj.weight"] = torch.zeros(3, 64)
    save_file(state, path)
    with pytest.raises(ValueError, match=r"layers\.4\.mixer\.q_proj\.weight has shape \(3, 64\), expected \(64, 64\)"):
        from_pretrained(tmp_path / "m")


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        from_pretrained(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        from_pretrained(tmp_path / "empty")
