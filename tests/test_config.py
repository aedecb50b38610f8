import json
import math
import re

import pytest

from hybridlm.config import HybridConfig, Mamba2Config
from hybridlm.presets import get_preset, list_presets


def test_json_round_trip_keeps_every_field():
    config = get_preset("nemotron-3-nano-30b-a3b")
    again = HybridConfig.from_json(config.to_json())
    assert again == config
    assert again.mamba2.time_step_limit == (0.0, math.inf)


def test_save_and_load(tmp_path):
    config = get_preset("qwen3-next-80b-a3b")
    config.save(tmp_path / "c.json")
    assert HybridConfig.load(tmp_path / "c.json") == config


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("", "pattern is empty"),
        ("MMXM", r"pattern\[2\] = 'X'"),
        ("M*e", r"pattern\[2\] = 'e'"),
    ],
    ids=["empty", "unknown-char", "lowercase"],
)
def test_bad_pattern_names_index_and_character(pattern, message):
    with pytest.raises(ValueError, match=message):
        get_preset("debug-tiny", pattern=pattern)


def test_missing_sub_config_names_index_character_and_field():
    with pytest.raises(ValueError, match=r"pattern\[1\] = 'G' \(gdn\) needs the 'gdn' sub-config"):
        HybridConfig(vocab_size=16, hidden_size=8, pattern="MG", mamba2=Mamba2Config(2, 4, 4))


def test_inconsistent_heads_are_rejected():
    with pytest.raises(ValueError, match="num_kv_heads"):
        get_preset("debug-tiny", attention={"num_heads": 4, "num_kv_heads": 3})
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        get_preset("debug-tiny", moe={"num_experts_per_tok": 9})


def test_unknown_fields_are_rejected_by_name():
    data = get_preset("debug-tiny").to_dict()
    data["moe"]["num_expert"] = 3
    with pytest.raises(ValueError, match="num_expert"):
        HybridConfig.from_dict(data)
    with pytest.raises(ValueError, match="hiden_size"):
        get_preset("debug-tiny", hiden_size=3)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="debug-tiny"):
        get_preset("nope")


def test_overrides_merge_into_sub_configs():
    config = get_preset("debug-tiny", moe={"num_experts": 4})
    assert config.moe.num_experts == 4
    assert config.moe.num_experts_per_tok == 2  # untouched fields stay


def test_block_counts():
    config = get_preset("nemotron-3-nano-30b-a3b")
    assert config.block_counts() == {"mamba2": 23, "attention": 6, "moe": 23}
    qwen = get_preset("qwen3-next-80b-a3b")
    assert qwen.block_counts() == {"gdn": 36, "attention": 12, "moe": 48}
    assert qwen.pattern[:8] == "GEGEGE*E"


# -- every size positive and consistent, every type the annotated one --------------------------------------------


def _tiny_dict() -> dict:
    return json.loads(get_preset("debug-tiny").to_json())


def _set(data: dict, dotted: str, value) -> dict:
    *parents, last = dotted.split(".")
    target = data
    for key in parents:
        target = target[key]
    if value is _MISSING:
        del target[last]
    else:
        target[last] = value
    return data


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()

# (dotted field, bad value): each of these built a model, or failed with another exception, before validation
BAD_FIELDS = [
    ("attention.num_heads", 0),
    ("attention.num_kv_heads", 0),
    ("attention.head_dim", -16),
    ("attention.rope_theta", 0.0),
    ("attention.partial_rotary_factor", 0.0),
    ("attention.partial_rotary_factor", 1.5),
    ("attention.softmax_scale", -1.0),
    ("mamba2.state_size", 0),
    ("mamba2.num_heads", 0),
    ("mamba2.num_groups", 0),
    ("mamba2.num_groups", 3),
    ("mamba2.conv_kernel", 0),
    ("mamba2.chunk_size", 0),
    ("mamba2.time_step_min", 0.0),
    ("mamba2.time_step_max", 0.0001),
    ("mamba2.time_step_limit", [0.1, 0.01]),
    ("mamba2.time_step_limit", [0.0]),
    ("mamba2.time_step_limit", "0,inf"),
    ("moe.intermediate_size", 0),
    ("moe.num_experts", 0),
    ("moe.num_experts_per_tok", 0),
    ("moe.num_shared_experts", -1),
    ("moe.shared_intermediate_size", 0),
    ("moe.routed_scaling_factor", float("nan")),
    ("moe.aux_loss_coef", -0.5),
    ("moe.activation", "gelu"),
    ("moe.scoring", "tanh"),
    ("gdn.num_key_heads", 0),
    ("gdn.num_value_heads", 3),
    ("gdn.chunk_size", -8),
    ("gdn.conv_kernel", 0),
    ("mamba.dt_rank", 0),
    ("mamba.state_size", -1),
    ("mamba.intermediate_size", 0),
    ("mlp.intermediate_size", 0),
    ("mlp.activation", None),
    ("vocab_size", 0),
    ("hidden_size", "64"),
    ("hidden_size", 64.0),
    ("vocab_size", 1.5),
    ("vocab_size", True),
    ("norm_eps", -1.0),
    ("norm_eps", 0),
    ("norm_eps", "1e-5"),
    ("tie_word_embeddings", "false"),
    ("tie_word_embeddings", 0),
    ("is_norm_zero_centered", None),
    ("max_position_embeddings", 0),
    ("num_hidden_layers", 0),
    ("logits_scaling", 0.0),
    ("residual_multiplier", float("inf")),
    ("embedding_multiplier", float("nan")),
    ("initializer_range", -0.02),
    ("name", 3),
    ("extra", []),
    ("attention.num_heads", _MISSING),
    ("moe.intermediate_size", _MISSING),
    ("hidden_size", _MISSING),
    ("pattern", _MISSING),
]


