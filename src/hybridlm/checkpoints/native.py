"""hybridlm's own checkpoint directory: config.json (model_type "hybridlm") + model.safetensors.

Writes go to a temporary sibling directory that is renamed into place, so a crash mid-write never
leaves a half-written checkpoint under the target name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hybridlm.config import HybridConfig
from hybridlm.model import HybridLM

MODEL_TYPE = "hybridlm"


def save_native(model: HybridLM, path: str | os.PathLike) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, staging / "model.safetensors", metadata={"format": "pt"})
        config = {"model_type": MODEL_TYPE, "hybridlm": model.config.to_dict()}
        (staging / "config.json").write_text(json.dumps(config, indent=2, default=str))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def read_native_config(data: dict) -> HybridConfig:
    return HybridConfig.from_dict(data["hybridlm"])


def load_native(path: Path, config: HybridConfig, dtype: torch.dtype | None, device: str) -> HybridLM:
    weights_file = path / "model.safetensors"
    if not weights_file.exists():
        raise FileNotFoundError(f"{weights_file}: missing; a hybridlm checkpoint holds model.safetensors")
    with torch.device("meta"):
        model = HybridLM(config)
    state = load_file(weights_file, device=device)
    expected = set(model.state_dict())
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{weights_file}: tensors do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    shapes = model.state_dict()
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(shapes[name].shape):
            raise ValueError(
                f"{weights_file}: tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(shapes[name].shape)}"
            )
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embeddings.weight
    _materialise_buffers(model, device)
    return model.eval()


def _materialise_buffers(model: HybridLM, device: str) -> None:
    """Non-persistent buffers (RoPE frequencies) are not in the file: rebuild them off the meta device."""
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.is_meta:
                if name == "inv_freq":
                    dim = module.rotary_dim
                    theta = model.config.attention.rope_theta
                    value = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
                    module.register_buffer(name, value.to(device), persistent=False)
                else:
                    raise RuntimeError(f"buffer {name} of {type(module).__name__} was not loaded")
