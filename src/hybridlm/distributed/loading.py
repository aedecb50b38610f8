"""Load a checkpoint on N ranks, each reading only its own experts from the safetensors files.

``load_sharded(path)`` loads through the checkpoint's tensor plan (``checkpoints/plan.py``, the same
plan ``from_pretrained`` uses, so every format it reads works here and every error is the one it
raises, from the headers, before any weight is read), with ``shard_experts`` applied to the meta
model once the plan is checked: each expert parameter then keeps this rank's rows, and
``plan.fill_target_rows`` reads only those (the other ranks' per-expert tensors are skipped; a
stacked [E, ...] tensor is read as one contiguous byte range). Reads are plain ``readinto`` calls at
file offsets, as ``CheckpointReader`` does (no memory map, so a rank's resident memory holds its own
weights only).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from hybridlm.checkpoints import read_config
from hybridlm.checkpoints.native import MODEL_TYPE, read_config_file
from hybridlm.checkpoints.plan import Plan, identity_plan, load_with_plan
from hybridlm.checkpoints.safetensors_io import CheckpointReader
from hybridlm.distributed.exchange import ProcessGroup
from hybridlm.distributed.experts import ShardedExperts, shard_experts
from hybridlm.loading import parse_dtype, resolve_device
from hybridlm.model import HybridLM


@torch.no_grad()
def load_sharded(
    path: str | os.PathLike,
    group: ProcessGroup | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
) -> HybridLM:
    """The checkpoint directory ``path`` (hybridlm or Hugging Face) with this rank's experts only: the
    model ``shard_experts(from_pretrained(path))`` gives, without reading the other ranks' experts.
    Call on every rank of ``group``; ``dtype`` and ``device`` as for ``from_pretrained``."""
    path = Path(path)

    def keep_this_ranks_experts(model: HybridLM) -> dict[str, range]:
        shard_experts(model, group)
        return _expert_rows(model)

    with CheckpointReader(path) as reader:
        return load_with_plan(
            read_config(path), _plan_for(path), reader, parse_dtype(dtype), resolve_device(device),
            keep_rows=keep_this_ranks_experts,
        )  # fmt: skip


def _plan_for(path: Path) -> Callable[[HybridLM], Plan]:
    data = read_config_file(path / "config.json")
    if isinstance(data, dict) and data.get("model_type") == MODEL_TYPE:
        return identity_plan
    from hybridlm.checkpoints.hf import family_of

    return family_of(data, path / "config.json").plan


def _expert_rows(model: HybridLM) -> dict[str, range]:
    """Parameter name -> the expert rows this rank holds, for every sharded expert parameter."""
    rows = {}
    for module_name, module in model.named_modules():
        if isinstance(module, ShardedExperts):
            local = range(module.first_expert, module.first_expert + module.num_local_experts)
            for name, _ in module.named_parameters():
                rows[f"{module_name}.{name}"] = local
    return rows
