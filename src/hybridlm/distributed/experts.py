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
"""

from __future__ import annotations

import time
from collections.abc import Callable

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


class ShardedExperts(Experts):
    """The routed experts [first, first + L) of one MoE block, on one rank of ``group``.

    Same parameter names as ``Experts`` (``gate_up_proj`` or ``up_proj``, ``down_proj``), L rows each.
    ``on_span``, when set, is called after each forward with the four spans of the call (see
    ``SPAN_LAYER_TYPES``; times from ``clock_ns``): ``entered_ns`` is the time just before the first
    collective of the span (None for the router and the experts, which have none); ``tokens_sent[b]``
    and ``tokens_received[a]`` are the pairs this call's dispatch sends to rank b and receives from
    rank a (the combine moves the same rows back).
    """

    holds_all_experts = False

    def __init__(self, full: Experts, layer_index: int, group: ProcessGroup | None = None) -> None:
        nn.Module.__init__(self)  # Experts.__init__ would allocate all E experts
        self.activation = full.activation
        self.layer_index = layer_index
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.num_experts = full.input_proj.shape[0]
        local = expert_range(self.num_experts, self.world_size, self.rank)
        self.first_expert, self.num_local_experts = local.start, len(local)
        for name, param in full.named_parameters(recurse=False):
            local_param = nn.Parameter(param.detach()[local.start : local.stop].clone())
            local_param.requires_grad_(param.requires_grad)
            setattr(self, name, local_param)
        self.on_span: SpanRecorder | None = None
        self._block_start_ns: int | None = None

    def extra_repr(self) -> str:
        last = self.first_expert + self.num_local_experts - 1
        return f"experts {self.first_expert}..{last} of {self.num_experts}, rank {self.rank} of {self.world_size}"

    def mark_block_start(self, *_: object) -> None:
        """A forward pre-hook of the MoE block: the router span starts here."""
        self._block_start_ns = clock_ns()

    def forward(self, x_ND: Tensor, topk_ids_NK: Tensor, topk_weights_NK: Tensor) -> Tensor:
        """x_ND [N, D], topk_ids_NK [N, K] (global expert ids), topk_weights_NK [N, K] -> [N, D]: the
        weighted sum of each token's K experts, wherever they are held."""
        W, L = self.world_size, self.num_local_experts
        dispatch_start = clock_ns()
        K = topk_ids_NK.shape[1]
        order_M = torch.argsort(topk_ids_NK.flatten(), stable=True)  # by expert, hence by rank
        token_M = order_M // K
        counts_WL = tokens_per_expert(topk_ids_NK, self.num_experts).view(W, L)
        dispatch_entered = clock_ns()
        received_WL = exchange_counts(counts_WL, self.group)
        send_splits, recv_splits = counts_WL.sum(dim=1).tolist(), received_WL.sum(dim=1).tolist()
        x_RD = exchange_rows(x_ND[token_M], send_splits, recv_splits, self.group)

        experts_start = clock_ns()
        y_RD = self._run_local_experts(x_RD, received_WL)

        combine_start = clock_ns()
        weights_M = topk_weights_NK.flatten()[order_M].to(x_ND.dtype)
        combine_entered = clock_ns()
        y_MD = exchange_rows(y_RD, recv_splits, send_splits, self.group)
        out_ND = torch.zeros_like(x_ND).index_add_(0, token_M, y_MD * weights_M[:, None])
        end = clock_ns()

        if self.on_span is not None:
            times = (dispatch_start, dispatch_entered, experts_start, combine_start, combine_entered, end)
            self._record_spans(times, send_splits, recv_splits)
        self._block_start_ns = None
        return out_ND

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

    def _run_local_experts(self, x_RD: Tensor, received_WL: Tensor) -> Tensor:
        """The R received rows lie by sending rank, then by local expert (each sender sorted its pairs)."""
        if x_RD.shape[0] == 0:
            # Nothing to compute; returning the (empty) input keeps the combine's input in the autograd
            # graph of the dispatch, so this rank still joins both all-to-alls of the backward.
            return x_RD
        local_ids = torch.arange(self.num_local_experts, device=x_RD.device).repeat(self.world_size)
        local_ids_R1 = local_ids.repeat_interleave(received_WL.flatten())[:, None]
        return super().forward(x_RD, local_ids_R1, x_RD.new_ones(x_RD.shape[0], 1))


def shard_experts(model: nn.Module, group: ProcessGroup | None = None) -> nn.Module:
    """Replace every MoE block's experts of ``model`` (a HybridLM) by this rank's ``ShardedExperts``.

    Call it on every rank of ``group`` (default: the whole world) with the same model weights; each
    keeps its own slice, copied from the full weights. Returns ``model``.
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
    check_expert_split(model.config.moe.num_experts, dist.get_world_size(group))
    if sharded_experts(model):
        raise ValueError("the model's experts are already sharded")
    for block in moe_blocks:
        moe = block.mixer
        sharded = ShardedExperts(moe.experts, block.index, group)
        moe.experts = sharded
        moe.register_forward_pre_hook(sharded.mark_block_start)
    return model


def sharded_experts(model: nn.Module) -> list[ShardedExperts]:
    """The ShardedExperts of ``model``'s MoE blocks, in block order (empty when not sharded)."""
    return [m for m in model.modules() if isinstance(m, ShardedExperts)]
