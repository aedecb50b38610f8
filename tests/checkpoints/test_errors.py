"""Bad checkpoints: each gives one clear error naming the file and the tensor, and no model."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import hybridlm
from hybridlm.checkpoints import save_pretrained
from hybridlm.checkpoints.safetensors_io import TensorSpec, write_checkpoint_dir
from tests.checkpoints.hf_tiny import build_nemotron_h, build_qwen3_next, save_tiny

pytestmark = pytest.mark.hf


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    return save_tiny(build_nemotron_h(), tmp_path_factory.mktemp("errors") / "nemotron")


@pytest.fixture
def checkpoint(original, tmp_path):
    return shutil.copytree(original, tmp_path / "ckpt")


def _edit_tensors(path, edit):
    state = load_file(path / "model.safetensors")
    edit(state)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})


def _edit_config(path, **changes):
    data = json.loads((path / "config.json").read_text())
    data.update(changes)
    (path / "config.json").write_text(json.dumps(data))


def test_missing_tensor(checkpoint):
    _edit_tensors(checkpoint, lambda s: s.pop("backbone.layers.1.mixer.k_proj.weight"))
    with pytest.raises(ValueError, match=r"ckpt/model\.safetensors: missing tensor backbone\.layers\.1\.mixer\.k_proj"):
        hybridlm.from_pretrained(checkpoint)


def test_unexpected_tensor(checkpoint):
    _edit_tensors(checkpoint, lambda s: s.update({"backbone.layers.1.mixer.q_norm.weight": torch.ones(24)}))
    with pytest.raises(
        ValueError, match=r"model\.safetensors: unexpected tensor backbone\.layers\.1\.mixer\.q_norm\.weight"
    ):
        hybridlm.from_pretrained(checkpoint)


def test_shape_mismatch_names_file_tensor_and_shapes(checkpoint):
    _edit_tensors(checkpoint, lambda s: s.update({"backbone.layers.0.mixer.out_proj.weight": torch.zeros(64, 80)}))
    with pytest.raises(
        ValueError,
        match=r"ckpt/model\.safetensors: tensor backbone\.layers\.0\.mixer\.out_proj\.weight has shape \(64, 80\), "
        r"expected \(64, 96\)",
    ):
        hybridlm.from_pretrained(checkpoint)


def test_truncated_file(checkpoint):
    weights = checkpoint / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"ckpt/model\.safetensors: truncated safetensors file: tensor \S+ ends at"):
        hybridlm.from_pretrained(checkpoint)


def test_corrupt_header(checkpoint):
    weights = checkpoint / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:16] = b"\xff\xfe{]]]]]"
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"ckpt/model\.safetensors: corrupt safetensors header"):
        hybridlm.from_pretrained(checkpoint)
    weights.write_bytes((10**12).to_bytes(8, "little") + bytes(data[8:]))
    with pytest.raises(ValueError, match=r"corrupt or truncated safetensors file: the header claims"):
        hybridlm.from_pretrained(checkpoint)


def test_config_contradicts_tensors(checkpoint):
    _edit_config(checkpoint, n_routed_experts=4)
    with pytest.raises(
        ValueError, match=r"unexpected tensor .*experts\.4\..*says 4 experts .*up to 7: the config contra"
    ):
        hybridlm.from_pretrained(checkpoint)
    _edit_config(checkpoint, n_routed_experts=16, n_group=1)
    with pytest.raises(ValueError, match=r"missing tensor .*experts\.8\..*says 16 experts .*lacks experts 8\.\.15"):
        hybridlm.from_pretrained(checkpoint)
    _edit_config(checkpoint, n_routed_experts=8, n_group=2, moe_intermediate_size=16)
    with pytest.raises(ValueError, match=r"experts\.0\.up_proj\.weight has shape \(32, 64\), expected \(16, 64\)"):
        hybridlm.from_pretrained(checkpoint)


def test_stacked_experts_count_contradicts_config(tmp_path):
    hf_model = build_nemotron_h()
    save_tiny(hf_model, tmp_path)
    save_file({k: v.contiguous() for k, v in hf_model.state_dict().items()}, tmp_path / "model.safetensors")
    _edit_config(tmp_path, n_routed_experts=4, n_group=1)
    with pytest.raises(ValueError, match=r"gate\.weight has shape \(8, 64\), expected \(4, 64\).*says 4 experts"):
        hybridlm.from_pretrained(tmp_path)


def test_unknown_model_type(checkpoint):
    _edit_config(checkpoint, model_type="llama")
    with pytest.raises(ValueError, match=r"ckpt/config\.json: model_type 'llama' is not supported; known"):
        hybridlm.from_pretrained(checkpoint)


def test_unsupported_options(checkpoint, tmp_path):
    _edit_config(checkpoint, moe_latent_size=16)
    with pytest.raises(ValueError, match=r"ckpt/config\.json: moe_latent_size = 16 is not supported"):
        hybridlm.from_pretrained(checkpoint)
    qwen = save_tiny(build_qwen3_next(), tmp_path / "qwen")
    _edit_config(qwen, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0})
    with pytest.raises(ValueError, match=r"qwen/config\.json: rope_parameters\.rope_type = 'yarn' is not supported"):
        hybridlm.from_pretrained(qwen)


def test_invalid_config_values_name_the_file(checkpoint):
    _edit_config(checkpoint, num_experts_per_tok=9)
    with pytest.raises(
        ValueError, match=r"ckpt/config\.json: moe\.num_experts_per_tok \(9\) must be in 1\.\.num_experts"
    ):
        hybridlm.from_pretrained(checkpoint)


def test_sharded_checkpoint_with_missing_shard(checkpoint, tmp_path):
    model = hybridlm.from_pretrained(checkpoint)
    sharded = save_pretrained(model, tmp_path / "sharded", format="hf", max_shard_bytes=100_000)
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 2 and (sharded / "model.safetensors.index.json").exists()
    ids = torch.randint(0, 256, (1, 9))
    assert torch.equal(hybridlm.from_pretrained(sharded)(ids).logits, model(ids).logits)
    shards[1].unlink()
    with pytest.raises(FileNotFoundError, match=rf"index\.json: shard {shards[1].name} is missing"):
        hybridlm.from_pretrained(sharded)


def test_no_weights(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"ckpt: no model\.safetensors or model\.safetensors\.index\.json"):
        hybridlm.from_pretrained(checkpoint)


def test_failed_write_leaves_the_old_directory(checkpoint):
    before = sorted(p.name for p in checkpoint.iterdir())

    def broken_stream():
        yield "a", torch.zeros(2)
        raise RuntimeError("disk on fire")

    specs = [TensorSpec("a", torch.float32, (2,)), TensorSpec("b", torch.float32, (2,))]
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_checkpoint_dir(checkpoint, specs, broken_stream(), {"config.json": "{}"}, overwrite=True)
    assert sorted(p.name for p in checkpoint.iterdir()) == before
    assert [p.name for p in checkpoint.parent.iterdir()] == ["ckpt"]  # no staging directory left behind
