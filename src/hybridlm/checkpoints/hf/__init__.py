"""Hugging Face checkpoint directories: the family registry, loading and saving.

``FAMILIES`` maps a config.json ``model_type`` to its :class:`Family` (one small module each); a
family turns config.json into a HybridConfig and back, and gives the tensor plan (``plan.py``)
between transformers' names and ours. What each family computes is specified in
``docs/hf-families.md``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from hybridlm.blocks import SEQUENCE_MIXER_CHARS, layer_type_name
from hybridlm.checkpoints.hf import falcon_h1, granitemoehybrid, jamba, nemotron_h, qwen3_next
from hybridlm.checkpoints.hf.common import Family, HFConfig, encode_floats
from hybridlm.checkpoints.plan import load_with_plan, plan_tensors
from hybridlm.checkpoints.safetensors_io import CheckpointReader, write_checkpoint_dir
from hybridlm.config import HybridConfig
from hybridlm.model import HybridLM

__all__ = ["FAMILIES", "FAMILY_NAMES", "Family", "choose_family", "load_hf", "read_hf_config", "save_hf"]

_ALL = (
    nemotron_h.FAMILY,
    qwen3_next.QWEN3_NEXT,
    qwen3_next.QWEN3_5_MOE,
    granitemoehybrid.FAMILY,
    jamba.FAMILY,
    falcon_h1.FAMILY,
)
FAMILIES: dict[str, Family] = {model_type: family for family in _ALL for model_type in family.model_types}
FAMILY_NAMES: dict[str, Family] = {family.name: family for family in _ALL}
# the export order when nothing says which family: the first whose block types cover the pattern
_AUTO_ORDER = (nemotron_h.FAMILY, qwen3_next.QWEN3_NEXT, jamba.FAMILY, falcon_h1.FAMILY)

# model types known not to fit, with the reason (none at present; a clearer error than "unknown")
UNSUPPORTED: dict[str, str] = {}


def family_of(data: dict[str, Any], config_file: Path) -> Family:
    model_type = data.get("model_type")
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if model_type in UNSUPPORTED:
        raise ValueError(f"{config_file}: model_type {model_type!r} is not supported: {UNSUPPORTED[model_type]}")
    known = ", ".join(sorted({"hybridlm", *FAMILIES}))
    raise ValueError(f"{config_file}: model_type {model_type!r} is not supported; known model types: {known}")


def read_hf_config(path: Path, data: dict[str, Any]) -> HybridConfig:
    """The HybridConfig of a Hugging Face checkpoint directory (config.json only)."""
    config_file = path / "config.json"
    try:
        config = family_of(data, config_file).config_from_hf(HFConfig(data, config_file))
    except (TypeError, ValueError) as error:  # HybridConfig's own validation does not know the file
        if str(config_file) in str(error):
            raise
        raise ValueError(f"{config_file}: {error}") from error
    except (ZeroDivisionError, IndexError, KeyError) as error:
        # arithmetic on a field a family reader did not check: still the file's fault, not an internal error
        problem = f"{type(error).__name__}: {error}"
        raise ValueError(f"{config_file}: a field has a value hybridlm cannot use ({problem})") from error
    config.name = path.resolve().name
    config.source = str(path)
    return config


def load_hf(path: Path, data: dict[str, Any], dtype: torch.dtype | None, device: str | torch.device) -> HybridLM:
    config = read_hf_config(path, data)
    family = family_of(data, path / "config.json")
    with CheckpointReader(path) as reader:
        return load_with_plan(config, family.plan, reader, dtype, device)


def choose_family(config: HybridConfig, family: str | None = None) -> Family:
    """The named family; else the one the config was read from; else the first whose blocks fit."""
    if family is not None:
        if family in FAMILY_NAMES:
            return FAMILY_NAMES[family]
        if family in FAMILIES:
            return FAMILIES[family]
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILY_NAMES)}")
    origin = config.extra.get("hf_model_type")
    if origin in FAMILIES:
        return FAMILIES[origin]
    chars = set(config.pattern)
    for candidate in _AUTO_ORDER:
        if chars <= set(candidate.block_types):
            return candidate
    # the recurrent mixers tie a pattern to its families (attention and the FFNs fit most)
    holders = {c: [f.name for f in _ALL if c in f.block_types] for c in sorted(chars & SEQUENCE_MIXER_CHARS - {"*"})}
    defining = [f"{c} ({layer_type_name(c)}: {', '.join(names) or 'no family'})" for c, names in holders.items()]
    raise ValueError(
        f"no Hugging Face family holds every block type of pattern {config.pattern!r}: it has "
        f"{', '.join(defining)}. Export a pattern within one family's block types (nemotron_h and "
        "granitemoehybrid: M * - E; qwen3_next and qwen3_5_moe: G * - E; jamba: m * - E; falcon_h1: P -)"
    )


def save_hf(
    model: HybridLM,
    path: str | os.PathLike,
    family: str | None = None,
    max_shard_bytes: int | None = None,
    extra_files: Mapping[str, Path] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as transformers 5.23's ``save_pretrained`` would for the family (config.json +
    safetensors, the same tensor names), atomically."""
    chosen = choose_family(model.config, family)
    hf_config = chosen.config_to_hf(model.config)
    hf_config["dtype"] = str(model.dtype).removeprefix("torch.")
    specs, tensors = plan_tensors(model, chosen.plan(model))
    files: dict[str, Any] = {"config.json": json.dumps(encode_floats(hf_config), indent=2, sort_keys=True) + "\n"}
    files.update(extra_files or {})
    return write_checkpoint_dir(path, specs, tensors, files, max_shard_bytes, overwrite)
