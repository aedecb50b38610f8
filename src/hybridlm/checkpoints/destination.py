"""Where a checkpoint is written: never over anything the user owns, never half-written.

``save_pretrained`` and ``hybridlm convert`` write into a fresh staging directory beside the
destination, named ``.{DST}.hybridlm-staging-{pid}-{random}``, and move it into place only when the
destination is absent, an empty directory, or a previous checkpoint that the caller explicitly
allowed to be replaced (``overwrite=True`` / ``--overwrite``). :func:`check_destination` says which,
and is cheap enough to run before any model is loaded.

Replacing an old checkpoint renames it aside (``.{DST}.hybridlm-old-{pid}-{random}``), renames the
new one in and only then deletes the old; if the second rename fails the old one is renamed back. A
process killed in between leaves these hidden directories behind; the next write into the same
parent directory removes the ones whose process is gone (and renames an orphaned old checkpoint
back if nothing took its place).
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import re
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path

# What a checkpoint directory holds: everything hybridlm writes, everything a Hugging Face model
# repository holds next to its weights. A directory of only these (with a config.json) is taken for
# a previous checkpoint that --overwrite may replace; anything else in it is the user's.
CHECKPOINT_PATTERNS = (
    "config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "README.md",
    "LICENSE*",
    "NOTICE*",
    "USE_POLICY*",
)
_HIDDEN = re.compile(r"^\.(?P<name>.+)\.hybridlm-(?P<kind>staging|old)-(?P<pid>\d+)-[0-9a-f]+$")


def is_checkpoint_file(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in CHECKPOINT_PATTERNS)


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def resolve_target(target: str | os.PathLike) -> Path:
    """``target`` made absolute with its parent's links resolved but not its own (a link as the target is
    refused, not followed), so that ``.``, ``..`` and ``a/..`` have a real name and parent: the staging
    directory goes beside the directory named, never inside it."""
    path = Path(os.path.abspath(target))
    return path.parent.resolve() / path.name if path.name else path  # the root has no name


def check_destination(
    target: str | os.PathLike, overwrite: bool = False, source: str | os.PathLike | None = None
) -> None:
    """Raise ValueError naming ``target`` unless a checkpoint may be written there.

    Allowed: ``target`` does not exist, is an empty directory, or (only with ``overwrite``) holds a
    previous checkpoint (weights and a model's config.json) and nothing else. Refused: a file, a
    symbolic link, a directory holding other files, and a ``target`` that is ``source``, contains it
    or lies inside it.
    """
    shown = target
    target = resolve_target(target)
    if source is not None and Path(source).exists():
        resolved_source = Path(source).resolve()
        if resolved_source == target.resolve():
            raise ValueError(f"{shown}: the destination is the source checkpoint; write to another directory")
        if resolved_source.is_relative_to(target.resolve()):
            raise ValueError(
                f"{shown}: the destination contains the source checkpoint {source}; write to another directory"
            )
        if Path(source).is_dir() and target.resolve().is_relative_to(resolved_source):
            raise ValueError(
                f"{shown}: the destination is inside the source checkpoint {source}; write to another directory"
            )
    _check_free(target, shown, overwrite)


def _check_free(target: Path, shown: str | os.PathLike, overwrite: bool) -> None:
    for parent in target.absolute().parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise ValueError(f"{shown}: cannot create it: {parent} is a file, not a directory")
            break
    if target.is_symlink():
        raise ValueError(f"{shown}: is a symbolic link; give the directory it points to, or another path")
    if not target.exists():
        return
    if not target.is_dir():
        raise ValueError(f"{shown}: is a file, not a directory; a checkpoint is written as a directory")
    entries = sorted(target.iterdir())
    if not entries:
        return
    foreign = [e.name + ("/" if e.is_dir() else "") for e in entries if e.is_dir() or not is_checkpoint_file(e.name)]
    if foreign:
        raise ValueError(
            f"{shown}: the directory holds files that are not a checkpoint's ({_listing(foreign)}); "
            "write to a new or empty directory"
        )
    if not (target / "config.json").is_file():
        names = [e.name for e in entries]
        raise ValueError(
            f"{shown}: the directory holds {_listing(names)} but no config.json, so it is not a previous "
            "checkpoint; write to a new or empty directory"
        )
    not_a_model = _not_a_model(target, entries)
    if not_a_model:
        raise ValueError(
            f"{shown}: the directory holds {_listing([e.name for e in entries])} but {not_a_model}, so it is not a "
            "previous checkpoint; write to a new or empty directory"
        )
    if not overwrite:
        names = [e.name for e in entries]
        raise ValueError(
            f"{shown}: a checkpoint is already there ({_listing(names)}); pass --overwrite (overwrite=True) to "
            "replace it"
        )


def _not_a_model(target: Path, entries: list[Path]) -> str:
    """Why a directory of checkpoint-like names is not a previous checkpoint ("" when it is one): it must
    hold weights, and a config.json of hybridlm's (model_type "hybridlm" with its "hybridlm" object) or
    of a Hugging Face model (a model_type). A project folder with its own config.json, README and
    LICENSE matches every name pattern, and --overwrite must never take it for a model."""
    reasons = []
    if not any(fnmatch.fnmatchcase(e.name, "*.safetensors") for e in entries):
        reasons.append("no *.safetensors weights")
    try:
        data = json.loads((target / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        data = None
    if not isinstance(data, dict):
        reasons.append("a config.json that is not a JSON object")
    elif not isinstance(data.get("model_type"), str) or not data["model_type"]:
        reasons.append("a config.json that has no model_type")
    elif data["model_type"] == "hybridlm" and not isinstance(data.get("hybridlm"), dict):
        reasons.append('a hybridlm config.json without its "hybridlm" object')
    return " and ".join(reasons)


def _is_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale(parent: Path) -> None:
    """Remove the staging directories in ``parent`` left by hybridlm processes that no longer run, and
    rename an old checkpoint set aside by such a process back into place if nothing took its place."""
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    for entry in entries:
        match = _HIDDEN.match(entry.name)
        if match is None or entry.is_symlink() or not entry.is_dir() or _is_alive(int(match["pid"])):
            continue
        original = parent / match["name"]
        if match["kind"] == "old" and not original.exists() and not original.is_symlink():
            os.rename(entry, original)  # killed between its two renames: the user's checkpoint comes back
        else:
            shutil.rmtree(entry, ignore_errors=True)


def _hidden_sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.hybridlm-{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def make_staging_dir(target: Path) -> Path:
    """A new empty directory beside ``target`` with the permissions the umask gives (not 0700)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target.parent)
    while True:
        staging = _hidden_sibling(target, "staging")
        try:
            os.mkdir(staging, 0o777)
        except FileExistsError:
            continue
        return staging


