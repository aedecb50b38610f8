"""Expert parallelism: each rank of a process group holds E / W of every MoE block's routed experts.

Legend: N tokens on this rank, K experts per token, D hidden size, E experts of the block, W ranks,
L = E / W experts per rank, M = N * K (token, slot) pairs, R rows received from all ranks.

``shard_experts(model)`` attaches from outside (the model stays pure, DESIGN.md): it replaces each MoE
block's ``experts`` with a ``ShardedExperts`` holding the contiguous range [r * L, (r + 1) * L) on rank r.
Router, shared experts, attention, Mamba and every other weight stay replicated. The MoE block asks
``experts.holds_all_experts`` and, seeing False, skips its one-call decode kernel and calls
``experts(x_ND, topk_ids_NK, topk_weights_NK)``, which runs:

1. dispatch: sort the M pairs by expert id (stable), which also sorts them by the rank holding the
   expert; exchange the per-expert counts (all-to-all of [W, L]); send each pair's token row to its
   rank (all-to-all, uneven splits). The counts tell a receiver which of its experts each row is
   for, so expert ids need not travel;
2. experts: run the R received rows through the local experts (``Experts.forward`` with K = 1 and
   weight 1: the grouped matmuls, or the few-token kernel when decoding);
3. combine: send the results back (all-to-all, the splits swapped) and add them, weighted, into
   the pairs' tokens in expert order: the sum ``moe_experts_grouped`` forms on one process.

Every rank calls the three collectives for every MoE block call, even with no pairs to send.

Two options change the dispatch (both set from a rebalancing plan, ``hybridlm.distributed.rebalance``):

- a placement (``shard_experts(model, placement={layer: physical_to_logical})``): rank r holds the S
  physical slots [r * S, (r + 1) * S), slot p a copy of logical expert ``physical_to_logical[p]``; a
  hot expert may have copies on several ranks (EPLB's redundant experts). The j-th pair this rank
  routes to an expert with C copies goes to copy (j + rank) % C, so the copies share its tokens. The
  combine adds the results in logical expert order, the order one process adds them in, so only the
  experts' matmuls (which see other row counts) can differ from the unreplicated run: fp32 round-off;
- ``capacity_factors`` [E]: this rank sends expert e at most ceil(factor_e * M / E) of its M pairs
  (GShard's per-group capacity, a group being one rank's tokens), the first ones in token order; the
  rest are dropped (they add nothing to their token's output) and counted in ``last_dropped_per_expert``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from hybridlm.distributed.exchange import ProcessGroup, exchange_counts, exchange_rows
from hybridlm.layers.moe import Experts
from hybridlm.ops.moe import tokens_per_expert
from hybridlm.trace.schema import EXPERT_PARALLEL_LAYER_TYPES

# on_span(layer_index, layer_type, start_ns, end_ns, entered_ns, tokens_sent, tokens_received)
SpanRecorder = Callable[[int, str, int, int, "int | None", list[int], list[int]], None]
SPAN_LAYER_TYPES = EXPERT_PARALLEL_LAYER_TYPES  # the trace schema names them


def clock_ns() -> int:
    """CLOCK_MONOTONIC in ns: one system-wide clock on Linux, so ranks on one machine share it (a
    per-process origin, as perf_counter documents, would not let ranks compare entry times)."""
    return time.monotonic_ns()


def expert_range(num_experts: int, world_size: int, rank: int) -> range:
    """The experts rank ``rank`` of ``world_size`` holds: [rank * L, (rank + 1) * L), L = E / W."""
    check_expert_split(num_experts, world_size)
    per_rank = num_experts // world_size
    return range(rank * per_rank, (rank + 1) * per_rank)


def check_expert_split(num_experts: int, world_size: int) -> None:
    if world_size > num_experts:
        raise ValueError(
            f"{world_size} ranks for {num_experts} experts per MoE block: a rank would hold no experts; "
            f"use at most {num_experts} ranks"
        )
    if num_experts % world_size:
        raise ValueError(
            f"{num_experts} experts per MoE block do not divide over {world_size} ranks: every rank must hold "
            f"the same number; use a world size that divides {num_experts}"
        )


def check_placement(physical_to_logical: Sequence[int], num_experts: int, world_size: int, layer_index: int) -> int:
    """The slots per rank S of a placement (logical expert of each of the W * S physical slots); a
    ValueError naming the layer for a placement that cannot be used."""
    where = f"the placement of layer {layer_index}"
    num_slots = len(physical_to_logical)
    if num_slots == 0 or num_slots % world_size:
        raise ValueError(
            f"{where} lists {num_slots} physical slots: it needs the same number (at least 1) on each of "
            f"the {world_size} ranks"
        )
    bad = [e for e in physical_to_logical if not (isinstance(e, int) and 0 <= e < num_experts)]
    if bad:
        raise ValueError(f"{where} names expert {bad[0]!r}: experts are 0..{num_experts - 1}")
    missing = sorted(set(range(num_experts)) - set(physical_to_logical))
    if missing:
        raise ValueError(f"{where} holds no copy of expert {missing[0]}: every expert needs at least one slot")
    return num_slots // world_size


class ShardedExperts(Experts):
    """The routed experts of one MoE block held by one rank of ``group``: by default the contiguous
    range [first, first + L), or the slots ``physical_to_logical`` gives this rank (module docstring).

    Same parameter names as ``Experts`` (``gate_up_proj`` or ``up_proj``, ``down_proj``), one row per
    local slot (``local_experts[i]`` is the logical expert of row i). ``capacity_factors`` (None, or
    [E] floats, ``inf`` for no limit) caps the pairs sent to each expert per call; after each forward
    ``last_dropped_per_expert`` [E] counts the pairs dropped and ``last_dropped_pairs_NK`` marks them
    (None without capacity factors).
    ``on_span``, when set, is called after each forward with the four spans of the call (see
    ``SPAN_LAYER_TYPES``; times from ``clock_ns``): ``entered_ns`` is the time just before the first
    collective of the span (None for the router and the experts, which have none); ``tokens_sent[b]``
    and ``tokens_received[a]`` are the pairs this call's dispatch sends to rank b and receives from
    rank a (the combine moves the same rows back).
    """

    holds_all_experts = False

    def __init__(
        self,
        full: Experts,
        layer_index: int,
        group: ProcessGroup | None = None,
        physical_to_logical: Sequence[int] | None = None,
    ) -> None:
        nn.Module.__init__(self)  # Experts.__init__ would allocate all E experts
        self.activation = full.activation
        self.layer_index = layer_index
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.num_experts = E = full.input_proj.shape[0]
        if physical_to_logical is None:
            check_expert_split(E, self.world_size)
            physical_to_logical = range(E)
        physical_to_logical = list(physical_to_logical)
        S = check_placement(physical_to_logical, E, self.world_size, layer_index)
        self.num_local_experts = S
        self.local_experts = physical_to_logical[self.rank * S : (self.rank + 1) * S]
        self.first_expert = self.local_experts[0]
        self.is_contiguous = physical_to_logical == list(range(E))
        # copies_of[e]: the physical slots holding expert e, in slot order
        self.copies_of = [[p for p, e in enumerate(physical_to_logical) if e == expert] for expert in range(E)]
        self.has_replicas = len(physical_to_logical) > E
        self._slot_tables: dict[torch.device, tuple[Tensor, Tensor]] = {}
        for name, param in full.named_parameters(recurse=False):
            if self.is_contiguous:
                local_weight = param.detach()[self.first_expert : self.first_expert + S]
            else:
                local_weight = param.detach()[torch.tensor(self.local_experts, device=param.device)]
            local_param = nn.Parameter(local_weight.clone())
            local_param.requires_grad_(param.requires_grad)
            setattr(self, name, local_param)
        self.capacity_factors: Tensor | None = None
        self.last_dropped_per_expert: Tensor | None = None
        self.last_dropped_pairs_NK: Tensor | None = None
        self.on_span: SpanRecorder | None = None
        self._block_start_ns: int | None = None

    def extra_repr(self) -> str:
        where = f"rank {self.rank} of {self.world_size}"
        if self.is_contiguous:
            last = self.first_expert + self.num_local_experts - 1
            return f"experts {self.first_expert}..{last} of {self.num_experts}, {where}"
        return f"experts {self.local_experts} of {self.num_experts}, {where}"

    def mark_block_start(self, *_: object) -> None:
        """A forward pre-hook of the MoE block: the router span starts here."""
        self._block_start_ns = clock_ns()

    def forward(self, x_ND: Tensor, topk_ids_NK: Tensor, topk_weights_NK: Tensor) -> Tensor:
        """x_ND [N, D], topk_ids_NK [N, K] (global expert ids), topk_weights_NK [N, K] -> [N, D]: the
        weighted sum of each token's K experts, wherever they are held (less the dropped pairs)."""
        if self.has_replicas and self.training and torch.is_grad_enabled():
            raise ValueError(
                f"layer {self.layer_index}: replicated experts are for inference (the copies' gradients are "
                "not summed); shard without a placement to train"
            )
        W, S = self.world_size, self.num_local_experts
        dispatch_start = clock_ns()
        K = topk_ids_NK.shape[1]
        expert_M = topk_ids_NK.flatten()
        slot_M = self._physical_slots(expert_M, K)  # W * S for a dropped pair: sorts last, not sent
        sent_M = torch.argsort(slot_M, stable=True)  # by slot, hence by rank
        counts_P = tokens_per_expert(slot_M[None], W * S + 1)
        sent_M = sent_M[: expert_M.numel() - int(counts_P[-1])]
        token_M = sent_M // K
        counts_WS = counts_P[:-1].view(W, S)
        dispatch_entered = clock_ns()
        received_WS = exchange_counts(counts_WS, self.group)
        send_splits, recv_splits = counts_WS.sum(dim=1).tolist(), received_WS.sum(dim=1).tolist()
        x_RD = exchange_rows(x_ND[token_M], send_splits, recv_splits, self.group)

        experts_start = clock_ns()
        y_RD = self._run_local_experts(x_RD, received_WS)

        combine_start = clock_ns()
        weights_M = topk_weights_NK.flatten().to(x_ND.dtype)
        combine_entered = clock_ns()
        y_MD = exchange_rows(y_RD, recv_splits, send_splits, self.group)
        out_ND = self._weighted_sum(x_ND, y_MD, sent_M, expert_M, weights_M, K)
        end = clock_ns()

        if self.on_span is not None:
            times = (dispatch_start, dispatch_entered, experts_start, combine_start, combine_entered, end)
            self._record_spans(times, send_splits, recv_splits)
        self._block_start_ns = None
        return out_ND

    def _physical_slots(self, expert_M: Tensor, K: int) -> Tensor:
        """The physical slot each (token, expert) pair goes to, W * S for a pair beyond its expert's
        capacity; sets ``last_dropped_per_expert`` and ``last_dropped_pairs_NK``."""
        E, num_slots = self.num_experts, self.world_size * self.num_local_experts
        needs_occurrence = self.capacity_factors is not None or self.has_replicas
        occurrence_M = occurrence_index(expert_M, E) if needs_occurrence else None
        if self.is_contiguous:
            slot_M = expert_M
        else:
            slots_EC, num_copies_E = self._slot_table(expert_M.device)
            copy_M = (
                (occurrence_M + self.rank) % num_copies_E[expert_M] if self.has_replicas else torch.zeros_like(expert_M)
            )
            slot_M = slots_EC[expert_M, copy_M]
        self.last_dropped_per_expert = torch.zeros(E, dtype=torch.int64, device=expert_M.device)
        self.last_dropped_pairs_NK = None
        if self.capacity_factors is None:
            return slot_M
        factors_E = self.capacity_factors.to(expert_M.device)
        capacity_E = torch.ceil(factors_E * expert_M.numel() / E)  # inf: no limit
        dropped_M = occurrence_M >= capacity_E[expert_M]
        self.last_dropped_per_expert = tokens_per_expert(expert_M[dropped_M][None], E)
        self.last_dropped_pairs_NK = dropped_M.view(-1, K)
        return slot_M.masked_fill(dropped_M, num_slots)

    def _slot_table(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """[E, C] physical slots of each expert's copies (padded with its first) and [E] copies each."""
        if device not in self._slot_tables:
            width = max(len(slots) for slots in self.copies_of)
            padded = [slots + slots[:1] * (width - len(slots)) for slots in self.copies_of]
            counts = [len(slots) for slots in self.copies_of]
            self._slot_tables[device] = (torch.tensor(padded, device=device), torch.tensor(counts, device=device))
        return self._slot_tables[device]

    def _weighted_sum(
        self, x_ND: Tensor, y_SD: Tensor, sent_M: Tensor, expert_M: Tensor, weights_M: Tensor, K: int
    ) -> Tensor:
        """out[n] = sum of weight * result over token n's sent pairs, added in expert order (the order
        ``moe_experts_grouped`` adds them on one process); y_SD holds the results in ``sent_M`` order."""
        out_ND = torch.zeros_like(x_ND)
        if self.is_contiguous:  # sent in expert order already
            return out_ND.index_add_(0, sent_M // K, y_SD * weights_M[sent_M, None])
        position_M = torch.full_like(expert_M, -1)  # where each pair's result lies in y_SD, -1 if not sent
        position_M[sent_M] = torch.arange(sent_M.numel(), device=sent_M.device)
        by_expert_M = torch.argsort(expert_M, stable=True)
        by_expert_M = by_expert_M[position_M[by_expert_M] >= 0]
        return out_ND.index_add_(0, by_expert_M // K, y_SD[position_M[by_expert_M]] * weights_M[by_expert_M, None])

    def _record_spans(self, times: tuple[int, ...], send_splits: list[int], recv_splits: list[int]) -> None:
        dispatch_start, dispatch_entered, experts_start, combine_start, combine_entered, end = times
        block_start = self._block_start_ns if self._block_start_ns is not None else dispatch_start
        spans = (
            ("moe_router", block_start, dispatch_start, None),
            ("moe_dispatch", dispatch_start, experts_start, dispatch_entered),
            ("moe_experts", experts_start, combine_start, None),
            ("moe_combine", combine_start, end, combine_entered),
        )
        for layer_type, start, stop, entered in spans:
            self.on_span(self.layer_index, layer_type, start, stop, entered, send_splits, recv_splits)

    def _run_local_experts(self, x_RD: Tensor, received_WS: Tensor) -> Tensor:
        """The R received rows lie by sending rank, then by local slot (each sender sorted its pairs)."""
        if x_RD.shape[0] == 0:
            # Nothing to compute; returning the (empty) input keeps the combine's input in the autograd
            # graph of the dispatch, so this rank still joins both all-to-alls of the backward.
            return x_RD
        local_ids = torch.arange(self.num_local_experts, device=x_RD.device).repeat(self.world_size)
        local_ids_R1 = local_ids.repeat_interleave(received_WS.flatten())[:, None]
        return super().forward(x_RD, local_ids_R1, x_RD.new_ones(x_RD.shape[0], 1))


def shard_experts(
    model: nn.Module, group: ProcessGroup | None = None, placement: Mapping[int, Sequence[int]] | None = None
) -> nn.Module:
    """Replace every MoE block's experts of ``model`` (a HybridLM) by this rank's ``ShardedExperts``.

    Call it on every rank of ``group`` (default: the whole world) with the same model weights; each
    keeps its own slice, copied from the full weights. ``placement`` maps a MoE block's index to its
    ``physical_to_logical`` list (the module docstring; ``hybridlm.distributed.placement`` computes one
    from a trace); blocks it leaves out hold contiguous ranges. Returns ``model``.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "torch.distributed is not initialised: call torch.distributed.init_process_group first "
            "(torchrun sets the environment it needs)"
        )
    moe_blocks = [block for block in model.layers if block.routes_experts]
    if not moe_blocks:
        raise ValueError(
            f"the model has no MoE blocks (pattern {model.config.pattern!r}): there are no experts to shard"
        )
    placement = dict(placement or {})
    unknown = sorted(set(placement) - {block.index for block in moe_blocks})
    if unknown:
        raise ValueError(
            f"the placement names layer {unknown[0]}, which is not a MoE block; the MoE blocks are layers "
            f"{[block.index for block in moe_blocks]}"
        )
    if len(placement) < len(moe_blocks):
        check_expert_split(model.config.moe.num_experts, dist.get_world_size(group))
    if sharded_experts(model):
        raise ValueError("the model's experts are already sharded")
    for block in moe_blocks:
        moe = block.mixer
        sharded = ShardedExperts(moe.experts, block.index, group, placement.get(block.index))
        sharded.train(moe.training)  # a new module starts in training mode; follow the model's
        moe.experts = sharded
        moe.register_forward_pre_hook(sharded.mark_block_start)
    return model


def sharded_experts(model: nn.Module) -> list[ShardedExperts]:
    """The ShardedExperts of ``model``'s MoE blocks, in block order (empty when not sharded)."""
    return [m for m in model.modules() if isinstance(m, ShardedExperts)]


def occurrence_index(expert_M: Tensor, num_experts: int) -> Tensor:
    """[M]: how many pairs before pair m (in pair order) went to the same expert: 0 for its first."""
    by_expert_M = torch.argsort(expert_M, stable=True)
    counts_E = tokens_per_expert(expert_M[None], num_experts)
    first_of_E = torch.cumsum(counts_E, dim=0) - counts_E
    occurrence_M = torch.empty_like(expert_M)
    occurrence_M[by_expert_M] = (
        torch.arange(expert_M.numel(), device=expert_M.device) - first_of_E[expert_M[by_expert_M]]
    )
    return occurrence_M
