"""How the hybridlm command fails, run as a real subprocess: a user's mistake is one line on stderr and
exit status 2; a traceback only with --debug or for a bug (exit 1); Ctrl-C is exit 130; a closed
pipe is quiet."""

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import run_cli

run = run_cli
ENV = {**{k: v for k, v in os.environ.items() if k != "HYBRIDLM_DEBUG"}, "HYBRIDLM_PROGRESS": "0"}  # for Popen


def assert_one_line_error(result: subprocess.CompletedProcess, command: str, *words: str) -> str:
    """Exit 2 and exactly one stderr line 'hybridlm COMMAND: error: ...' naming ``words``."""
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{command}: error: "), lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A file, an empty directory and a directory holding a broken config.json."""
    root = tmp_path_factory.mktemp("hostile")
    (root / "afile.txt").write_text("hello\n")
    (root / "emptydir").mkdir()
    (root / "broken").mkdir()
    (root / "broken" / "config.json").write_text("{not json")
    return root


# (arguments, the command named in the error line, words the line must hold)
HOSTILE = [
    (["info", ""], "hybridlm info", ["config.json"]),
    (["info", "no-such-model"], "hybridlm info", ["no-such-model", "neither a preset"]),
    (["info", "afile.txt"], "hybridlm info", ["afile.txt"]),
    (["info", "emptydir"], "hybridlm info", ["emptydir", "config.json"]),
    (["info", "broken"], "hybridlm info", ["broken/config.json"]),
    (["info", "debug-tiny", "--context", "0"], "hybridlm info", ["--context", "between 1 and"]),
    (
        ["generate", "debug-tiny", "--prompt", os.fsdecode(b"h\xffi")],
        "hybridlm generate",
        ["--prompt", "0xff", "UTF-8"],
    ),
    (["info", "debug-tiny", "--context", "abc"], "hybridlm info", ["--context", "'abc'"]),
    (["info", "debug-tiny", "--context", "1" + "0" * 40], "hybridlm info", ["--context", "2**40"]),
    (["info", "debug-tiny", "--batch-size", "-1"], "hybridlm info", ["--batch-size"]),
    (["info", "debug-tiny", "--dtype", "int8"], "hybridlm info", ["int8"]),
    (["generate", "debug-tiny", "--prompt", ""], "hybridlm generate", ["--prompt"]),
    (["generate", "debug-tiny", "--prompt", "hi", "--max-new-tokens", "0"], "hybridlm generate", ["--max-new-tokens"]),
    (["generate", "debug-tiny", "--prompt", "hi", "--max-new-tokens", "-5"], "hybridlm generate", ["--max-new-tokens"]),
    (["generate", "debug-tiny", "--prompt", "hi", "--top-k", "0"], "hybridlm generate", ["--top-k"]),
    (["generate", "debug-tiny", "--prompt", "hi", "--seed", "-1"], "hybridlm generate", ["--seed"]),
    (["generate", "debug-tiny", "--prompt", "hi", "--seed", "1" + "0" * 30], "hybridlm generate", ["--seed"]),
    (["generate", "debug-tiny", "--prompt", "hi", "--device", "tpu"], "hybridlm generate", ["tpu"]),
    (["generate", "debug-tiny", "--prompt", "hi", "--device", ""], "hybridlm generate", ["--device"]),
    (["generate", "debug-tiny", "--prompt", "hi", "--max-new-tokens", "9" * 12], "hybridlm generate", ["context"]),
    (["generate", "emptydir", "--prompt", "hi"], "hybridlm generate", ["emptydir"]),
    (["generate", "debug-tiny"], "hybridlm generate", ["--prompt"]),
    (["generate", "debug-tiny", "--prompt", "hi", "--compile", "fast"], "hybridlm generate", ["--compile", "'fast'"]),
    (
        ["generate", "debug-tiny", "--prompt", "hi", "--compile", "--ep", "2"],
        "hybridlm generate",
        ["--compile", "--ep"],
    ),
    (["serve", "debug-tiny", "--compile"], "hybridlm", ["--compile"]),  # the server times every block
    (["query", "emptydir", "SELECT 1"], "hybridlm query", ["emptydir"]),
    (["query", "afile.txt", "SELECT 1"], "hybridlm query", ["afile.txt"]),
    (["query", "missing.duckdb", "SELECT 1"], "hybridlm query", ["missing.duckdb"]),
    (["import", "missing.json", "--db", "t.duckdb"], "hybridlm import", ["missing.json"]),
    (["import", "emptydir", "--db", "t.duckdb"], "hybridlm import", ["emptydir"]),
    (["convert", "debug-tiny", "afile.txt", "--to", "hybridlm"], "hybridlm convert", ["afile.txt"]),
    (["convert", "debug-tiny", "out", "--to", "hybridlm", "--max-shard-size", "abc"], "hybridlm convert", ["abc"]),
    (["--threads", "0", "info", "debug-tiny"], "hybridlm", ["--threads"]),
    (["--threads", "1" + "0" * 20, "info", "debug-tiny"], "hybridlm", ["--threads"]),
    (["no-such-command"], "hybridlm", ["no-such-command"]),
    ([], "hybridlm", ["COMMAND"]),
]