def move_into_place(staging: Path, target: Path, overwrite: bool) -> None:
    """Rename the finished ``staging`` to ``target``, checking ``target`` once more first (it may have
    changed while the weights were written). An old checkpoint is renamed aside, the new one in,
    then the old one deleted; if the new one cannot go in, the old one is renamed back."""
    check_destination(target, overwrite)
    if not target.exists():
        os.rename(staging, target)
    elif not any(target.iterdir()):
        # the user's empty directory stays (its inode, permissions, and any shell whose working directory
        # it is); the files go in one rename each, config.json last so that a kill midway leaves no
        # config.json and the partial directory is never mistaken for a checkpoint
        names = sorted(p.name for p in staging.iterdir())
        for name in sorted(names, key=lambda name: name == "config.json"):
            os.rename(staging / name, target / name)
        staging.rmdir()
    else:
        old = _hidden_sibling(target, "old")
        os.rename(target, old)
        try:
            os.rename(staging, target)
        except BaseException:
            os.rename(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(target.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def describe_os_error(target: Path, error: OSError) -> str:
    """One line for a failed write: the destination, what failed and why."""
    reason = error.strerror or str(error)
    if error.errno == errno.ENOSPC:
        reason = "no space left on the device"
    where = f" ({error.filename})" if error.filename else ""
    return f"{target}: cannot write the checkpoint: {reason}{where}; nothing was written there"


# What a convert carries from the source directory: the checkpoint's files except the weights, their
# index and config.json, which the convert writes anew (an old index would point at shards that are
# not there; an old config.json would describe the other format).
_REWRITTEN = ("config.json", "*.safetensors", "*.safetensors.index.json")


def check_extra_files(extra_files: Mapping[str, os.PathLike | bytes] | None) -> dict[str, Path | bytes]:
    """``save_pretrained``'s ``extra_files``, checked before anything is written: each key a plain file
    name (no separator, not ``.``/``..``, not absolute) that is not one the writer generates (config.json,
    weights, index), each value a path to an existing file (copied) or bytes (written as they are).

    A str value is refused: ``{"tokenizer.json": "/data/tok.json"}`` would otherwise be ambiguous
    between the file to copy and the text to write, and guessing wrong silently writes a path into
    the checkpoint (or reads a file the caller meant as text). ``Path(...)`` or ``text.encode()`` says
    which."""
    checked: dict[str, Path | bytes] = {}
    for name, content in (extra_files or {}).items():
        is_plain = isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name
        if not is_plain or "/" in name or (os.altsep and os.altsep in name):
            raise ValueError(f"extra_files: {name!r} is not a plain file name; the files go inside the checkpoint")
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in _REWRITTEN):
            raise ValueError(
                f"extra_files: {name!r} is written by save_pretrained itself (config.json, *.safetensors and "
                "their index); it cannot be replaced"
            )
        if isinstance(content, (bytes, bytearray)):
            checked[name] = bytes(content)
        elif isinstance(content, os.PathLike):
            path = Path(content)
            if not path.is_file():
                raise ValueError(f"extra_files[{name!r}]: {path} is not a file")
            checked[name] = path
        elif isinstance(content, str):
            raise ValueError(
                f"extra_files[{name!r}] is a str: pass Path({content[:40]!r}) to copy a file, or bytes "
                "(text.encode()) to write that content"
            )
        else:
            raise ValueError(f"extra_files[{name!r}]: expected a Path or bytes, got {type(content).__name__}")
    return checked


def check_shard_size(max_shard_bytes: int | str | None) -> int | None:
    """``max_shard_bytes``: None, a positive int, or a size string as ``--max-shard-size`` takes ("5GB")."""
    if max_shard_bytes is None:
        return None
    if isinstance(max_shard_bytes, str):
        from hybridlm.checkpoints.cli import parse_size

        return parse_size(max_shard_bytes, "max_shard_bytes")
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise ValueError(
            f"max_shard_bytes = {max_shard_bytes!r}: expected a positive number of bytes or a size like '5GB'"
        )
    return max_shard_bytes


def carried_files(source: Path) -> dict[str, Path]:
    """The files of ``source`` to copy beside the converted weights (name -> path)."""
    carried = {}
    for entry in sorted(source.iterdir()):
        is_rewritten = any(fnmatch.fnmatchcase(entry.name, pattern) for pattern in _REWRITTEN)
        if entry.is_file() and is_checkpoint_file(entry.name) and not is_rewritten:
            carried[entry.name] = entry
    return carried
