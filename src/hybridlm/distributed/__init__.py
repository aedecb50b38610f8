"""Expert parallelism over torch.distributed: a built HybridLM's routed experts spread over ranks.

Imported only when used (``import hybridlm`` does not load it). On every rank, after
``torch.distributed.init_process_group``::

    model = HybridLM(config)                  # same weights on every rank (same seed, or loaded)
    shard_experts(model)                      # rank r keeps experts [r * E / W, (r + 1) * E / W)
    model = load_sharded("checkpoint-dir")    # or: read only this rank's experts from the files
    logits = model(input_ids).logits          # each rank its own batch; dispatch / combine inside

Training: each rank backpropagates its own loss, then ``average_gradients(model)``.
Tracing the collectives: ``trace = CollectiveTrace(rank=r).attach(model)``, then on rank 0
``store.add_events(run_id, trace.gather_rows())`` (every rank calls ``gather_rows``).
"""

from hybridlm.distributed.experts import (
    SPAN_LAYER_TYPES,
    ShardedExperts,
    clock_ns,
    expert_range,
    shard_experts,
    sharded_experts,
)
from hybridlm.distributed.gradients import average_gradients
from hybridlm.distributed.loading import load_sharded
from hybridlm.distributed.trace import COLLECTIVE_LAYER_TYPES, CollectiveTrace

__all__ = [
    "COLLECTIVE_LAYER_TYPES",
    "SPAN_LAYER_TYPES",
    "CollectiveTrace",
    "ShardedExperts",
    "average_gradients",
    "clock_ns",
    "expert_range",
    "load_sharded",
    "shard_experts",
    "sharded_experts",
]