@pytest.mark.parametrize(("args", "command", "words"), HOSTILE, ids=[" ".join(case[0]) or "(none)" for case in HOSTILE])
def test_user_error_is_one_line(workdir, args, command, words):
    assert_one_line_error(run(*args, cwd=workdir), command, *words)


def test_generate_checks_its_arguments_before_building_the_model(tmp_path):
    """A checkpoint with a config and no weights: the flags are refused, not the missing weights."""
    from hybridlm.checkpoints import save_pretrained
    from hybridlm.model import HybridLM
    from hybridlm.presets import get_preset

    checkpoint = save_pretrained(HybridLM(get_preset("debug-tiny")), tmp_path / "ckpt")
    for path in checkpoint.iterdir():
        if path.name != "config.json":
            path.unlink()
    base = ["generate", str(checkpoint), "--prompt", "hi"]
    assert_one_line_error(run(*base, "--top-p", "0", "--temperature", "1"), "hybridlm generate", "--top-p")
    assert_one_line_error(run(*base, "--temperature", "nan"), "hybridlm generate", "--temperature")
    assert_one_line_error(run(*base, "--dtype", "int8"), "hybridlm generate", "int8")
    assert_one_line_error(run(*base, "--device", "tpu"), "hybridlm generate", "tpu")
    # and the missing weights themselves are one line too
    assert_one_line_error(run(*base), "hybridlm generate")


def test_debug_shows_the_traceback_of_a_user_error():
    plain = run("info", "no-such-model")
    line = assert_one_line_error(plain, "hybridlm info")
    for result in (run("--debug", "info", "no-such-model"), run("info", "no-such-model", env={"HYBRIDLM_DEBUG": "1"})):
        assert result.returncode == 2
        assert "Traceback (most recent call last)" in result.stderr
        assert result.stderr.splitlines()[-1] == line


def test_a_bug_prints_its_traceback_and_says_so():
    """A command that divides by zero stands in for a bug: the real main, a real subprocess."""
    script = (
        "import sys\n"
        "from hybridlm import cli\n"
        "def register(sub):\n"
        "    sub.add_parser('boom').set_defaults(func=lambda args: 1 / 0)\n"
        "cli.REGISTRARS.append(register)\n"
        "sys.exit(cli.main(['boom']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False, env=ENV
    )
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr and "ZeroDivisionError" in result.stderr
    assert "bug" in result.stderr.splitlines()[-1]


def _read_until(stream, wanted: bytes, timeout: float) -> bytes:
    """Bytes from a pipe until ``wanted`` shows up (or the timeout passes, or the pipe closes)."""
    seen = b""
    deadline = time.monotonic() + timeout
    while wanted not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([stream], [], [], 1.0)
        if ready:
            chunk = os.read(stream.fileno(), 4096)
            if not chunk:
                break
            seen += chunk
    return seen


def _default_sigint() -> None:
    # a child of a shell that ignores SIGINT (a background job) would inherit SIG_IGN
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_during_generate_exits_130_without_a_traceback():
    process = subprocess.Popen(
        [sys.executable, "-m", "hybridlm", "generate", "debug-small", "--prompt", "go", "--max-new-tokens", "4000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
        preexec_fn=_default_sigint,
    )
    try:
        # the prompt is echoed once the model is built, just before decoding starts
        assert b"go" in _read_until(process.stdout, b"go", timeout=240)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, stderr
    assert b"Traceback" not in stderr
    assert stderr.decode().strip().splitlines()[-1] == "hybridlm generate: interrupted"


@pytest.mark.parametrize("output", ["table", "--csv"])
def test_closed_pipe_is_quiet(tmp_path, output):
    """`hybridlm query ... | head -1`: the reader goes away; no traceback, no 'Exception ignored'."""
    from hybridlm.trace.store import TraceStore

    database = tmp_path / "t.duckdb"
    TraceStore(database).close()
    flags = [] if output == "table" else [output]
    process = subprocess.Popen(
        [sys.executable, "-m", "hybridlm", "query", str(database), "SELECT range AS n FROM range(100000)", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
    )
    assert _read_until(process.stdout, b"\n", timeout=240)
    process.stdout.close()
    stderr = process.stderr.read()
    process.wait(timeout=120)
    assert stderr == b""
    # print() reports the closed pipe (exit as if killed by SIGPIPE, like other Unix tools); one large
    # sys.stdout.write() does not (CPython's buffered writer drops the error), so that run ends 0
    assert process.returncode in (0, 128 + signal.SIGPIPE)
    if output == "table":
        assert process.returncode == 128 + signal.SIGPIPE


def test_info_into_a_closed_pipe_is_quiet():
    """rich's own closed-pipe handling exits 1; the command exits as generate and query do."""
    process = subprocess.Popen(
        [sys.executable, "-m", "hybridlm", "info", "debug-small"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
    )
    process.stdout.readline()
    process.stdout.close()
    assert process.wait(timeout=120) == 141
    assert process.stderr.read() == b""


def test_info_defaults_to_the_models_own_context():
    result = run_cli("info", "debug-small", "--json")
    assert result.returncode == 0 and result.stderr == ""  # no "more than the model's context" note
    assert json.loads(result.stdout)["memory"]["context"] == 8192