@pytest.mark.parametrize(("dotted", "value"), BAD_FIELDS, ids=[f"{d}={v!r}" for d, v in BAD_FIELDS])
def test_bad_field_is_a_value_error_naming_its_dotted_path(dotted, value):
    data = _set(_tiny_dict(), dotted, value)
    with pytest.raises(ValueError, match=re.escape(dotted)):
        HybridConfig.from_dict(data)


def test_bad_field_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_set(_tiny_dict(), "moe.intermediate_size", 0)))
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}.*moe\.intermediate_size"):
        HybridConfig.load(path)


def test_a_file_that_is_not_a_json_object_is_a_value_error(tmp_path):
    for text in ("[1, 2]", "{", '{"moe": 3}'):
        path = tmp_path / "config.json"
        path.write_text(text)
        with pytest.raises(ValueError, match=re.escape(str(path))):
            HybridConfig.load(path)


def test_a_directory_or_a_binary_file_is_a_value_error_naming_it(tmp_path):
    # Before: IsADirectoryError and UnicodeDecodeError, neither naming the file
    directory = tmp_path / "checkpoint"
    directory.mkdir()
    binary = tmp_path / "model.safetensors"
    binary.write_bytes(bytes([0x80, 0xFF, 0x00, 0xC3]) * 8)
    for path, what in ((directory, "is a directory"), (binary, "not a text file")):
        with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: {what}"):
            HybridConfig.load(path)
    with pytest.raises(FileNotFoundError):  # a missing file stays what open() says it is
        HybridConfig.load(tmp_path / "missing.json")


@pytest.mark.parametrize(
    ("parent", "field", "required"),
    [
        (None, "hidden_size", "HybridConfig needs vocab_size, hidden_size, pattern"),
        ("moe", "num_experts", "moe needs num_experts, num_experts_per_tok, intermediate_size"),
    ],
)
def test_a_missing_field_lists_only_the_fields_without_a_default(parent, field, required):
    # Before: "HybridConfig needs vocab_size, hidden_size, pattern, extra", though extra defaults to {}
    data = _tiny_dict()
    del (data[parent] if parent else data)[field]
    dotted = f"{parent}.{field}" if parent else field
    with pytest.raises(ValueError, match=rf"^{re.escape(dotted)} is missing; {required}$"):
        HybridConfig.from_dict(data)


def test_sub_config_that_is_not_an_object_is_named():
    data = _tiny_dict()
    data["attention"] = [4, 2, 16]
    with pytest.raises(ValueError, match="attention"):
        HybridConfig.from_dict(data)


def test_rotary_dim_must_be_even_and_fit_the_head():
    with pytest.raises(ValueError, match=r"attention\.partial_rotary_factor"):
        get_preset("debug-tiny", attention={"head_dim": 10, "partial_rotary_factor": 0.3})  # rotary dim 3


def test_grouped_top_k_must_leave_enough_experts():
    # 8 experts in 4 groups of 2, keeping 1 group: only 2 experts remain for 3 picks
    with pytest.raises(ValueError, match=r"moe\.num_experts_per_tok"):
        get_preset("debug-tiny", moe={"num_experts_per_tok": 3, "num_groups": 4, "topk_groups": 1})


def test_a_shared_expert_gate_without_shared_experts_is_refused():
    with pytest.raises(ValueError, match=r"moe\.has_shared_expert_gate"):
        get_preset("debug-tiny", moe={"num_shared_experts": 0, "has_shared_expert_gate": True})


def test_string_false_does_not_tie_embeddings():
    data = _tiny_dict()
    data["tie_word_embeddings"] = "false"
    with pytest.raises(ValueError, match=r"tie_word_embeddings.*bool"):
        HybridConfig.from_dict(data)


def test_fields_mutated_after_construction_are_checked_again_before_a_build():
    from hybridlm.model import HybridLM

    config = get_preset("debug-tiny")
    config.attention.num_heads = 0
    with pytest.raises(ValueError, match=r"attention\.num_heads"):
        HybridLM(config)


def test_every_preset_is_valid_and_keeps_its_field_types():
    for name in list_presets():
        config = get_preset(name)
        again = HybridConfig.from_json(config.to_json())
        assert again == config
        assert isinstance(again.mamba2.time_step_limit if again.mamba2 else (), tuple)


def test_a_sub_config_for_a_block_not_in_the_pattern_is_kept_and_checked():
    # It builds nothing, so it may stay (a family config carries them all), but it must still be sane.
    config = get_preset("debug-tiny", pattern="M-")
    assert config.attention is not None
    with pytest.raises(ValueError, match=r"attention\.num_heads"):
        get_preset("debug-tiny", pattern="M-", attention={"num_heads": 0})


def test_an_unknown_sub_config_override_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match=r"moe\.num_expert\b"):
        get_preset("debug-tiny", moe={"num_expert": 3})
