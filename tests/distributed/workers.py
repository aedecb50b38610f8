"""What each spawned rank runs (importable by name, as torch.multiprocessing's spawn needs), and the
inputs and computations the single-process references share with it."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

import hybridlm
from hybridlm import HybridLM
from hybridlm.config import HybridConfig
from hybridlm.layers.moe import Experts
from hybridlm.presets import get_preset
from tests.helpers import tiny_config

# swiglu experts with softmax routing and a shared expert; relu2 experts with sigmoid routing, a scaled
# top-k and an expert bias that only chooses (randomised by save_weights so that it does choose)
CONFIGS = {
    "tiny": lambda: tiny_config("ME*E"),
    "nemotron": lambda: get_preset("debug-tiny-nemotron"),
    "qwen3_next": lambda: get_preset("debug-tiny-qwen3-next"),  # loading only: gated shared expert, GDN
}
PARITY_CONFIGS = ("tiny", "nemotron")


def save_weights(name: str, directory: Path, seed: int = 0) -> HybridLM:
    torch.manual_seed(seed)
    model = HybridLM(CONFIGS[name]())
    for block in model.layers:
        if block.routes_experts and block.mixer.gate.e_score_correction_bias is not None:
            block.mixer.gate.e_score_correction_bias.data.normal_(std=0.05)
    torch.save(model.state_dict(), directory / f"{name}.pt")
    return model.eval()


def load_weights(name: str, directory: Path) -> HybridLM:
    model = HybridLM(CONFIGS[name]())
    model.load_state_dict(torch.load(directory / f"{name}.pt"))
    return model.eval()


def rank_inputs(rank: int, config: HybridConfig) -> dict:
    """Rank ``rank``'s own share of the batch: the batch is sharded over ranks, as in data parallelism."""
    g = torch.Generator().manual_seed(1000 + rank)
    vocab = config.vocab_size
    ids = torch.randint(0, vocab, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # row 0 left-padded
    return {
        "ids": ids,
        "mask": mask,
        "decode_tokens": torch.randint(0, vocab, (3, 2), generator=g),
        "prompts": [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (5, 2 + rank)],
        "train_ids": torch.randint(0, vocab, (2, 8), generator=g),
    }


@torch.no_grad()
def inference_outputs(model: HybridLM, inputs: dict) -> dict:
    """Logits of a padded batch, of 3 decode steps after a cached prefill, and 6 greedy tokens."""
    logits = model(inputs["ids"], attention_mask=inputs["mask"]).logits
    cache = model.new_cache(batch_size=2, max_seq_len=16)
    model(inputs["ids"], cache=cache)
    decode_logits = torch.stack([model.decode_step(token, cache) for token in inputs["decode_tokens"]])
    generated = hybridlm.generate(model, inputs["prompts"], max_new_tokens=6)
    return {"logits": logits, "decode_logits": decode_logits, "generated": generated}


def training_loss(model: HybridLM, ids: Tensor) -> Tensor:
    """Next-token cross-entropy (a mean over the batch's tokens) + the MoE balancing losses."""
    out = model(ids)
    cross_entropy = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    return cross_entropy + out.aux_loss


def parity_worker(rank: int, world_size: int, weights: Path) -> dict:
    from hybridlm.distributed import average_gradients, shard_experts, sharded_experts

    results = {}
    for name in PARITY_CONFIGS:
        model = shard_experts(load_weights(name, weights))
        inputs = rank_inputs(rank, model.config)
        outputs = inference_outputs(model, inputs)
        model.train()
        training_loss(model, inputs["train_ids"]).backward()
        average_gradients(model)
        outputs["grads"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        outputs["expert_range"] = {
            n: (e.first_expert, e.first_expert + e.num_local_experts)
            for e in sharded_experts(model)
            for n, p in model.named_parameters()
            if any(p is q for q in e.parameters())
        }
        results[name] = outputs
    return results


def edge_experts(seed: int = 0) -> Experts:
    torch.manual_seed(seed)
    experts = Experts(64, tiny_config().moe)
    for param in experts.parameters():
        torch.nn.init.normal_(param, std=0.02)
    return experts


def edge_inputs(rank: int, world_size: int, case: str) -> tuple[Tensor, Tensor, Tensor]:
    """Routings that leave ranks idle. "one_rank": only rank 0 has tokens, all for its own experts
    (every other rank sends and receives nothing, and has no tokens at all); "to_last": every rank's
    tokens go to the last rank's experts (the others receive nothing)."""
    g = torch.Generator().manual_seed(10 * rank + len(case))
    num_experts, K = 8, 2
    per_rank = num_experts // world_size
    if case == "one_rank":
        N, first = (5 if rank == 0 else 0), 0
    else:
        N, first = 3, num_experts - per_rank
    x_ND = torch.randn(N, 64, generator=g)
    ids_NK = torch.zeros(N, K, dtype=torch.int64)
    for n in range(N):  # K distinct experts per token
        ids_NK[n] = torch.randperm(per_rank, generator=g)[:K] + first
    weights_NK = torch.rand(N, K, generator=g)
    return x_ND, ids_NK, weights_NK


def edge_worker(rank: int, world_size: int) -> dict:
    """ShardedExperts alone (no model) on routings that leave ranks idle: values and gradients."""
    from hybridlm.distributed.experts import ShardedExperts

    results = {}
    for case in ("one_rank", "to_last"):
        sharded = ShardedExperts(edge_experts(), layer_index=0)
        x_ND, ids_NK, weights_NK = edge_inputs(rank, world_size, case)
        x_ND.requires_grad_(True)
        weights_NK.requires_grad_(True)
        out_ND = sharded(x_ND, ids_NK, weights_NK)
        (out_ND * out_ND.detach().sign()).sum().backward()  # a loss whose gradient is not uniform
        grads = {n: p.grad for n, p in sharded.named_parameters()}
        results[case] = {"out": out_ND.detach(), "x_grad": x_ND.grad, "weights_grad": weights_NK.grad, **grads}
        results[case]["first_expert"] = sharded.first_expert
    return results


def refusals_worker(rank: int, world_size: int) -> dict:
    """The messages shard_experts raises on a group of ``world_size`` ranks."""
    from hybridlm.distributed import shard_experts

    models = {
        "not_dividing": HybridLM(tiny_config("ME", moe={"num_experts": 3})),
        "rank_without_experts": HybridLM(tiny_config("ME", moe={"num_experts": 1, "num_experts_per_tok": 1})),
        "no_moe_blocks": HybridLM(tiny_config("M*-")),
        "already_sharded": shard_experts(HybridLM(tiny_config("ME"))),
    }
    messages = {}
    for case, model in models.items():
        try:
            shard_experts(model)
        except ValueError as error:
            messages[case] = str(error)
    return messages


class RoutingLog:
    """A block observer keeping each MoE block call's tokens per expert (this rank's tokens)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, Tensor]] = []

    def before_block(self, index: int, layer_type: str, hidden: Tensor) -> None:
        pass

    def after_block(self, index: int, layer_type: str, hidden: Tensor, routing_counts: Tensor | None) -> None:
        if routing_counts is not None:
            self.calls.append((index, routing_counts.clone()))


def trace_worker(rank: int, world_size: int, store_path: Path) -> dict:
    """A prefill and two decode steps with the collectives traced; rank 0 writes every rank's rows to a
    trace store. Returns the raw spans, the routing of every MoE call, and clock readings around a barrier."""
    import torch.distributed as dist

    from hybridlm.distributed import CollectiveTrace, clock_ns, shard_experts, sharded_experts
    from hybridlm.trace.store import TraceStore

    torch.manual_seed(0)
    model = shard_experts(HybridLM(tiny_config("ME*E")).eval())
    trace = CollectiveTrace(rank=rank).attach(model)
    spans = []
    for experts in sharded_experts(model):  # keep the raw spans too, then let the trace record them

        def record(*span, forward=experts.on_span):
            spans.append(span)
            forward(*span)

        experts.on_span = record
    routing = model.block_observer = RoutingLog()

    before_barrier = clock_ns()
    dist.barrier()
    after_barrier = clock_ns()

    ids = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        cache = model.new_cache(batch_size=2, max_seq_len=8)
        trace.phase = "prefill"
        model(ids, cache=cache)
        trace.phase = "decode"
        for token in ([1, 2], [3, 4]):
            model.decode_step(torch.tensor(token), cache)

    rows = trace.gather_rows()
    if rank == 0:
        with TraceStore(store_path) as store:
            run_id = store.new_run(model="debug-tiny ME*E", notes=f"expert parallel, {world_size} ranks")
            store.add_events(run_id, rows)
            store.end_run(run_id)
    return {"spans": spans, "routing": routing.calls, "clock": (before_barrier, after_barrier)}


# checkpoint formats load_sharded reads: (format, family, config) -> how the experts lie on disk
CHECKPOINTS = {
    "hybridlm": ("hybridlm", None, "tiny"),  # stacked [E, 2I, D] and [E, D, I]: rows read
    "nemotron_h": ("hf", "nemotron_h", "nemotron"),  # one up_proj and one down_proj per expert
    "qwen3_next": ("hf", "qwen3_next", "qwen3_next"),  # per expert gate_proj, up_proj: halves of gate_up_proj
}


def bytes_read() -> int:
    """Bytes this process has read through read() calls so far (Linux /proc/self/io ``rchar``)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no rchar line")


def loading_worker(rank: int, world_size: int, checkpoints: dict[str, Path]) -> dict:
    """Each checkpoint loaded with this rank's experts only: its parameters, logits of this rank's
    batch, and the bytes a second load read (the first one also imports and compiles what it needs)."""
    from hybridlm.distributed.loading import load_sharded

    results = {}
    for name, path in checkpoints.items():
        load_sharded(path)
        before = bytes_read()
        model = load_sharded(path)
        read = bytes_read() - before
        with torch.no_grad():
            logits = model(rank_inputs(rank, model.config)["ids"]).logits
        results[name] = {"state": model.state_dict(), "logits": logits, "bytes_read": read}
    return results
