"""Checkpoint inputs that must be refused by name, not read wrongly: math-changing config options
hybridlm does not implement, string flags, integer weights, shard indexes that leave the directory,
and the dtype names ``from_pretrained`` accepts.

The checkpoints are hybridlm's own exports (no transformers needed), edited the way a hand-edited or
hostile file would be. The one test that needs transformers (marker ``hf``) shows why ``rope_scaling``
must be read first: transformers itself does.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import hybridlm
from hybridlm.checkpoints import read_config, save_pretrained
from hybridlm.model import HybridLM
from hybridlm.presets import get_preset
from tests.helpers import run_cli

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}


def _export(preset: str, path, family: str | None = None, **overrides):
    torch.manual_seed(0)
    model = HybridLM(get_preset(preset, **overrides)).eval()
    save_pretrained(model, path, format="hf", family=family)
    return model


def _edit_config(path, **changes) -> None:
    data = json.loads((path / "config.json").read_text())
    data.update(changes)
    (path / "config.json").write_text(json.dumps(data))


@pytest.fixture(scope="module")
def qwen_export(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen") / "qwen"
    _export("debug-tiny-qwen3-next", path)
    return path


@pytest.fixture
def qwen(qwen_export, tmp_path):
    return shutil.copytree(qwen_export, tmp_path / "qwen")


def test_legacy_rope_scaling_beside_rope_parameters_is_refused(qwen):
    assert json.loads((qwen / "config.json").read_text())["rope_parameters"]["rope_type"] == "default"
    _edit_config(qwen, rope_scaling=YARN)
    with pytest.raises(ValueError, match=r"qwen/config\.json: rope_scaling\.rope_type = 'yarn' is not supported"):
        read_config(qwen)
    _edit_config(qwen, rope_scaling={"type": "linear", "factor": 2.0})  # the 4.x spelling of the type
    with pytest.raises(ValueError, match=r"rope_scaling\.rope_type = 'linear' is not supported"):
        hybridlm.from_pretrained(qwen)


def test_rope_parameters_per_layer_type_are_refused(qwen):
    _edit_config(qwen, rope_parameters={"full_attention": {**YARN, "rope_theta": 1e4}})
    with pytest.raises(ValueError, match=r"rope_parameters holds RoPE parameters per layer type \(full_attention\)"):
        read_config(qwen)


@pytest.mark.hf
def test_transformers_reads_rope_scaling_before_rope_parameters():
    """The truth the refusal above rests on: a YaRN ``rope_scaling`` beside a default
    ``rope_parameters`` is YaRN in transformers, so reading ``rope_parameters`` alone would be wrong."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen3NextConfig(
        rope_parameters={"rope_type": "default", "rope_theta": 1e4}, rope_scaling=dict(YARN)
    )
    assert config.rope_parameters["rope_type"] == "yarn"


@pytest.mark.parametrize("field", ["tie_word_embeddings", "attention_bias"])
def test_string_flags_are_refused(qwen, field):
    _edit_config(qwen, **{field: "false"})  # bool("false") is True: read that way it would flip the model
    with pytest.raises(ValueError, match=rf"qwen/config\.json: field '{field}' = 'false' must be true or false"):
        read_config(qwen)


def test_unknown_position_embedding_type_is_refused(tmp_path):
    path = tmp_path / "granite"
    _export("debug-tiny-nemotron", path, "granitemoehybrid", pattern="M-*-", mlp={"activation": "swiglu"})
    assert read_config(path).attention.rope_theta is None  # written as "nope"
    _edit_config(path, position_embedding_type="alibi")
    with pytest.raises(ValueError, match=r"granite/config\.json: position_embedding_type = 'alibi' is not supported"):
        read_config(path)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.bool])
