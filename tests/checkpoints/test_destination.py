"""Writing checkpoints never destroys what a user owns: the real CLI in a subprocess, real directories.

No transformers needed. Each destination case runs ``hybridlm convert`` as a user would and then
looks at the disk: the user's files are still there byte for byte, nothing hidden is left behind,
and the error is one line naming the destination.
"""

import json
import os
import resource
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import hybridlm
from hybridlm.checkpoints import save_pretrained
from hybridlm.model import HybridLM
from hybridlm.presets import get_preset
from tests.helpers import run_cli


def _cli(*args: str, cwd=None, file_size_limit: int | None = None) -> subprocess.CompletedProcess:
    def limit_file_size() -> None:  # a real write failure (EFBIG) that root cannot bypass, unlike chmod
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    preexec = limit_file_size if file_size_limit else None
    return run_cli(*args, cwd=cwd, env={"OMP_NUM_THREADS": "1"}, preexec_fn=preexec)


def _error_line(result: subprocess.CompletedProcess) -> str:
    """The one error line of a refused command (after the preset note), checked for no traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("note:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def _tree(path) -> dict[str, bytes]:
    """Every file under ``path`` (hidden ones too) with its bytes."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _hidden(path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def weightless(tmp_path_factory):
    """A checkpoint directory whose config.json is fine but whose weights are missing: loading it fails,
    so a command that reports anything else about it has checked that before loading the model."""
    path = tmp_path_factory.mktemp("weightless") / "ckpt"
    save_pretrained(HybridLM(get_preset("debug-tiny")), path)
    (path / "model.safetensors").unlink()
    return path


def test_convert_keeps_a_directory_holding_user_files(tmp_path):
    destination = tmp_path / "p"
    destination.mkdir()
    (destination / "notes.txt").write_text("x\n")
    line = _error_line(_cli("convert", "debug-tiny", "p", "--to", "hybridlm", cwd=tmp_path))
    assert line.startswith("hybridlm convert: error: p: ") and "notes.txt" in line
    assert _tree(tmp_path) == {"p/notes.txt": b"x\n"}  # nothing replaced, nothing hidden left behind
    # --overwrite replaces only previous checkpoints, never a directory holding other files
    line = _error_line(_cli("convert", "debug-tiny", "p", "--to", "hybridlm", "--overwrite", cwd=tmp_path))
    assert "notes.txt" in line and _tree(tmp_path) == {"p/notes.txt": b"x\n"}


def test_destination_is_checked_before_the_model_is_loaded(tmp_path, weightless):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "notes.txt").write_text("x\n")
    line = _error_line(_cli("convert", str(weightless), str(tmp_path / "p"), "--to", "hybridlm"))
    assert "notes.txt" in line and "model.safetensors" not in line


def test_a_regular_file_stays_a_file(tmp_path):
    (tmp_path / "f").write_text("mine\n")
    line = _error_line(_cli("convert", "debug-tiny", "f", "--to", "hybridlm", "--overwrite", cwd=tmp_path))
    assert "f: is a file" in line
    line = _error_line(_cli("convert", "debug-tiny", "f/sub", "--to", "hybridlm", cwd=tmp_path))
    assert "f/sub: cannot create it" in line
    assert _tree(tmp_path) == {"f": b"mine\n"}


def test_destination_equal_to_or_containing_the_source_is_refused(tmp_path):
    parent = tmp_path / "parent"
    save_pretrained(HybridLM(get_preset("debug-tiny")), parent / "ckpt")
    (parent / "sibling").mkdir()
    (parent / "sibling" / "data.txt").write_text("keep me\n")
    before = _tree(tmp_path)
    line = _error_line(_cli("convert", "parent/ckpt", "parent/ckpt", "--to", "hybridlm", "--overwrite", cwd=tmp_path))
    assert "parent/ckpt: the destination is the source" in line
    line = _error_line(_cli("convert", "parent/ckpt", "parent", "--to", "hybridlm", "--overwrite", cwd=tmp_path))
    assert "parent: the destination contains the source" in line
    assert _tree(tmp_path) == before


