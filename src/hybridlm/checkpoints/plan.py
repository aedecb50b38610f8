"""Tensor plans: which checkpoint tensors fill which HybridLM parameters, both ways.

A plan is a list of rules. A rule fills one or more of our parameters (``targets``) from one or
more checkpoint tensors through one of its layouts, the ways those tensors lie on disk (experts
per-expert or stacked, a ``backbone.`` or ``model.`` prefix, fused or separate projections). The
first layout is the one ``save`` writes; ``load`` takes the first whose tensors are all present.
Each layout carries both directions, so the shapes a checkpoint must hold are found by running
``to_disk`` on meta tensors of our parameter shapes, and every error is raised from headers alone,
before a byte of weights is read.

Loading builds the model on the meta device, allocates each parameter once, and fills it rule by
rule, reading one tensor at a time: straight into the parameter (or its slice) when the layout only
renames, stacks or splits, through a temporary of one rule's size otherwise. Peak memory stays near
one copy of the weights (``benchmarks/bench_load_memory.py``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from hybridlm.checkpoints.safetensors_io import DTYPE_NAMES, CheckpointReader, TensorInfo, TensorSpec
from hybridlm.config import HybridConfig
from hybridlm.memory import empty_in_huge_pages, wants_huge_pages
from hybridlm.model import HybridLM
from hybridlm.progress import progress

Transform = Callable[[list[Tensor]], list[Tensor]]
# the stored dtypes a weight may have: what hybridlm computes in (float8 is refused, see loading.py)
STORED_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _identity(tensors: list[Tensor]) -> list[Tensor]:
    return list(tensors)


@dataclass(frozen=True)
class Layout:
    """One way a rule's tensors lie on disk: their names and the transforms both ways."""

    keys: tuple[str, ...]
    to_ours: Transform = _identity  # disk tensors (in ``keys`` order) -> our targets
    to_disk: Transform = _identity  # our targets -> disk tensors (in ``keys`` order)


@dataclass(frozen=True)
class Rule:
    targets: tuple[str, ...]  # our parameter names
    layouts: tuple[Layout, ...]  # the first is what save writes


@dataclass
class Plan:
    rules: list[Rule]
    canonical: Callable[[str], str | None] = lambda key: key  # disk name -> plan name, None = ignored


# -- rule builders ---------------------------------------------------------------------------------


def rename(ours: str, disk: str, *alternatives: str) -> Rule:
    """Our ``ours`` is the disk tensor ``disk`` (or, when reading, one of ``alternatives``)."""
    return Rule((ours,), tuple(Layout((key,)) for key in (disk, *alternatives)))


def stacked(ours: str, per_expert: Sequence[str], *fused: str) -> Rule:
    """Our [E, ...] tensor from one disk tensor per expert (written that way), or an already stacked one."""
    layout = Layout(tuple(per_expert), lambda ts: [torch.stack(ts)], lambda ts: list(ts[0].unbind(0)))
    return Rule((ours,), (layout, *(Layout((key,)) for key in fused)))


def stacked_gate_up(ours: str, gates: Sequence[str], ups: Sequence[str], *fused: str) -> Rule:
    """Our ``gate_up_proj`` [E, 2I, D] (rows gate then up) from per-expert gate [I, D] and up [I, D]."""
    count = len(gates)

    def to_ours(ts: list[Tensor]) -> list[Tensor]:
        return [torch.cat([torch.stack(ts[:count]), torch.stack(ts[count:])], dim=1)]

    def to_disk(ts: list[Tensor]) -> list[Tensor]:
        gate, up = ts[0].chunk(2, dim=1)
        return [*gate.unbind(0), *up.unbind(0)]

    layout = Layout((*gates, *ups), to_ours, to_disk)
    return Rule((ours,), (layout, *(Layout((key,)) for key in fused)))


