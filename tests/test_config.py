import math

import pytest

from hybridlm.config import HybridConfig, Mamba2Config


def test_json_round_trip_keeps_every_field():
    config = HybridConfig.from_preset("nemotron-3-nano-30b-a3b")
    again = HybridConfig.from_json(config.to_json())
    assert again == config
    assert again.mamba2.time_step_limit == (0.0, math.inf)


def test_save_and_load(tmp_path):
    config = HybridConfig.from_preset("qwen3-next-80b-a3b")
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
        HybridConfig.from_preset("debug-tiny", pattern=pattern)


def test_missing_sub_config_names_index_character_and_field():
    with pytest.raises(ValueError, match=r"pattern\[1\] = 'G' \(gdn\) needs the 'gdn' sub-config"):
        HybridConfig(vocab_size=16, hidden_size=8, pattern="MG", mamba2=Mamba2Config(2, 4, 4))


def test_inconsistent_heads_are_rejected():
    with pytest.raises(ValueError, match="num_kv_heads"):
        HybridConfig.from_preset("debug-tiny", attention={"num_heads": 4, "num_kv_heads": 3})
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        HybridConfig.from_preset("debug-tiny", moe={"num_experts_per_tok": 9})


def test_unknown_fields_are_rejected_by_name():
    data = HybridConfig.from_preset("debug-tiny").to_dict()
    data["moe"]["num_expert"] = 3
    with pytest.raises(ValueError, match="num_expert"):
        HybridConfig.from_dict(data)
    with pytest.raises(ValueError, match="hiden_size"):
        HybridConfig.from_preset("debug-tiny", hiden_size=3)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="debug-tiny"):
        HybridConfig.from_preset("nope")


def test_overrides_merge_into_sub_configs():
    config = HybridConfig.from_preset("debug-tiny", moe={"num_experts": 4})
    assert config.moe.num_experts == 4
    assert config.moe.num_experts_per_tok == 2  # untouched fields stay


def test_block_counts():
    config = HybridConfig.from_preset("nemotron-3-nano-30b-a3b")
    assert config.block_counts() == {"mamba2": 23, "attention": 6, "moe": 23}
    qwen = HybridConfig.from_preset("qwen3-next-80b-a3b")
    assert qwen.block_counts() == {"gdn": 36, "attention": 12, "moe": 48}
    assert qwen.pattern[:8] == "GEGEGE*E"