def test_overwrite_replaces_a_previous_checkpoint_only_when_asked(tmp_path):
    torch.manual_seed(0)
    first = HybridLM(get_preset("debug-tiny")).eval()
    second = HybridLM(get_preset("debug-tiny")).eval()
    save_pretrained(first, tmp_path / "ckpt", max_shard_bytes=200_000)
    before = _tree(tmp_path)
    with pytest.raises(ValueError, match=r"ckpt: a checkpoint is already there .*overwrite"):
        save_pretrained(second, tmp_path / "ckpt")
    assert _tree(tmp_path) == before

    save_pretrained(second, tmp_path / "ckpt", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging or old copy left
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    ids = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        assert torch.equal(hybridlm.from_pretrained(tmp_path / "ckpt")(ids).logits, second(ids).logits)


def test_an_empty_directory_is_filled(tmp_path):
    (tmp_path / "empty").mkdir()
    save_pretrained(HybridLM(get_preset("debug-tiny")), tmp_path / "empty")
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_output_permissions_follow_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        save_pretrained(HybridLM(get_preset("debug-tiny")), tmp_path / "ckpt")
    finally:
        os.umask(previous)
    assert (tmp_path / "ckpt").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "ckpt" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


_BLOCKED_WRITER = """
import sys, time, torch
from hybridlm.checkpoints.safetensors_io import TensorSpec, write_checkpoint_dir

def tensors():
    yield "a", torch.zeros(4)
    print("writing", flush=True)
    time.sleep(600)  # killed here, mid-write
    yield "b", torch.zeros(4)

specs = [TensorSpec("a", torch.float32, (4,)), TensorSpec("b", torch.float32, (4,))]
write_checkpoint_dir(sys.argv[1], specs, tensors(), {"config.json": "{}"})
"""


def test_a_killed_write_leaves_nothing_behind_after_the_next_run(tmp_path):
    writer = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_BLOCKED_WRITER), str(tmp_path / "out")],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout.readline() == "writing\n"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    writer.stdout.close()
    assert _hidden(tmp_path), "the killed writer should have left its staging directory"
    assert not (tmp_path / "out").exists()

    result = _cli("convert", "debug-tiny", "other", "--to", "hybridlm", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]


def test_a_checkpoint_set_aside_by_a_killed_overwrite_comes_back(tmp_path):
    """A process killed between renaming the old checkpoint aside and renaming the new one in leaves
    the old one under its hidden name; the next write in that directory renames it back."""
    save_pretrained(HybridLM(get_preset("debug-tiny")), tmp_path / "ckpt")
    before = _tree(tmp_path / "ckpt")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)  # a process that has exited: its pid is no longer alive
    (tmp_path / "ckpt").rename(tmp_path / f".ckpt.hybridlm-old-{dead_pid}-0123abcd")
    save_pretrained(HybridLM(get_preset("debug-tiny")), tmp_path / "other")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "other"]
    assert _tree(tmp_path / "ckpt") == before


def test_a_failing_write_is_one_line_and_leaves_nothing(tmp_path):
    # RLIMIT_FSIZE makes the kernel refuse the weights file past 64 KB (EFBIG), as a full disk would
    result = _cli("convert", "debug-tiny", "new/out", "--to", "hybridlm", cwd=tmp_path, file_size_limit=64_000)
    line = _error_line(result)
    assert line.startswith("hybridlm convert: error: new/out: cannot write the checkpoint: File too large")
    assert list(tmp_path.iterdir()) == []  # no staging directory, and not the parent it created either


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories; see the RLIMIT_FSIZE test")
def test_a_read_only_parent_is_one_line(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        line = _error_line(_cli("convert", "debug-tiny", "ro/out", "--to", "hybridlm", cwd=tmp_path))
    finally:
        parent.chmod(0o755)
    assert "ro/out: cannot write the checkpoint: Permission denied" in line
    assert list(parent.iterdir()) == []


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--to", "hybridlm", "--max-shard-size", "abc"], "--max-shard-size 'abc': give a size like 500MB"),
        (["--to", "hybridlm", "--max-shard-size", "0"], "--max-shard-size '0': must be at least one byte"),
        (["--to", "hybridlm", "--dtype", "int8"], "unknown dtype 'int8'"),
        (["--to", "hybridlm", "--family", "jamba"], "--family applies to --to hf only"),
        (["--to", "hf", "--family", "nemotron_h"], "cannot export to nemotron_h: block type(s) G, m"),
        (["--to", "hf"], "no Hugging Face family holds every block type"),
    ],
    ids=["size-abc", "size-0", "dtype", "family-for-hybridlm", "family-cannot-hold", "no-family-fits"],
)
def test_arguments_are_checked_before_the_model_is_loaded(tmp_path, weightless, flags, message):
    line = _error_line(_cli("convert", str(weightless), str(tmp_path / "out"), *flags))
    assert message in line and "model.safetensors" not in line
    assert list(tmp_path.iterdir()) == []