def test_a_weight_stored_as_integers_is_refused(tmp_path, dtype):
    save_pretrained(HybridLM(get_preset("debug-tiny")), tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    state = load_file(weights)
    name = "norm_f.weight"
    state[name] = torch.ones(state[name].shape, dtype=dtype)
    save_file(state, weights)
    with pytest.raises(ValueError, match=rf"ckpt/model\.safetensors: tensor {name} has dtype \w+, expected a floating"):
        hybridlm.from_pretrained(tmp_path / "ckpt")


@pytest.fixture
def sharded(tmp_path):
    """A sharded hybridlm checkpoint, its model, and the index's weight_map."""
    torch.manual_seed(0)
    model = HybridLM(get_preset("debug-tiny")).eval()
    path = save_pretrained(model, tmp_path / "home" / "ckpt", max_shard_bytes=200_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    return path, model, index


def _point_index(path, index, old: str, new: str) -> None:
    weight_map = {name: (new if file == old else file) for name, file in index["weight_map"].items()}
    (path / "model.safetensors.index.json").write_text(json.dumps({**index, "weight_map": weight_map}))


def test_shard_index_pointing_outside_the_directory_is_refused(sharded):
    path, _, index = sharded
    shard = sorted(set(index["weight_map"].values()))[1]
    outside = path.parent / "outside.safetensors"
    shutil.copyfile(path / shard, outside)  # a valid shard, just not in the checkpoint directory
    for pointer in ["../outside.safetensors", str(outside.resolve())]:
        _point_index(path, index, shard, pointer)
        with pytest.raises(
            ValueError, match=r"index\.json: shard .*outside\.safetensors.* points outside the checkpoint"
        ):
            hybridlm.from_pretrained(path)

    _point_index(path, index, shard, shard)
    (path / shard).unlink()
    (path / shard).symlink_to(outside)
    with pytest.raises(ValueError, match=rf"shard '{shard}' .*is a link to .*outside\.safetensors, outside the"):
        hybridlm.from_pretrained(path)


def test_hub_cache_snapshot_links_are_followed(sharded, tmp_path):
    """The Hugging Face hub cache stores snapshots/<revision>/<file> as links into blobs/: allowed."""
    path, model, _ = sharded
    repository = tmp_path / "models--org--name"
    (repository / "blobs").mkdir(parents=True)
    snapshot = repository / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    for number, file in enumerate(sorted(path.iterdir())):
        blob = repository / "blobs" / f"blob{number}"
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(f"../../blobs/{blob.name}")
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert torch.equal(hybridlm.from_pretrained(snapshot)(ids).logits, model(ids).logits)


def test_dtype_names_as_transformers_users_write_them(sharded):
    path, model, _ = sharded
    assert hybridlm.from_pretrained(path, dtype="bfloat16").dtype == torch.bfloat16
    assert hybridlm.from_pretrained(path, dtype="bf16").dtype == torch.bfloat16
    assert hybridlm.from_pretrained(path, dtype=torch.float16).dtype == torch.float16
    assert hybridlm.from_pretrained(path, dtype="auto").dtype == model.dtype  # as stored
    with pytest.raises(ValueError, match=r"dtype 'float8'"):
        hybridlm.from_pretrained(path, dtype="float8")
    with pytest.raises(ValueError, match=r"dtype must be a floating-point torch dtype or its name, got torch\.int64"):
        hybridlm.from_pretrained(path, dtype=torch.int64)


def test_an_unknown_stored_dtype_is_named(tmp_path):
    save_pretrained(HybridLM(get_preset("debug-tiny")), tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    state = load_file(weights)
    state["norm_f.weight"] = torch.ones(state["norm_f.weight"].shape, dtype=torch.uint16)  # U16
    save_file(state, weights)
    with pytest.raises(ValueError, match=r"ckpt/model\.safetensors: tensor norm_f\.weight has dtype U16, which"):
        hybridlm.from_pretrained(tmp_path / "ckpt")


@pytest.mark.parametrize(
    ("field", "value"), [("linear_num_value_heads", "4"), ("rope_parameters", {"rope_theta": "1e6"})]
)
def test_a_number_written_as_a_string_is_refused_naming_the_field(qwen, field, value):
    _edit_config(qwen, **{field: value})
    name = field if isinstance(value, str) else f"{field}.rope_theta"
    with pytest.raises(ValueError, match=rf"qwen/config\.json: field {name} = '[0-9.e]+' is a string"):
        read_config(qwen)


@pytest.fixture(scope="module")
def paired_exports(tmp_path_factory):
    """falcon_h1 and granitemoehybrid configs written by our exporter (RoPE, Mamba-2, attention)."""
    root = tmp_path_factory.mktemp("paired")
    rope = {"rope_theta": 10000.0}
    _export("debug-tiny-nemotron", root / "falcon", "falcon_h1", pattern="P-P-", mlp={"activation": "swiglu"},
            attention=rope)  # fmt: skip
    _export("debug-tiny-nemotron", root / "granite", "granitemoehybrid", pattern="M-*-",
            mlp={"activation": "swiglu"}, attention=rope)  # fmt: skip
    return root


@pytest.fixture(params=["falcon", "granite"])
def paired(request, paired_exports, tmp_path):
    return shutil.copytree(paired_exports / request.param, tmp_path / request.param)


def _rope_parameters(**changes):
    return {"rope_theta": 10000.0, "rope_type": "default", **changes}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_attention_heads": 0}, r"num_attention_heads = 0 must be a positive integer"),
        ({"num_attention_heads": 2.5}, r"num_attention_heads = 2\.5 must be a positive integer"),
        ({"num_attention_heads": True}, r"num_attention_heads = True must be a positive integer"),
        ({"time_step_limit": [0.0]}, r"time_step_limit = \[0\.0\] must be a list \[low, high\] of two numbers"),
        ({"time_step_limit": 5}, r"time_step_limit = 5 must be a list \[low, high\] of two numbers"),
        ({"time_step_limit": [0.0, True]}, r"time_step_limit = \[0\.0, True\] must be a list"),
        ({"rope_parameters": _rope_parameters(rope_theta=None)}, r"rope_parameters\.rope_theta = None must be a"),
        ({"rope_parameters": _rope_parameters(rope_theta=[1])}, r"rope_parameters\.rope_theta = \[1\] must be a"),
        ({"rope_parameters": _rope_parameters(rope_theta=True)}, r"rope_parameters\.rope_theta = True must be a"),
        ({"rope_parameters": _rope_parameters(partial_rotary_factor=True)},
         r"rope_parameters\.partial_rotary_factor = True must be a number"),
        ({"hidden_size": False}, r"hidden_size = False must be a positive integer"),
        ({"mamba_n_heads": 0}, r"mamba_n_heads = 0 must be a positive integer"),
    ],
    ids=["heads-0", "heads-float", "heads-bool", "limit-short", "limit-int", "limit-bool", "theta-null", "theta-list",
         "theta-bool", "partial-bool", "hidden-bool", "mamba-heads-0"],
)  # fmt: skip
def test_bad_numbers_in_hf_configs_are_refused_naming_field_and_file(paired, changes, message):
    _edit_config(paired, **changes)
    with pytest.raises(ValueError, match=rf"{paired.name}/config\.json: (field )?{message}"):
        read_config(paired)
    result = run_cli("info", str(paired))
    assert result.returncode == 2 and "Traceback" not in result.stderr and "internal error" not in result.stderr
    assert f"{paired.name}/config.json" in result.stderr


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rope_parameters": _rope_parameters(rope_theta=True)}, r"rope_parameters\.rope_theta = True must be a"),
        ({"rope_parameters": _rope_parameters(partial_rotary_factor=True)},
         r"rope_parameters\.partial_rotary_factor = True must be a number"),
        ({"num_attention_heads": True}, r"num_attention_heads = True must be a positive integer"),
        ({"linear_num_value_heads": 4.0}, r"linear_num_value_heads = 4\.0 must be a positive integer"),
    ],
    ids=["theta-bool", "partial-bool", "heads-bool", "value-heads-float"],
)  # fmt: skip
def test_qwen3_next_reads_only_real_numbers(qwen, changes, message):
    _edit_config(qwen, **changes)
    with pytest.raises(ValueError, match=rf"qwen/config\.json: (field )?{message}"):
        read_config(qwen)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"mamba_num_heads": True}, r"mamba_num_heads = True must be a positive integer"),
        ({"time_step_min": True}, r"time_step_min = True must be a number"),
        ({"n_groups": 1.5}, r"n_groups = 1\.5 must be a positive integer"),
        ({"head_dim": False}, r"head_dim = False must be a positive integer"),
    ],
    ids=["mamba-heads-bool", "dt-min-bool", "groups-float", "head-dim-bool"],
)
def test_nemotron_h_reads_only_real_numbers(tmp_path, changes, message):
    """JSON true is 1 to Python's arithmetic: nemotron_h's reader must refuse it, not build with 1."""
    path = tmp_path / "nemotron"
    _export("debug-tiny-nemotron", path, family="nemotron_h")
    _edit_config(path, **changes)
    with pytest.raises(ValueError, match=rf"nemotron/config\.json: field {message}"):
        read_config(path)