def split_rows(ours: Sequence[str], disk: str, sizes: Sequence[int]) -> Rule:
    """Several of our tensors stacked along dim 0 in one disk tensor (Granite's fused ``[gate; up]``)."""
    sizes = list(sizes)
    layout = Layout((disk,), lambda ts: list(ts[0].split(sizes, dim=0)), lambda ts: [torch.cat(ts, dim=0)])
    return Rule(tuple(ours), (layout,))


def scaled(ours: str, disk: str, factors: float | Sequence[tuple[int, float]]) -> Rule:
    """Our ``ours`` is the disk tensor ``disk`` times ``factors``: one scalar, or one scalar per block of
    rows along dim 0 (``[(rows, factor), ...]``, covering every row).

    This is how a checkpoint's multipliers on linear maps are folded into the weights at load and
    divided back out at save. The product is taken in at least fp32 and rounded once, to the model
    dtype at load and to the parameter dtype at save. All factors 1 is a plain rename.
    """
    if isinstance(factors, (int, float)):
        blocks: list[tuple[int | None, float]] = [(None, float(factors))]
    else:
        blocks = [(int(rows), float(factor)) for rows, factor in factors]
    if all(factor == 1.0 for _, factor in blocks):
        return rename(ours, disk)

    def factor_like(tensor: Tensor, wide: torch.dtype) -> Tensor | float:
        if blocks[0][0] is None:
            return blocks[0][1]
        total = sum(rows for rows, _ in blocks)
        if total != tensor.shape[0]:
            raise ValueError(f"{disk}: scale blocks cover {total} rows, the tensor has {tensor.shape[0]}")
        column = torch.cat([torch.full((rows,), factor, dtype=torch.float64) for rows, factor in blocks])
        return column.to(device=tensor.device, dtype=wide).view(-1, *([1] * (tensor.ndim - 1)))

    def to_ours(ts: list[Tensor]) -> list[Tensor]:  # left wide: the copy into the parameter rounds once
        wide = torch.promote_types(ts[0].dtype, torch.float32)
        return [ts[0].to(wide) * factor_like(ts[0], wide)]

    def to_disk(ts: list[Tensor]) -> list[Tensor]:
        wide = torch.promote_types(ts[0].dtype, torch.float32)
        return [(ts[0].to(wide) / factor_like(ts[0], wide)).to(ts[0].dtype)]

    return Rule((ours,), (Layout((disk,), to_ours, to_disk),))


def identity_plan(model: HybridLM) -> Plan:
    """Every parameter under its own name (hybridlm's native format)."""
    return Plan([rename(name, name) for name, _ in model.named_parameters()])


# -- loading ---------------------------------------------------------------------------------------


def _check_plan(params: dict[str, nn.Parameter], plan: Plan) -> None:
    """Each parameter in exactly one rule: a family module that breaks this has a bug."""
    seen: dict[str, int] = {}
    for rule in plan.rules:
        for target in rule.targets:
            seen[target] = seen.get(target, 0) + 1
    twice = sorted(t for t, n in seen.items() if n > 1)
    unknown = sorted(set(seen) - set(params))
    uncovered = sorted(set(params) - set(seen))
    if twice or unknown or uncovered:
        raise RuntimeError(
            f"bad tensor plan: filled twice {twice[:3]}, not parameters {unknown[:3]}, not filled {uncovered[:3]}"
        )


def _expert_count_hint(names: Sequence[str], config: HybridConfig, is_missing: bool) -> str:
    """When the offending tensors are experts, say that the config's expert count is what disagrees."""
    indices = sorted({int(m.group(1)) for name in names if (m := re.search(r"\.experts\.(\d+)\.", name))})
    if not indices or config.moe is None:
        return ""
    found = f"lacks experts {indices[0]}..{indices[-1]}" if is_missing else f"holds experts up to {indices[-1]}"
    return (
        f"; the config says {config.moe.num_experts} experts per MoE layer but the checkpoint {found}: "
        "the config contradicts the tensors"
    )