def test_unknown_family_is_a_usage_error(tmp_path):
    result = _cli("convert", "debug-tiny", "out", "--to", "hf", "--family", "bogus", cwd=tmp_path)
    assert result.returncode == 2 and "invalid choice: 'bogus'" in result.stderr
    assert "Traceback" not in result.stderr and list(tmp_path.iterdir()) == []


def test_convert_carries_the_files_beside_the_weights(tmp_path):
    source = tmp_path / "src"
    save_pretrained(HybridLM(get_preset("debug-tiny")), source, max_shard_bytes=200_000)
    kept = {
        "tokenizer.json": "{}",
        "tokenizer_config.json": '{"eos_token": "</s>"}',
        "special_tokens_map.json": "{}",
        "generation_config.json": '{"eos_token_id": 2}',
        "chat_template.jinja": "{{ messages }}",
        "chat_template.json": '{"chat_template": "{{ messages }}"}',
        "README.md": "# my model\n",
        "LICENSE": "Apache-2.0\n",
        "NOTICE": "notice\n",
    }
    for name, text in kept.items():
        (source / name).write_text(text)
    result = _cli("convert", "src", "dst", "--to", "hybridlm", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    written = _tree(tmp_path / "dst")
    assert {name: written[name].decode() for name in kept} == kept
    # the weights are written anew in one file: the source's shards and index do not travel
    assert sorted(set(written) - set(kept)) == ["config.json", "model.safetensors"]


def _project(path):
    """A user's project folder made only of names a checkpoint also uses, with a non-model config.json."""
    path.mkdir()
    files = {"config.json": '{"name": "my app"}\n', "README.md": "notes\n", "LICENSE": "MIT\n", "vocab.txt": "w\n"}
    for name, text in files.items():
        (path / name).write_text(text)
    return {f"{path.name}/{name}": text.encode() for name, text in files.items()}


def test_overwrite_refuses_a_folder_whose_config_is_not_a_models(tmp_path):
    before = _project(tmp_path / "proj")
    line = _error_line(_cli("convert", "debug-tiny", "proj", "--to", "hybridlm", "--overwrite", cwd=tmp_path))
    assert line.startswith("hybridlm convert: error: proj: ") and "not a previous checkpoint" in line
    assert "no *.safetensors weights" in line and "model_type" in line
    with pytest.raises(ValueError, match=r"proj: .*not a previous checkpoint"):
        save_pretrained(HybridLM(get_preset("debug-tiny")), tmp_path / "proj", overwrite=True)
    assert _tree(tmp_path) == before


def test_overwrite_refuses_weights_beside_a_config_without_model_type(tmp_path):
    before = _project(tmp_path / "proj")
    (tmp_path / "proj" / "model.safetensors").write_bytes(b"not mine to delete")
    before["proj/model.safetensors"] = b"not mine to delete"
    with pytest.raises(ValueError, match=r"proj: .*config\.json that has no model_type"):
        save_pretrained(HybridLM(get_preset("debug-tiny")), tmp_path / "proj", overwrite=True)
    assert _tree(tmp_path) == before


def test_destination_inside_the_source_is_refused_before_loading(tmp_path, weightless):
    before = _tree(weightless)
    line = _error_line(_cli("convert", str(weightless), str(weightless / "sub"), "--to", "hybridlm"))
    assert "the destination is inside the source checkpoint" in line and "model.safetensors" not in line
    assert _tree(weightless) == before


def test_convert_into_the_current_directory(tmp_path):
    (tmp_path / "e").mkdir()
    result = _cli("convert", "debug-tiny", ".", "--to", "hybridlm", cwd=tmp_path / "e")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["config.json", "model.safetensors"]
    hybridlm.from_pretrained(tmp_path / "e")


def test_a_refused_current_directory_is_refused_before_loading(tmp_path, weightless):
    (tmp_path / "notes.txt").write_text("x\n")
    line = _error_line(_cli("convert", str(weightless), ".", "--to", "hybridlm", cwd=tmp_path))
    assert "notes.txt" in line and "model.safetensors" not in line
    assert _tree(tmp_path) == {"notes.txt": b"x\n"}


@pytest.mark.parametrize("name", ["../precious.txt", "sub/x.txt", "/tmp/x.txt", "..", "", "."])
def test_extra_files_stay_inside_the_checkpoint(tmp_path, name):
    (tmp_path / "precious.txt").write_text("mine\n")
    with pytest.raises(ValueError, match=r"extra_files: .*a plain file name"):
        save_pretrained(HybridLM(get_preset("debug-tiny")), tmp_path / "out", extra_files={name: b"gone"})
    assert _tree(tmp_path) == {"precious.txt": b"mine\n"}


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "model.safetensors.index.json"])
def test_extra_files_cannot_replace_what_the_writer_generates(tmp_path, name):
    with pytest.raises(ValueError, match=rf"extra_files: {name!r} .*written by save_pretrained"):
        save_pretrained(HybridLM(get_preset("debug-tiny")), tmp_path / "out", extra_files={name: b"{}"})
    assert list(tmp_path.iterdir()) == []


