"""The MoE all-to-all as its own layer types: ShardedExperts' spans as rows of the trace store.

Per MoE block call, each rank records four spans (``SPAN_LAYER_TYPES``): ``moe_router`` (from the
block's entry to the dispatch: router logits and top-k, and the shared expert when decoding fuses it
with the router), ``moe_dispatch`` (sorting the pairs, the count exchange and the all-to-all out),
``moe_experts`` (the local experts) and ``moe_combine`` (the all-to-all back and the weighted sum).
Each becomes an ``events`` row with ``source = 'layer'``, the rank, and ``tokens``: the (token,
expert) pairs routed (router), sent (dispatch, combine: the same rows come back) or computed
(experts: the pairs every rank sent here).

Time waiting in a collective is told apart from time moving data by one more row per dispatch and
combine, ``source = 'collective'``, from the moment this rank entered the collective to the span's
end. All ranks on one machine read one clock (``clock_ns``), so for one (step, layer, layer_type) the
rank that entered last is the one the others waited for: wait = max over ranks of the entry time -
this rank's entry time; the rest of the collective row is moving data (and the last rank's own).

A DuckDB file has one writer: each rank collects its rows here, and rank 0 gathers and writes them
(``gather_rows``, then ``TraceStore.add_events``).
"""

from __future__ import annotations

import os

import torch.distributed as dist
from torch import nn

from hybridlm.distributed.exchange import ProcessGroup
from hybridlm.distributed.experts import sharded_experts

COLLECTIVE_LAYER_TYPES = ("moe_dispatch", "moe_combine")


class CollectiveTrace:
    """Records the spans of a sharded model's experts on this rank as trace-store event rows.

    ``step_index`` advances each time the model's first MoE block starts a call (each forward or
    decode step); ``phase`` ('prefill', 'decode', 'train' or None) is set by the caller. Times are
    microseconds since ``origin_ns`` on ``clock_ns``'s clock (CLOCK_MONOTONIC: pass the same origin on
    every rank, or keep 0).
    """

    def __init__(self, rank: int, origin_ns: int = 0, phase: str | None = None) -> None:
        self.rank = rank
        self.origin_ns = origin_ns
        self.phase = phase
        self.step_index = -1
        self.rows: list[tuple] = []
        self._first_layer: int | None = None
        self._pid = os.getpid()
        self._attached: list[nn.Module] = []

    def attach(self, model: nn.Module) -> CollectiveTrace:
        experts = sharded_experts(model)
        if not experts:
            raise ValueError("the model's experts are not sharded: call shard_experts(model) first")
        if any(e.on_span is not None for e in experts):
            raise ValueError("the model's sharded experts already have a span recorder attached")
        for e in experts:
            e.on_span = self
        self._first_layer = experts[0].layer_index
        self._attached = experts
        return self

    def detach(self) -> None:
        for e in self._attached:
            if e.on_span is self:
                e.on_span = None
        self._attached = []

    def __call__(
        self,
        layer_index: int,
        layer_type: str,
        start_ns: int,
        end_ns: int,
        entered_ns: int | None,
        tokens_sent: list[int],
        tokens_received: list[int],
    ) -> None:
        if layer_type == "moe_router" and layer_index == self._first_layer:
            self.step_index += 1
        tokens = sum(tokens_received) if layer_type == "moe_experts" else sum(tokens_sent)
        name = f"L{layer_index}.{layer_type}"
        self.rows.append(self._row("layer", name, layer_index, layer_type, start_ns, end_ns, tokens))
        if entered_ns is not None:
            self.rows.append(self._row("collective", name, layer_index, layer_type, entered_ns, end_ns, tokens))

    def _row(self, source: str, name: str, layer: int, layer_type: str, start_ns: int, end_ns: int, tokens: int):
        start_us, duration_us = (start_ns - self.origin_ns) / 1000, (end_ns - start_ns) / 1000
        # schema.EVENT_ROW_COLUMNS: source, name, layer, layer_type, phase, step, start_us, duration_us,
        # batch, tokens, rank, stream, pid, tid
        return (source, name, layer, layer_type, self.phase, self.step_index, start_us, duration_us,
                None, tokens, self.rank, None, self._pid, None)  # fmt: skip

    def gather_rows(self, group: ProcessGroup | None = None) -> list[tuple]:
        """Every rank's rows on rank 0 of ``group`` (an empty list elsewhere); a collective: every rank
        calls it. This rank's rows are handed over and cleared."""
        rows, self.rows = self.rows, []
        is_first = dist.get_rank(group) == 0
        gathered: list[list[tuple]] | None = [[] for _ in range(dist.get_world_size(group))] if is_first else None
        dist.gather_object(rows, gathered, dst=0 if group is None else dist.get_global_rank(group, 0), group=group)
        return [row for rank_rows in gathered for row in rank_rows] if is_first else []