def _choose_layouts(plan: Plan, present: dict[str, TensorInfo], reader: CheckpointReader, config: HybridConfig):
    chosen: list[tuple[Rule, Layout]] = []
    missing: list[str] = []
    for rule in plan.rules:
        layout = next((lay for lay in rule.layouts if all(k in present for k in lay.keys)), None)
        if layout is None:
            # report against the layout most nearly present (else the one save writes)
            best = max(rule.layouts, key=lambda lay: sum(k in present for k in lay.keys))
            missing.extend(k for k in best.keys if k not in present)
            continue
        chosen.append((rule, layout))
    if missing:
        raise ValueError(
            f"{reader.source}: missing tensor {missing[0]}"
            + (f" and {len(missing) - 1} more ({', '.join(missing[1:4])}, ...)" if len(missing) > 1 else "")
            + _expert_count_hint(missing, config, is_missing=True)
        )
    used = {key for _, layout in chosen for key in layout.keys}
    unexpected = [key for key in present if key not in used]
    if unexpected:
        info = present[unexpected[0]]
        raise ValueError(
            f"{info.file}: unexpected tensor {info.name}"
            + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else "")
            + " (the config does not call for it)"
            + _expert_count_hint([present[k].name for k in unexpected], config, is_missing=False)
        )
    return chosen


def _check_shapes_and_dtypes(
    chosen, params: dict[str, nn.Parameter], present: dict[str, TensorInfo], config: HybridConfig
) -> None:
    for rule, layout in chosen:
        meta = [torch.empty(params[t].shape, device="meta") for t in rule.targets]
        expected = [tuple(t.shape) for t in layout.to_disk(meta)]
        for key, shape in zip(layout.keys, expected, strict=True):
            info = present[key]
            if info.dtype not in STORED_WEIGHT_DTYPES and all(params[t].is_floating_point() for t in rule.targets):
                # a cast would turn integer or boolean data into "weights" without a word; float8 would
                # load and then fail inside torch at the first matmul
                raise ValueError(
                    f"{info.file}: tensor {info.name} has dtype {DTYPE_NAMES[info.dtype]}, expected a floating-point "
                    f"type hybridlm computes in (F32, BF16, F16, F64; not float8) for the weight "
                    f"{', '.join(rule.targets)}"
                )
            if info.shape != shape:
                hint = ""
                is_expert_axis = config.moe is not None and shape[:1] == (config.moe.num_experts,)
                if is_expert_axis and len(info.shape) == len(shape) and info.shape[1:] == shape[1:]:
                    hint = (
                        f"; the config says {shape[0]} experts, the tensor holds {info.shape[0]}: the config "
                        "contradicts the tensors"
                    )
                raise ValueError(
                    f"{info.file}: tensor {info.name} has shape {info.shape}, expected {shape} "
                    f"(for {', '.join(rule.targets)}){hint}"
                )


def _present_tensors(reader: CheckpointReader, plan: Plan) -> dict[str, TensorInfo]:
    present: dict[str, TensorInfo] = {}
    for name, info in reader.tensors.items():
        key = plan.canonical(name)
        if key is None:
            continue
        if key in present:
            raise ValueError(
                f"{info.file}: tensors {present[key].name} and {name} are the same parameter under two spellings"
            )
        present[key] = info
    return present


def _model_dtype(chosen, present: dict[str, TensorInfo], dtype: torch.dtype | None) -> torch.dtype:
    """``dtype`` if given, else the stored dtype of the embeddings (one dtype for the whole model)."""
    if dtype is not None:
        return dtype
    for rule, layout in chosen:
        if "embeddings.weight" in rule.targets:
            return present[layout.keys[0]].dtype
    return torch.float32


def fill_targets(
    reader: CheckpointReader, present: dict[str, TensorInfo], layout: Layout, targets: list[Tensor]
) -> None:
    """Fill one rule's parameters (``targets``) from the disk tensors its ``layout`` names."""
    # to_disk of the real parameters gives, for renames, stacks and chunks, views into them: each disk
    # tensor is then read straight into its place, with no temporary of the layer's size
    views = layout.to_disk(targets)
    if all(_is_view_into(view, targets) for view in views):
        for key, view in zip(layout.keys, views, strict=True):
            data = reader.read(present[key].name, out=view)
            if data is not view:
                view.copy_(data)
    else:
        sources = [reader.read(present[key].name) for key in layout.keys]
        for target, value in zip(targets, layout.to_ours(sources), strict=True):
            target.copy_(value)


