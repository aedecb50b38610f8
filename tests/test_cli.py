"""The hybridlm command, run as a real subprocess: info, generate (streamed text), --version, --help."""

import itertools
import json
import os
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import torch

from hybridlm.accounting import count_params
from hybridlm.presets import get_preset
from tests.helpers import gpt2_byte_symbols, run_cli

REPO = Path(__file__).resolve().parents[1]
SUBCOMMANDS = [
    *("info", "generate", "serve", "profile", "report", "query", "import", "convert"),
    *("train", "ablate", "rebalance"),
]


run = run_cli


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

    config = get_preset("debug-tiny")
    save_pretrained(HybridLM(config), tmp_path / "ckpt")
    result = run("info", str(tmp_path / "ckpt"), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["params"]["total"] == count_params(config).total


def test_info_notes_a_context_longer_than_the_models():
    context = get_preset("debug-tiny").max_position_embeddings
    assert run("info", "debug-tiny", "--context", str(context), "--json").stderr == ""
    result = run("info", "debug-tiny", "--context", str(context + 1), "--json")
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith(f"note: --context {context + 1:,} is more than the model's context of {context:,}")
    assert json.loads(result.stdout)["memory"]["context"] == context + 1


def test_generate_prints_prompt_and_continuation():
    result = run("generate", "debug-tiny", "--prompt", "abc", "--max-new-tokens", "5")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("abc")


def test_generate_with_compile_prints_what_the_eager_step_prints():
    """Greedy: the compiled decode step (checked against the eager one at its first step) continues the
    prompt exactly as the eager step does, and warns nothing."""
    args = ("generate", "debug-tiny", "--prompt", "abc", "--max-new-tokens", "8")
    eager, compiled = run(*args), run(*args, "--compile")
    assert compiled.returncode == 0, compiled.stderr
    assert compiled.stdout == eager.stdout
    assert "decoding eagerly" not in compiled.stderr


def _stderr_on_a_terminal(*args: str) -> str:
    """Run the command with stderr on a pseudo-terminal (stdout piped); what the terminal received."""
    import pty

    env = {k: v for k, v in os.environ.items() if k != "HYBRIDLM_PROGRESS"}
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "hybridlm", *args], stdout=subprocess.PIPE, stderr=follower, env=env
    )
    os.close(follower)
    received = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO once the child closed its end (Linux)
            break
        if not chunk:
            break
        received += chunk
    os.close(leader)
    process.communicate(timeout=300)
    assert process.returncode == 0, received
    return received.decode(errors="replace")


def test_generate_shows_a_spinner_only_on_a_terminal():
    args = ("generate", "debug-tiny", "--prompt", "hi", "--max-new-tokens", "2")
    assert "building debug-tiny (random weights)" in _stderr_on_a_terminal(*args)
    piped = run(*args, env={"HYBRIDLM_PROGRESS": ""})
    assert piped.returncode == 0 and "building" not in piped.stderr


# -- streamed text is whole characters -----------------------------------------------------------

# 1-, 2-, 3- and 4-byte characters whose 13 UTF-8 bytes are all different, so a table "this byte ->
# next byte" can make greedy decoding emit exactly these bytes, one token per byte.
TEXT = "hé€日😀"


def _rigged_checkpoint(path: Path, token_ids: list[int]) -> Path:
    """A debug-tiny checkpoint whose greedy continuation of token_ids[0] is token_ids[1:].

    Every block's parameters are zero, so each block adds exactly 0 to the residual stream and the
    last hidden state is the current token's embedding; embeddings are one-hot per token and lm_head
    sends each token's one-hot direction to the next token's logit.
    """
    from hybridlm.checkpoints import save_pretrained
    from hybridlm.model import HybridLM

    assert len(set(token_ids)) == len(token_ids)
    model = HybridLM(get_preset("debug-tiny"))
    assert not model.config.tie_word_embeddings
    with torch.no_grad():
        for parameter in model.layers.parameters():
            parameter.zero_()
        model.embeddings.weight.zero_()
        model.lm_head.weight.zero_()
        for slot, (token, next_token) in enumerate(itertools.pairwise(token_ids)):
            model.embeddings.weight[token, slot] = 1.0
            model.lm_head.weight[next_token, slot] = 1.0
    save_pretrained(model, path)
    return path


def _byte_level_bpe_json(path: Path) -> list[int]:
    """A byte-level BPE tokenizer.json (256 byte tokens, id = byte value, no merges); returns TEXT's ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {symbol: byte for byte, symbol in enumerate(gpt2_byte_symbols())}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(path))
    ids = tokenizer.encode(TEXT).ids
    assert ids == list(TEXT.encode("utf-8"))  # the table above is the one tokenizers uses
    assert tokenizer.decode(ids[:2]) == "h\ufffd"  # a lone lead byte decodes to U+FFFD: the hazard
    return ids


@pytest.mark.parametrize("tokenizer", ["bytes", "byte-level BPE tokenizer.json"])
def test_generate_streams_whole_characters(tmp_path, tokenizer):
    token_ids = list(TEXT.encode("utf-8"))
    checkpoint = _rigged_checkpoint(tmp_path / "ckpt", token_ids)
    if tokenizer != "bytes":
        assert _byte_level_bpe_json(checkpoint / "tokenizer.json") == token_ids
    prompt = TEXT[0]
    result = run("generate", str(checkpoint), "--prompt", prompt, "--max-new-tokens", str(len(token_ids) - len(prompt)))
    assert result.returncode == 0, result.stderr
    assert result.stdout == TEXT + "\n"


# -- --version and --help ------------------------------------------------------------------------


def test_version_names_hybridlm_torch_and_python_without_loading_torch():
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    result = run("--version")
    assert result.returncode == 0, result.stderr
    python = ".".join(map(str, sys.version_info[:3]))
    assert result.stdout == f"hybridlm {version} (torch {metadata.version('torch')}, python {python})\n"
    script = "import sys; from hybridlm.cli import main; main(['--version']); print(sorted(sys.modules))"
    check = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "'torch'" not in check.stdout


def test_top_level_help_is_written_for_users():
    result = run("--help")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "``" not in text and ":class:" not in text
    for command in SUBCOMMANDS:  # each listed with its one-line help
        line = next((line for line in text.splitlines() if line.strip().startswith(command + " ")), None)
        assert line is not None and len(line.split()) > 2, f"{command} is not listed with a help line"
    examples = text.split("examples:", 1)[1]
    assert all(f"hybridlm {command}" in examples for command in ("info", "generate", "convert", "profile", "report"))
    for option in ("--version", "--debug", "--threads"):
        assert option in text


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_working_help(command, capsys):
    from hybridlm.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"hybridlm {command}" in text
    assert "``" not in text
