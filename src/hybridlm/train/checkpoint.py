"""Training checkpoints: one file, written atomically, read only whole and intact.

File layout: a format tag line, a JSON header line (format version, payload length, SHA-256 of the
payload), then the payload written by ``torch.save``. A file is written to a staging name in the same
directory, flushed to disk and renamed into place, so the final name only ever holds a complete
checkpoint. Reading checks the tag, the version, the length (a truncated copy), the checksum (a
corrupted one), that torch can read the payload without unpickling code (``weights_only``), and that
every expected key is there: any failure is one ValueError naming the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT_TAG = b"hybridlm-train-checkpoint\n"
FORMAT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"
PAYLOAD_KEYS = frozenset(
    {
        "step",
        "data_position",
        "train_config",
        "model_config",
        "model",
        "optimizer",
        "scheduler",
        "rng",
        "history",
        "evals",
    }
)
RNG_KEYS = frozenset({"torch", "cuda", "python", "numpy"})


def write_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (a dict with exactly PAYLOAD_KEYS) to ``path`` atomically; returns the path."""
    missing, extra = PAYLOAD_KEYS - set(payload), set(payload) - PAYLOAD_KEYS
    if missing or extra:
        raise ValueError(f"checkpoint payload keys: missing {sorted(missing)}, unexpected {sorted(extra)}")
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    body = buffer.getvalue()
    header = {"version": FORMAT_VERSION, "payload_bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(path)
    staging = path.with_name(f".{path.name}.staging-{os.getpid()}")
    try:
        with open(staging, "wb") as file:
            file.write(FORMAT_TAG)
            file.write(json.dumps(header).encode() + b"\n")
            file.write(body)
            file.flush()
            os.fsync(file.fileno())
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return path


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The payload of the checkpoint at ``path``, checked whole; a ValueError naming the file otherwise."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{path}: no such checkpoint") from None
    except OSError as error:
        raise ValueError(f"{path}: cannot be read ({error.strerror or error})") from None
    if not data.startswith(FORMAT_TAG):
        raise ValueError(f"{path}: not a hybridlm training checkpoint (no {FORMAT_TAG.strip().decode()!r} tag)")
    header_end = data.find(b"\n", len(FORMAT_TAG))
    header = _parse_header(path, data[len(FORMAT_TAG) : header_end] if header_end >= 0 else b"")
    body = data[header_end + 1 :]
    if len(body) != header["payload_bytes"]:
        raise ValueError(
            f"{path}: truncated or extended checkpoint: {len(body):,} payload bytes, the header says "
            f"{header['payload_bytes']:,}"
        )
    if hashlib.sha256(body).hexdigest() != header["sha256"]:
        raise ValueError(f"{path}: corrupt checkpoint: the payload's SHA-256 does not match its header")
    try:
        payload = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises RuntimeError / UnpicklingError / others for bad archives
        raise ValueError(f"{path}: the checkpoint payload cannot be read ({type(error).__name__}: {error})") from None
    _check_payload(path, payload)
    return payload


def _parse_header(path: Path, line: bytes) -> dict[str, Any]:
    try:
        header = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{path}: corrupt checkpoint header (expected one JSON line after the tag)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt checkpoint header (expected a JSON object)")
    if header.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: checkpoint format version {header.get('version')!r}; this hybridlm reads {FORMAT_VERSION}"
        )
    size, digest = header.get("payload_bytes"), header.get("sha256")
    if not isinstance(size, int) or size < 0 or not isinstance(digest, str) or len(digest) != 64:
        raise ValueError(f"{path}: corrupt checkpoint header (needs payload_bytes and sha256)")
    return header


def _check_payload(path: Path, payload: Any) -> None:
    if not isinstance(payload, dict):
        raise ValueError(f"{path}: the checkpoint payload is a {type(payload).__name__}, expected a dict")
    missing = PAYLOAD_KEYS - set(payload)
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks {sorted(missing)}")
    for key in ("step", "data_position"):
        if not isinstance(payload[key], int) or payload[key] < 0:
            raise ValueError(f"{path}: checkpoint {key} = {payload[key]!r}, expected a whole number >= 0")
    for key in ("model", "optimizer", "scheduler", "train_config", "rng"):
        if not isinstance(payload[key], dict):
            raise ValueError(f"{path}: checkpoint {key} is a {type(payload[key]).__name__}, expected a dict")
    missing_rng = RNG_KEYS - set(payload["rng"])
    if missing_rng:
        raise ValueError(f"{path}: the checkpoint's RNG states lack {sorted(missing_rng)}")
    if not isinstance(payload["model_config"], str):
        raise ValueError(f"{path}: checkpoint model_config must be the model's config JSON")


def _remove_stale_staging(path: Path) -> None:
    """A staging file left by a writer that was killed mid-write is garbage: remove it."""
    for stale in path.parent.glob(f".{path.name}.staging-*"):
        stale.unlink(missing_ok=True)


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- random number generators -----------------------------------------------------------------------


def capture_rng_states() -> dict[str, Any]:
    """Every RNG a training step may read: torch (CPU and each CUDA device), Python's, numpy's global."""
    numpy_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": _to_lists(random.getstate()),
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
    }


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = states["numpy"]
    np.random.set_state(
        {
            "bit_generator": numpy_state["bit_generator"],
            "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        }
    )


def _to_lists(value: Any) -> Any:
    return [_to_lists(v) for v in value] if isinstance(value, tuple) else value
