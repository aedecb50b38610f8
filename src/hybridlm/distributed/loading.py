"""Load a checkpoint on N ranks, each reading only its own experts from the safetensors files.

``load_sharded(path)`` builds the model on the meta device, shards its experts (``shard_experts``),
gives every parameter storage of its local size, and fills it through the checkpoint's tensor plan
(``checkpoints/plan.py``, the same plan ``from_pretrained`` uses, so every format it reads works here
and every error is the one it raises, from the headers, before any weight is read). An expert tensor
is read only where it holds this rank's experts:

- one disk tensor per expert (Hugging Face ``experts.{e}.up_proj.weight``): only experts
  [r * L, (r + 1) * L) are read;
- one stacked tensor [E, ...] (hybridlm's format, transformers 5 ``experts.gate_up_proj``): only its
  rows [r * L, (r + 1) * L), one contiguous byte range, are read.

Which disk tensor fills which rows is found by running the plan's ``to_disk`` on a full-size meta
tensor: a view's storage offset says which expert (and which part of it) it covers. A layout whose
``to_disk`` is not a view (none of the families' expert layouts today) is read whole and sliced.
Reads are plain ``readinto`` calls at file offsets, as ``CheckpointReader`` does (no memory map, so a
rank's resident memory holds its own weights only).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import Tensor

from hybridlm.checkpoints import read_config
from hybridlm.checkpoints.native import MODEL_TYPE, read_config_file
from hybridlm.checkpoints.plan import (  # the steps of plan.load_with_plan, run here with sliced experts
    Layout,
    _allocate,
    _check_plan,
    _check_shapes_and_dtypes,
    _choose_layouts,
    _materialise_buffers,
    _model_dtype,
    _present_tensors,
    fill_targets,
    identity_plan,
)
from hybridlm.checkpoints.safetensors_io import CheckpointReader, TensorInfo
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
    dtype, device = parse_dtype(dtype), resolve_device(device)
    config = read_config(path)
    with torch.device("meta"):
        model = HybridLM(config)
    plan = _plan_for(path)(model)
    full_params = dict(model.named_parameters())  # the checks compare the files with the full shapes
    shard_experts(model, group)
    with CheckpointReader(path) as reader:
        _check_plan(full_params, plan)
        present = _present_tensors(reader, plan)
        chosen = _choose_layouts(plan, present, reader, config)
        _check_shapes_and_dtypes(chosen, full_params, present, config)
        _allocate(model, _model_dtype(chosen, present, dtype), device)
        params = dict(model.named_parameters())
        expert_rows = _expert_rows(model)
        for rule, layout in chosen:
            targets = [params[t].data for t in rule.targets]
            if rule.targets[0] in expert_rows:
                shapes = [tuple(full_params[t].shape) for t in rule.targets]
                _fill_expert_rows(reader, present, layout, targets, shapes, expert_rows[rule.targets[0]])
            else:
                fill_targets(reader, present, layout, targets)
    _materialise_buffers(model, device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embeddings.weight
    return model.eval()


def _plan_for(path: Path):
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


def _fill_expert_rows(
    reader: CheckpointReader,
    present: dict[str, TensorInfo],
    layout: Layout,
    targets: list[Tensor],
    full_shapes: list[tuple[int, ...]],
    rows: range,
) -> None:
    """Fill the local rows ``rows`` of a rule's stacked expert targets, reading only what they need."""
    full = [torch.empty(shape, device="meta") for shape in full_shapes]
    views = layout.to_disk(full)
    for key, view in zip(layout.keys, views, strict=True):
        owner = next((i for i, t in enumerate(full) if view is t or view._base is t), None)
        if owner is None:  # not a view of our tensor: read the rule whole, keep our rows
            sources = [reader.read(present[k].name) for k in layout.keys]
            for target, value in zip(targets, layout.to_ours(sources), strict=True):
                target.copy_(value[rows.start : rows.stop])
            return
        _fill_from_view(reader, present[key], view, full[owner].stride(0), targets[owner], rows)


def _fill_from_view(
    reader: CheckpointReader, info: TensorInfo, view: Tensor, expert_numel: int, local: Tensor, rows: range
) -> None:
    """``view``: where disk tensor ``info`` lies in the full [E, ...] tensor; ``local``: our rows of it."""
    offset = view.storage_offset()
    spans_experts = view.dim() == local.dim() and view.shape[0] > 1 and view.stride(0) == expert_numel
    if spans_experts and offset < expert_numel:  # a stacked disk tensor: its rows are experts
        destination = local.as_strided((len(rows), *view.shape[1:]), view.stride(), offset)
        destination.copy_(_read_rows(info, rows))
        return
    expert = offset // expert_numel
    last = offset + sum((size - 1) * stride for size, stride in zip(view.shape, view.stride(), strict=True))
    if last >= (expert + 1) * expert_numel:
        raise RuntimeError(f"{info.name}: its place in the experts tensor spans experts unevenly; cannot slice it")
    if expert not in rows:
        return  # another rank's expert: not read
    destination = local.as_strided(view.shape, view.stride(), offset - rows.start * expert_numel)
    data = reader.read(info.name, out=destination)
    if data is not destination:
        destination.copy_(data)


def _read_rows(info: TensorInfo, rows: range) -> Tensor:
    """Rows ``rows`` of the stored tensor ``info`` (dim 0), one contiguous byte range of its file."""
    row_numel = math.prod(info.shape[1:])
    out = torch.empty((len(rows), *info.shape[1:]), dtype=info.dtype)
    row_bytes = row_numel * out.element_size()
    buffer = memoryview(out.reshape(-1).view(torch.uint8).numpy()).cast("B")
    with open(info.file, "rb", buffering=0) as f:
        f.seek(info.offset + rows.start * row_bytes)
        filled = 0
        while filled < len(buffer):
            count = f.readinto(buffer[filled:])
            if not count:
                raise ValueError(f"{info.file}: truncated while reading rows {rows.start}..{rows.stop} of {info.name}")
            filled += count
    return out
