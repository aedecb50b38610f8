"""`hybridlm ablate`: the variants, equal parameters, the protocol, and a table recomputable from its JSON."""

import json
import statistics

import pytest

from hybridlm import count_params
from hybridlm.cli import main
from hybridlm.model import HybridLM
from hybridlm.train.ablation.report import spread
from hybridlm.train.ablation.runner import selection_key
from hybridlm.train.ablation.variants import (
    equal_parameter_models,
    mixer_variants,
    model_config,
    placement_variants,
    ratio_variants,
)
from tests.helpers import run_cli

# --quick, smaller still: 3 variants (0, 1, 2 attention blocks of 2) x 2 tasks x (2 lrs + 1 more seed)
TINY = ["--quick", "--blocks", "2", "--width", "32", "--steps", "6", "--text-steps", "3", "--seeds", "2",
        "--lrs", "3e-3,1e-2", "--batch-size", "8", "--seq-len", "16", "--num-pairs", "2"]  # fmt: skip


def test_the_sweeps_patterns():
    assert [v.pattern for v in ratio_variants(8)] == ["MMMMMMMM", "MMMM*MMM", "MM*MMM*M", "M*M*M*M*", "********"]
    assert [v.num_attention for v in ratio_variants(16)] == [0, 1, 2, 4, 8, 16]
    assert {v.name: v.pattern for v in placement_variants(8, 2)} == {
        "first": "**MMMMMM",
        "last": "MMMMMM**",
        "first+last": "*MMMMMM*",
        "evenly spaced": "MM*MMM*M",
        "middle": "MMM**MMM",
    }
    assert [v.pattern for v in mixer_variants(4)] == ["MMMM", "GGGG", "mmmm", "MM*M", "GG*G", "mm*m"]


@pytest.mark.parametrize(
    "variants",
    [ratio_variants(8), ratio_variants(16), placement_variants(8, 2), mixer_variants(4), ratio_variants(4)],
    ids=["ratio-8", "ratio-16", "placement", "mixer", "ratio-4"],
)
@pytest.mark.parametrize("vocab_size", [64, 256])
def test_variants_have_equal_parameters_within_2_percent(variants, vocab_size):
    for width in (64, 128):
        sized = equal_parameter_models(variants, width, vocab_size)
        reference = count_params(model_config(variants[0].pattern, width, vocab_size)).total
        for s in sized:
            total = count_params(s.config(vocab_size)).total
            assert total == s.num_params
            assert abs(total - reference) <= 0.02 * reference, (s.variant.pattern, s.hidden_size, total, reference)


def test_the_state_size_is_equal_across_mixers_and_counts_match_a_built_model():
    config = model_config("MGm*", 96, 64)
    assert config.mamba2.num_heads * config.mamba2.head_dim * config.mamba2.state_size == 1024
    assert config.gdn.num_value_heads * config.gdn.key_head_dim * config.gdn.value_head_dim == 1024
    assert config.mamba.intermediate_size * config.mamba.state_size == 1024
    assert sum(p.numel() for p in HybridLM(config).parameters()) == count_params(config).total


def test_selection_prefers_runs_reaching_the_target_then_fewer_steps_then_recall():
    reached_late = {"task": "mqar", "steps_to_target": 400, "final_recall": 0.91}
    reached_early = {"task": "mqar", "steps_to_target": 200, "final_recall": 0.90}
    high_recall = {"task": "mqar", "steps_to_target": None, "final_recall": 0.85}
    low_recall = {"task": "mqar", "steps_to_target": None, "final_recall": 0.2}
    runs = [low_recall, high_recall, reached_late, reached_early]
    assert sorted(runs, key=selection_key) == [reached_early, reached_late, high_recall, low_recall]
    assert spread([2.0]) == {"n": 1, "mean": 2.0, "std": None, "min": 2.0, "max": 2.0}


def test_ablate_ratio_quick_writes_a_table_json_and_png_recomputable_from_the_runs(tmp_path, capsys):
    out = tmp_path / "ablations"
    assert main(["ablate", "ratio", *TINY, "--out", str(out)]) == 0
    table = capsys.readouterr().out
    document = json.loads((out / "ratio.json").read_text())
    assert (out / "ratio.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "ratio.md").read_text() == table
    runs, lrs = document["runs"], [3e-3, 1e-2]
    assert [m["pattern"] for m in document["models"]["mqar"]] == ["MM", "M*", "**"]

    for row in document["summary"]:
        for task in ("mqar", "text"):
            mine = [r for r in runs if r["variant"] == row["variant"] and r["task"] == task]
            sweep = [r for r in mine if r["phase"] == "lr sweep"]
            assert sorted(r["lr"] for r in sweep) == lrs and {r["seed"] for r in sweep} == {0}
            best = min(sweep, key=_better_first)
            assert row[task]["lr"] == best["lr"]
            chosen = [best] + [r for r in mine if r["phase"] == "seeds"]
            assert [r["seed"] for r in chosen] == [0, 1] and {r["lr"] for r in chosen} == {best["lr"]}
            metric = "final_recall" if task == "mqar" else "perplexity"
            values = [r[metric] for r in chosen]
            assert row[task][metric]["mean"] == pytest.approx(statistics.fmean(values))
            assert row[task][metric]["std"] == pytest.approx(statistics.stdev(values))
            if task == "mqar":
                assert f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}" in table
                reached = [r for r in chosen if r["steps_to_target"] is not None]
                assert row[task]["reached"] == len(reached)
                assert all(r["tokens_to_target"] == r["steps_to_target"] * 8 * 16 for r in reached)
            assert f"`{row['pattern']}`" in table

    # a second run replaces its own earlier result; anything else under that name is refused
    (out / "placement.json").write_text('{"mine": true}')
    with pytest.raises(ValueError, match=r"placement\.json is not an earlier ablation result"):
        from hybridlm.train.ablate import _check_destination

        _check_destination(out, "placement")
    _check_destination(out, "ratio")


def _better_first(run):
    """The selection rule, written out again: reached the target (fewest steps), else highest recall;
    text: lowest perplexity."""
    if run["task"] == "text":
        return (run["perplexity"],)
    if run["steps_to_target"] is not None:
        return (0, run["steps_to_target"])
    return (1, -run["final_recall"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["ratio", "--seeds", "0"], "--seeds 0: expected a whole number >= 1"),
        (["ratio", "--lrs", "1e-3,x"], "argument --lrs: expected learning rates like 1e-3,3e-3, got '1e-3,x'"),
        (["ratio", "--num-pairs", "40"], "--num-pairs 40: n pairs and their n queries need 4 * n <= seq_len"),
        (["placement", "--blocks", "3"], "--blocks 3: placement puts 2 attention blocks among at least 4"),
        (["mixer", "--width", "8"], "--width 8: expected a whole number >= 16"),
        (["mixer", "--blocks", "1"], "--blocks 1: the mixer sweep pairs each mixer with an attention block"),
    ],
)
def test_bad_flags_are_one_line_naming_the_flag(argv, message, tmp_path, capsys):
    try:
        status = main(["ablate", *argv, "--out", str(tmp_path / "out")])
    except SystemExit as exit:  # argparse's own errors (a flag's type) exit from the parser
        status = exit.code
    assert status == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error, error
    assert not (tmp_path / "out").exists()


def test_the_command_is_registered_in_the_main_cli():
    result = run_cli("ablate", "--help")
    assert result.returncode == 0 and "ratio" in result.stdout and "--lrs" in result.stdout
