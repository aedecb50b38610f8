"""Checkpoint directories: hybridlm's own format and the Hugging Face families, read and written.

``from_pretrained(dir)`` reads config.json, picks the format by ``model_type`` (``"hybridlm"`` or a
family in ``hf.FAMILIES``), builds the model on the meta device and fills it tensor by tensor.
``save_pretrained(model, dir, format="hf")`` writes what transformers' own ``save_pretrained``
writes for the family. Writing never replaces anything but a previous checkpoint the caller allows
(``overwrite=True``), through a staging sibling moved into place (``destination.py``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch

from hybridlm.checkpoints.destination import check_extra_files, check_shard_size
from hybridlm.checkpoints.native import MODEL_TYPE, load_native, read_config_file, read_native_config, save_native
from hybridlm.checkpoints.tokenizer import load_tokenizer
from hybridlm.config import HybridConfig
from hybridlm.model import HybridLM

__all__ = ["from_pretrained", "load_tokenizer", "read_config", "save_pretrained"]


def _read_config_json(path: Path) -> dict:
    config_file = path / "config.json"
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a directory; expected a checkpoint directory with config.json")
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file}: missing; a checkpoint directory needs config.json")
    data = read_config_file(config_file)
    if not isinstance(data, dict):
        raise ValueError(f"{config_file}: expected a JSON object")
    return data


def read_config(path: str | os.PathLike) -> HybridConfig:
    """The HybridConfig of a checkpoint directory, without reading any weights."""
    path = Path(path)
    data = _read_config_json(path)
    if data.get("model_type") == MODEL_TYPE:
        return read_native_config(data, path / "config.json")
    from hybridlm.checkpoints.hf import read_hf_config

    return read_hf_config(path, data)


def _weight_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype hybridlm computes in, a name transformers users write ("bfloat16", "bf16", "auto"), or None."""
    from hybridlm.loading import parse_dtype

    is_number_type = isinstance(dtype, torch.dtype) and not dtype.is_floating_point
    if is_number_type or (dtype is not None and not isinstance(dtype, (str, torch.dtype))):
        raise ValueError(f"dtype must be a floating-point torch dtype or its name, got {dtype!r}")
    return parse_dtype(dtype)


def from_pretrained(
    path: str | os.PathLike, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu"
) -> HybridLM:
    """Load a checkpoint directory (hybridlm or Hugging Face) into a HybridLM in eval mode.

    ``dtype`` casts the floating-point weights: a torch dtype or its name ("bfloat16", "bf16",
    "float32", ...; not float8, which hybridlm does not compute in); None or "auto" keeps the stored
    dtype of the embeddings. ``device``: "cpu", "cuda", "cuda:N", "mps" or a torch.device this
    machine has (``loading.resolve_device``). Every tensor is checked
    against the config (names, shapes, a floating dtype) from the file headers before any is read; a
    failure raises one ValueError or FileNotFoundError naming the file and the tensor.
    """
    from hybridlm.loading import resolve_device

    dtype = _weight_dtype(dtype)
    device = resolve_device(device)
    path = Path(path)
    data = _read_config_json(path)
    if data.get("model_type") == MODEL_TYPE:
        return load_native(path, read_native_config(data, path / "config.json"), dtype, device)
    from hybridlm.checkpoints.hf import load_hf

    return load_hf(path, data, dtype, device)


def save_pretrained(
    model: HybridLM,
    path: str | os.PathLike,
    format: Literal["hybridlm", "hf"] = "hybridlm",
    family: str | None = None,
    max_shard_bytes: int | str | None = None,
    extra_files: Mapping[str, os.PathLike | bytes] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` to the directory ``path``.

    format "hybridlm": config.json + model.safetensors under our parameter names.
    format "hf": a Hugging Face checkpoint of ``family`` (nemotron_h, qwen3_next, qwen3_5_moe,
    granitemoehybrid, jamba, falcon_h1); by default the family the model was read from, else the first
    whose block types cover the pattern (M * - E: nemotron_h; G * - E: qwen3_next; m * - E: jamba;
    P -: falcon_h1).
    ``max_shard_bytes`` (a positive int, or a size like "5GB") splits the weights into shards with an
    index. ``extra_files`` puts more files beside the weights (tokenizer files, README): name -> a
    ``Path`` (that file is copied) or ``bytes`` (written as they are); a ``str`` value is refused as
    ambiguous (a path to copy or the text to write?). Names are plain file names, never config.json,
    the weights or their index.

    ``path`` must not exist, or be an empty directory, or (with ``overwrite=True``) hold a previous
    checkpoint and nothing else; anything else raises ValueError before a byte is written. A failed
    write (read-only or full file system) raises OSError naming ``path`` and leaves nothing behind.
    """
    max_shard_bytes = check_shard_size(max_shard_bytes)
    extra_files = check_extra_files(extra_files)
    if format == "hybridlm":
        if family is not None:
            raise ValueError("family applies to format='hf' only")
        return save_native(model, path, max_shard_bytes, extra_files, overwrite)
    if format == "hf":
        from hybridlm.checkpoints.hf import save_hf

        return save_hf(model, path, family, max_shard_bytes, extra_files, overwrite)
    raise ValueError(f"format must be 'hybridlm' or 'hf', got {format!r}")