def fill_target_rows(
    reader: CheckpointReader,
    present: dict[str, TensorInfo],
    layout: Layout,
    targets: list[Tensor],
    full_shapes: list[tuple[int, ...]],
    rows: range,
) -> None:
    """Fill ``targets``, rows ``rows`` (dim 0) of a rule's parameters of ``full_shapes``, reading only
    the disk tensors, or the rows of them, that hold those rows.

    Which disk tensor fills which rows is found by running the layout's ``to_disk`` on full-size meta
    tensors: a view's storage offset says which row (e.g. expert) it covers. One disk tensor per row
    (Hugging Face ``experts.{e}.up_proj.weight``) is read only for the kept rows; a stacked disk tensor
    (hybridlm's format, transformers 5 ``experts.gate_up_proj``) is read as one contiguous byte range. A
    layout whose ``to_disk`` is not a view is read whole and sliced.
    """
    full = [torch.empty(shape, device="meta") for shape in full_shapes]
    views = layout.to_disk(full)
    for key, view in zip(layout.keys, views, strict=True):
        owner = next((i for i, t in enumerate(full) if view is t or view._base is t), None)
        if owner is None:  # not a view of the full tensors: read the rule whole, keep the rows
            sources = [reader.read(present[k].name) for k in layout.keys]
            for target, value in zip(targets, layout.to_ours(sources), strict=True):
                target.copy_(value[rows.start : rows.stop])
            return
        _fill_rows_from_view(reader, present[key], view, full[owner].stride(0), targets[owner], rows)


def _fill_rows_from_view(
    reader: CheckpointReader, info: TensorInfo, view: Tensor, row_numel: int, local: Tensor, rows: range
) -> None:
    """``view``: where disk tensor ``info`` lies in the full tensor; ``local``: its rows ``rows``."""
    offset = view.storage_offset()
    spans_rows = view.dim() == local.dim() and view.shape[0] > 1 and view.stride(0) == row_numel
    if spans_rows and offset < row_numel:  # a stacked disk tensor: its rows are ours
        destination = local.as_strided((len(rows), *view.shape[1:]), view.stride(), offset)
        destination.copy_(reader.read_rows(info.name, rows))
        return
    row = offset // row_numel
    last = offset + sum((size - 1) * stride for size, stride in zip(view.shape, view.stride(), strict=True))
    if last >= (row + 1) * row_numel:
        raise RuntimeError(f"{info.name}: its place in the full tensor spans its rows unevenly; cannot slice it")
    if row not in rows:
        return  # a row not kept (another rank's expert): not read
    destination = local.as_strided(view.shape, view.stride(), offset - rows.start * row_numel)
    data = reader.read(info.name, out=destination)
    if data is not destination:
        destination.copy_(data)


def _is_view_into(tensor: Tensor, targets: list[Tensor]) -> bool:
    pointer = tensor.untyped_storage().data_ptr()
    return tensor.is_contiguous() and any(t.untyped_storage().data_ptr() == pointer for t in targets)


