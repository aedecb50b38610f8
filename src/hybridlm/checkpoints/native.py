"""hybridlm's own checkpoint directory: config.json (model_type "hybridlm") + model.safetensors.

Every parameter is stored under its own name (an identity plan, see ``plan.py``); a tied LM head is
not stored. Writes go to a staging sibling directory moved into place (``destination.py``), so a
crash mid-write never leaves a half-written checkpoint under the target name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from hybridlm.checkpoints.plan import identity_plan, load_with_plan, plan_tensors
from hybridlm.checkpoints.safetensors_io import CheckpointReader, write_checkpoint_dir
from hybridlm.config import HybridConfig
from hybridlm.model import HybridLM

MODEL_TYPE = "hybridlm"


def save_native(
    model: HybridLM,
    path: str | os.PathLike,
    max_shard_bytes: int | None = None,
    extra_files: Mapping[str, Path] | None = None,
    overwrite: bool = False,
) -> Path:
    specs, tensors = plan_tensors(model, identity_plan(model))
    # HybridConfig.to_json spells inf "inf" (strict JSON, which has no Infinity); from_dict reads both
    # that and the bare Infinity token older files hold
    config = {"model_type": MODEL_TYPE, "hybridlm": json.loads(model.config.to_json())}
    files = {"config.json": json.dumps(config, indent=2, allow_nan=False) + "\n", **(extra_files or {})}
    return write_checkpoint_dir(path, specs, tensors, files, max_shard_bytes, overwrite)


def read_native_config(data: dict, config_file: Path) -> HybridConfig:
    """The HybridConfig in a native config.json's ``"hybridlm"`` object; a bad one is a ValueError that
    starts with ``config_file`` (HybridConfig's own errors name only the field)."""
    if not isinstance(data.get(MODEL_TYPE), dict):
        raise ValueError(f'{config_file}: model_type is "hybridlm" but there is no "hybridlm" object of fields')
    try:
        return HybridConfig.from_dict(data[MODEL_TYPE])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{config_file}: {error}") from error


def read_config_file(config_file: Path) -> object:
    """config.json's JSON value; bytes that are not UTF-8 or text that is not JSON is a ValueError naming
    the file (json accepts the bare Infinity token of older hybridlm files)."""
    try:
        return json.loads(config_file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{config_file}: not UTF-8 text ({error})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_file}: not valid JSON ({error})") from None


def load_native(path: Path, config: HybridConfig, dtype: torch.dtype | None, device: str) -> HybridLM:
    with CheckpointReader(path) as reader:
        return load_with_plan(config, identity_plan, reader, dtype, device)
