"""Checkpoint directories: hybridlm's own format (and, per family, Hugging Face formats)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from hybridlm.checkpoints.native import MODEL_TYPE, load_native, read_native_config, save_native
from hybridlm.config import HybridConfig
from hybridlm.model import HybridLM

__all__ = ["from_pretrained", "read_config", "save_pretrained"]


def _read_config_json(path: Path) -> dict:
    config_file = path / "config.json"
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a directory; expected a checkpoint directory with config.json")
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file}: missing; a checkpoint directory needs config.json")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_file}: not valid JSON ({error})") from error


def read_config(path: str | os.PathLike) -> HybridConfig:
    """The HybridConfig of a checkpoint directory, without reading any weights."""
    data = _read_config_json(Path(path))
    model_type = data.get("model_type")
    if model_type == MODEL_TYPE:
        return read_native_config(data)
    raise ValueError(f"{Path(path) / 'config.json'}: model_type {model_type!r} is not supported")


def from_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str = "cpu") -> HybridLM:
    """Load a checkpoint directory into a HybridLM (in eval mode)."""
    path = Path(path)
    config = read_config(path)
    return load_native(path, config, dtype, device)


def save_pretrained(model: HybridLM, path: str | os.PathLike) -> Path:
    return save_native(model, path)