def _allocate(model: nn.Module, dtype: torch.dtype, device: str | torch.device) -> None:
    """Give every meta parameter real (uninitialised) storage, those of 2 MiB or more on the CPU in huge
    pages (``memory.empty_in_huge_pages``); tied parameters stay tied."""
    slots: dict[int, list[tuple[nn.Module, str]]] = {}
    wanted: dict[int, tuple[nn.Parameter, torch.dtype]] = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is None:
                continue
            # the selection-only router bias stays fp32, as transformers keeps it (_keep_in_fp32_modules)
            want = torch.float32 if name == "e_score_correction_bias" else dtype
            wanted.setdefault(id(param), (param, want if param.is_floating_point() else param.dtype))
            slots.setdefault(id(param), []).append((module, name))
    on_cpu = torch.device(device).type == "cpu"
    large = [key for key, (p, d) in wanted.items() if on_cpu and wants_huge_pages(p.numel(), d)]
    in_huge_pages = empty_in_huge_pages([wanted[k][0].shape for k in large], [wanted[k][1] for k in large])
    storage = dict(zip(large, in_huge_pages, strict=True)) if in_huge_pages else {}
    for key, (param, want) in wanted.items():
        data = storage[key] if key in storage else torch.empty(param.shape, dtype=want, device=device)
        made = nn.Parameter(data, requires_grad=param.requires_grad)
        for module, name in slots[key]:
            module._parameters[name] = made


def _materialise_buffers(model: HybridLM, device: str | torch.device) -> None:
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


@torch.no_grad()
def load_with_plan(
    config: HybridConfig,
    plan_for: Callable[[HybridLM], Plan],
    reader: CheckpointReader,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    keep_rows: Callable[[HybridLM], dict[str, range]] | None = None,
) -> HybridLM:
    """A HybridLM for ``config`` filled from ``reader`` by the plan; every check runs before any read.

    ``keep_rows``, when given, is called with the meta model once the plan is made and checked against
    the full model's shapes. It may replace modules whose parameters keep only some rows (dim 0) of the
    full ones (expert parallelism keeps a rank's experts of each stacked expert tensor) and returns
    {parameter name: the full tensor's rows it keeps}; only those rows are read from disk.
    """
    with torch.device("meta"):
        model = HybridLM(config)
    plan = plan_for(model)
    full_params = dict(model.named_parameters())
    _check_plan(full_params, plan)
    present = _present_tensors(reader, plan)
    chosen = _choose_layouts(plan, present, reader, config)
    _check_shapes_and_dtypes(chosen, full_params, present, config)
    kept_rows = keep_rows(model) if keep_rows is not None else {}

    _allocate(model, _model_dtype(chosen, present, dtype), device)
    params = dict(model.named_parameters())
    filled: set[str] = set()
    with progress("loading weights", total=len(chosen)) as advance:
        for rule, layout in chosen:
            targets = [params[t].data for t in rule.targets]
            rows = kept_rows.get(rule.targets[0])
            if rows is None:
                fill_targets(reader, present, layout, targets)
            else:
                full_shapes = [tuple(full_params[t].shape) for t in rule.targets]
                fill_target_rows(reader, present, layout, targets, full_shapes, rows)
            filled.update(rule.targets)
            advance(1)
    if filled != set(params):
        raise RuntimeError(f"parameters left unfilled: {sorted(set(params) - filled)[:5]}")

    _materialise_buffers(model, device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embeddings.weight
    return model.eval()


# -- saving ----------------------------------------------------------------------------------------


def plan_tensors(model: HybridLM, plan: Plan) -> tuple[list[TensorSpec], Iterator[tuple[str, Tensor]]]:
    """What saving ``model`` by ``plan`` writes: the specs (from shapes alone) and a lazy stream of the
    tensors in the same order, one rule's worth computed at a time."""
    params = dict(model.named_parameters(remove_duplicate=False))
    specs = []
    for rule in plan.rules:
        layout = rule.layouts[0]
        targets = [params[t] for t in rule.targets]
        meta = [torch.empty(p.shape, dtype=p.dtype, device="meta") for p in targets]
        for key, out in zip(layout.keys, layout.to_disk(meta), strict=True):
            specs.append(TensorSpec(key, out.dtype, tuple(out.shape)))

    def stream() -> Iterator[tuple[str, Tensor]]:
        with torch.no_grad():
            for rule in plan.rules:
                layout = rule.layouts[0]
                outs = layout.to_disk([params[t].detach() for t in rule.targets])
                yield from zip(layout.keys, outs, strict=True)

    return specs, stream()