def test_extra_files_copy_paths_write_bytes_and_refuse_plain_strings(tmp_path):
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text('{"model": {}}')
    model = HybridLM(get_preset("debug-tiny"))
    with pytest.raises(ValueError, match=r"extra_files\['tokenizer.json'\] is a str: .*Path"):
        save_pretrained(model, tmp_path / "out", extra_files={"tokenizer.json": str(tokenizer)})
    with pytest.raises(ValueError, match=r"extra_files\['LICENSE'\]: .*missing is not a file"):
        save_pretrained(model, tmp_path / "out", extra_files={"LICENSE": tmp_path / "missing"})
    assert not (tmp_path / "out").exists()
    files = {"tokenizer.json": tokenizer, "README.md": b"# hello\n"}
    save_pretrained(HybridLM(get_preset("debug-tiny")), tmp_path / "out", extra_files=files)
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == tokenizer.read_bytes()
    assert (tmp_path / "out" / "README.md").read_bytes() == b"# hello\n"


@pytest.mark.parametrize("size", [0, -1, 1.5, True, "lots", "-5GB"])
def test_max_shard_bytes_must_be_a_positive_size(tmp_path, size):
    with pytest.raises(ValueError, match=r"max_shard_bytes"):
        save_pretrained(HybridLM(get_preset("debug-tiny")), tmp_path / "out", max_shard_bytes=size)
    assert list(tmp_path.iterdir()) == []


def test_max_shard_bytes_takes_size_strings(tmp_path):
    save_pretrained(HybridLM(get_preset("debug-tiny")), tmp_path / "out", max_shard_bytes="200KB")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = {tmp_path / "out" / name for name in index["weight_map"].values()}
    assert len(shards) > 1 and all(p.stat().st_size <= 200_000 + 2**16 for p in shards)


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--max-shard-size=1TB", None),
        ("--max-shard-size=2TiB", None),
        ("--max-shard-size=-5GB", "must be at least one byte"),
    ],
)
def test_max_shard_size_in_terabytes(tmp_path, weightless, flag, message):
    result = _cli(
        "convert", "debug-tiny" if message is None else str(weightless), "out", "--to", "hybridlm", flag, cwd=tmp_path
    )
    if message is None:
        assert result.returncode == 0, result.stderr
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    else:
        assert message in _error_line(result) and list(tmp_path.iterdir()) == []
