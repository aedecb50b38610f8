"""The hybridlm command, run as a real subprocess."""

import json
import subprocess
import sys

import pytest

from hybridlm.accounting import count_params
from hybridlm.config import HybridConfig


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hybridlm.cli", *args], capture_output=True, text=True, timeout=300, check=False
    )


def test_info_json_for_nemotron():
    result = run("info", "nemotron-3-nano-30b-a3b", "--json", "--context", "131072")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["blocks"] == {"mamba2": 23, "attention": 6, "moe": 23}
    assert report["params"]["total"] == pytest.approx(31.6e9, rel=0.02)
    assert report["params"]["active_without_embedding"] == pytest.approx(3.2e9, rel=0.02)
    assert report["memory"]["kv_fraction_of_pure_attention"] == pytest.approx(6 / 52)


def test_info_table_for_qwen3_next():
    result = run("info", "qwen3-next-80b-a3b")
    assert result.returncode == 0, result.stderr
    assert "79.674B" in result.stdout and "3.875B" in result.stdout
    assert "GEGEGE*E" in result.stdout


def test_info_of_saved_checkpoint_matches_preset(tmp_path):
    from hybridlm.checkpoints import save_pretrained
    from hybridlm.model import HybridLM

    config = HybridConfig.from_preset("debug-tiny")
    save_pretrained(HybridLM(config), tmp_path / "ckpt")
    result = run("info", str(tmp_path / "ckpt"), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["params"]["total"] == count_params(config).total


def test_generate_prints_prompt_and_continuation():
    result = run("generate", "debug-tiny", "--prompt", "abc", "--max-new-tokens", "5")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("abc")


def test_unknown_model_is_a_clear_error():
    result = run("info", "no-such-model")
    assert result.returncode == 2
    assert "neither a preset" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["info", "generate", "profile", "report", "query", "import", "convert"])
def test_every_subcommand_has_working_help(command, capsys):
    from hybridlm.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert command in capsys.readouterr().out
