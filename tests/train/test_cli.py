"""`hybridlm train` through its own parser: flags named in errors, text runs, outputs, resume checks."""

import json
import os
import subprocess
import sys

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from hybridlm.train.text import text_data
from tests.train.test_trainer import run_train_cli

TEXT = "The quick brown fox jumps over the lazy dog. " * 60  # 2,700 bytes


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text(TEXT)
    return path


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lr", "-1"], r"^--lr -1\.0: expected a positive number"),
        (["--warmup-steps", "50", "--steps", "10"], r"^--warmup-steps 50: expected at most steps \(10\)"),
        (["--grad-accum", "0"], r"^--grad-accum 0: expected a whole number >= 1"),
        (["--num-pairs", "40", "--seq-len", "64"], r"^--num-pairs 40: n pairs and their n queries need 4 \* n"),
        (["--vocab-size", "16", "--seq-len", "32"], r"^--vocab-size 16: expected more than seq_len"),
        (["--data", "wiki"], r"^--data 'wiki': expected mqar, text:PATH or shakespeare"),
        (["--resume"], r"^--resume continues the checkpoint in --out DIR"),
        (["not-a-model"], r"^MODEL 'not-a-model' is neither a preset"),
        (["--pattern", "MX"], r"pattern\[1\] = 'X' is not a block type"),
        (["--pattern", "M*", "--aux-loss-coef", "0"], r"^--aux-loss-coef: pattern 'M\*' has no MoE block"),
        (["--pattern", "M*", "--aux-loss-free"], r"aux_loss_free balancing needs MoE blocks"),
        (["--quick", "--data", "text:x.txt"], r"^--quick is the quick MQAR setting"),
        (["--data", "text:x.txt", "--num-pairs", "4"], r"^--num-pairs is an MQAR option; this run trains on text:"),
        (["--tokenizer", "tok"], r"^--tokenizer applies to text data"),
    ],
)
def test_bad_flags_are_one_error_naming_the_flag(argv, message):
    with pytest.raises(ValueError, match=message):
        run_train_cli(*argv)


def test_a_text_file_smaller_than_one_batch_is_refused(text_file):
    with pytest.raises(ValueError, match=r"text:.*book\.txt: the train split has 18 examples .* fewer than one batch"):
        run_train_cli("--data", f"text:{text_file}", "--seq-len", "128", "--batch-size", "32")
    with pytest.raises(ValueError, match="no such text file"):
        run_train_cli("--data", f"text:{text_file}.missing")


def test_a_text_run_prints_perplexity_and_writes_checkpoint_model_and_metrics(text_file, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--data", f"text:{text_file}", "--seq-len", "32", "--batch-size", "8", "--steps", "6", "--out", str(out)]
    assert run_train_cli(*argv) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("held-out perplexity ") and "at step 6" in printed
    assert (out / "checkpoint.pt").is_file() and (out / "model" / "config.json").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["history"]) == 6 and metrics["evals"][-1]["step"] == 6

    # resuming a finished run trains nothing more and reports the same result ...
    assert run_train_cli(*argv, "--resume") == 0
    assert capsys.readouterr().out == printed
    # ... and a resume with other settings is refused, naming the setting
    with pytest.raises(ValueError, match="written with steps = 6, this run has 8"):
        run_train_cli(*argv[:-4], "--steps", "8", "--out", str(out), "--resume")


def test_a_preset_model_gets_the_data_vocabulary_and_aux_loss_free_bias(capsys):
    assert run_train_cli(
        "debug-tiny", "--pattern", "M*E", "--aux-loss-free", "--aux-loss-coef", "0", "--vocab-size", "64",
        "--seq-len", "16", "--num-pairs", "2", "--num-train-examples", "64", "--num-eval-examples", "8",
        "--steps", "2", "--batch-size", "8",
    ) == 0  # fmt: skip
    assert capsys.readouterr().out.startswith("held-out recall ")


def test_a_shorter_quick_run_warms_up_for_a_tenth_of_its_steps(capsys):
    assert run_train_cli("--quick", "--steps", "20") == 0  # --quick's own warmup (100) would exceed 20 steps
    assert capsys.readouterr().out.startswith("held-out recall ")


def test_text_through_a_tokenizer_json(text_file, tmp_path):
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]"]))
    (tmp_path / "tok").mkdir()
    tokenizer.save(str(tmp_path / "tok" / "tokenizer.json"))
    data = text_data(text_file, seq_len=8, tokenizer_dir=tmp_path / "tok")
    ids = tokenizer.encode(TEXT).ids
    assert data.vocab_size == tokenizer.get_vocab_size()
    assert data.train.inputs[0].tolist() == ids[:8] and data.train.labels[0].tolist() == ids[1:9]
    with pytest.raises(ValueError, match=r"no tokenizer\.json"):
        text_data(text_file, seq_len=8, tokenizer_dir=tmp_path)


def _run_hybridlm(*argv: str) -> subprocess.CompletedProcess:
    """`hybridlm ARGV` through the main command (python -m hybridlm), as a user runs it."""
    env = {**os.environ, "HYBRIDLM_PROGRESS": "0"}
    return subprocess.run(
        [sys.executable, "-m", "hybridlm", *argv], capture_output=True, text=True, timeout=300, env=env
    )


def test_through_the_main_cli_an_error_is_one_line_and_exit_2():
    run = _run_hybridlm("train", "--lr", "-1")
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == ["hybridlm train: error: --lr -1.0: expected a positive number"]


def test_through_the_main_cli_a_run_trains_and_prints_recall(tmp_path):
    run = _run_hybridlm("train", "--quick", "--steps", "10", "--trace", str(tmp_path / "t.duckdb"))
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("held-out recall ") and "trace: run " in run.stderr


def test_importing_the_train_cli_loads_no_torch():
    code = "import sys, hybridlm.train.cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
