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
    config = {"model_type": MODEL_TYPE, "hybridlm": model.config.to_dict()}
    files = {"config.json": json.dumps(config, indent=2, default=str) + "\n", **(extra_files or {})}
    return write_checkpoint_dir(path, specs, tensors, files, max_shard_bytes, overwrite)


def read_native_config(data: dict) -> HybridConfig:
    return HybridConfig.from_dict(data["hybridlm"])


def load_native(path: Path, config: HybridConfig, dtype: torch.dtype | None, device: str) -> HybridLM:
    with CheckpointReader(path) as reader:
        return load_with_plan(config, identity_plan, reader, dtype, device)
