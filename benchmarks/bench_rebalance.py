"""The three fixes of `hybridlm rebalance`, each measured against the skewed baseline in one run.

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.bench_rebalance [--ranks 4] [--preset debug-small]
        [--skew 1.0] [--batch-size 2] [--prompt-len 64] [--decode-steps 12] [--rounds 3] [--seed 0]
        [--redundant-experts 1] [--capacity-slack 1.25] [--bias-rate 0.001] [--bias-iterations 3]
        [--db out/bench_rebalance.duckdb] [--json out/bench_rebalance.json] [--plan out/plan.json]

W gloo ranks on loopback (one torch thread each), every rank the same random-weight preset and the
same routing skew (``hybridlm.distributed.skew``: a Zipf offset on every router's logits). Each rank
runs its own teacher-forced workload: ``--rounds`` times a prefill of ``--batch-size`` random prompts of
``--prompt-len`` tokens, then ``--decode-steps`` decode steps of fixed random tokens, so that every
method sees exactly the same input ids. In one process group:

1. baseline: the skewed model, experts sharded contiguously; rank 0 writes its trace (events of every
   rank, routing rows of every rank, one `step` event per rank and step) into --db;
2. the plan: ``plan_from_trace`` on that file (what `hybridlm rebalance DB` computes), sent to all ranks.
   The bias update closes its loop as DeepSeek-V3's rule means it to (each step sees the load the bias so
   far leaves): --bias-iterations - 1 more times, the model with the bias so far runs the workload
   traced, and the update planned from that trace is added;
3. the baseline again and the three fixes, round by round in turn (so that other load on the machine
   hits all alike): capacity (the plan's capacity factors: pairs past capacity dropped), bias (the
   summed bias update added to e_score_correction_bias), replicate (sharded with the plan's EPLB
   placement: hot experts copied).

Each run's trace goes into --db as its own run, and the table is computed from it: balancedness (per
MoE call mean / max pairs computed per rank, summed over calls), moe_dispatch and moe_combine p99 (all
ranks and blocks), step p50 / p99 (per step the slowest rank), the share of (token, expert) pairs
dropped, the share of (call, block, token) whose chosen expert set differs from the baseline's (for
capacity, a dropped pair counts as not chosen), and the share of positions whose greedy next token
(argmax of the logits) differs from the baseline's, with the largest logit difference. The plan is
measured on the workload it was computed from (in-sample).

What CPU ranks can and cannot show: balancedness, drops and routing changes are exact counts, the same
on every run. The times are not a measure of the fixes here: 4 ranks share this machine's 2 cores, so a
step costs about the ranks' total work / 2 whether one rank does most of it (the others sleep in the
collective and leave it a core) or all do an even share (4 busy ranks on 2 cores); other jobs on the
machine move them by tens of percent between runs (the methods run round by round in turn so that they
share the noise). With a core or a GPU per rank the slowest rank sets each all-to-all's pace, and that
is what balancedness measures; gloo moves rows through loopback TCP, not NVLink.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import numpy as np

METHODS = ("baseline", "capacity", "bias", "replicate")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_rebalance", description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--preset", default="debug-small")
    p.add_argument("--skew", type=float, default=1.0, help="routing skew (Zipf exponent, in router logit spreads)")
    p.add_argument("--batch-size", type=int, default=2, help="prompts per rank per round")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--decode-steps", type=int, default=12)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--redundant-experts", type=int, default=1)
    p.add_argument("--capacity-slack", type=float, default=1.25)
    p.add_argument("--bias-rate", type=float, default=1e-3)
    p.add_argument("--bias-iterations", type=int, default=3, help="trace -> plan -> apply rounds of the bias")
    p.add_argument("--db", default="out/bench_rebalance.duckdb", help="trace database (replaced)")
    p.add_argument("--json", default="out/bench_rebalance.json")
    p.add_argument("--plan", default="out/bench_rebalance_plan.json")
    return p.parse_args(argv)


# -- the ranks ---------------------------------------------------------------------------------------


def rank_main(rank: int, args: argparse.Namespace, port: int) -> None:
    import torch
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group("gloo", rank=rank, world_size=args.ranks, timeout=timedelta(seconds=300))
    try:
        run_all_methods(rank, args)
    finally:
        dist.destroy_process_group()


def run_all_methods(rank: int, args: argparse.Namespace) -> None:
    import torch

    from hybridlm import HybridLM
    from hybridlm.presets import get_preset
    from hybridlm.trace.store import TraceStore

    config = get_preset(args.preset)
    torch.manual_seed(args.seed)
    weights = HybridLM(config).state_dict()
    workload = rank_workload(rank, args, config.vocab_size)
    store = TraceStore(args.db) if rank == 0 else None

    # 1. the skewed baseline alone, traced; the plan from its trace
    baseline = build_model("baseline", args, config, weights, None)
    plan = trace_and_plan(rank, args, store, "baseline (traced for the plan)", baseline, workload)
    # the bias closes its loop: each further run adds the update `hybridlm rebalance` finds in its own trace
    bias_E = {p.layer: np.array(p.expert_bias_update) for p in plan.layers}
    for iteration in range(2, args.bias_iterations + 1):
        with_bias = with_expert_bias(plan, bias_E)
        model = build_model("bias", args, config, weights, with_bias)
        again = trace_and_plan(rank, args, store, f"bias after {iteration - 1} updates (traced)", model, workload)
        for p in again.layers:
            bias_E[p.layer] += p.expert_bias_update
    plan = with_expert_bias(plan, bias_E)
    plan.source["bias_iterations"] = args.bias_iterations
    if rank == 0:
        plan.save(args.plan, overwrite=True)

    # 2. the baseline again and each fix, round by round in turn, so that load on the machine hits all alike
    runs = {method: MethodRun(build_model(method, args, config, weights, plan), rank, workload) for method in METHODS}
    for round_inputs in workload:
        for run in runs.values():
            run.run_round(*round_inputs)
    results = {}
    for method, run in runs.items():
        rows, changes = gather(run.rows()), gather(compare_with_baseline(run, runs["baseline"]))
        if rank == 0:
            results[method] = {"run_id": write_run(store, args, method, rows), **sum_changes(changes)}
    if rank == 0:
        store.close()
        report(args, plan, results)


def trace_and_plan(rank: int, args: argparse.Namespace, store, name: str, model, workload: list[tuple]):
    """Run ``model`` over the workload traced; rank 0 writes the trace as run ``name`` and plans from it
    (what `hybridlm rebalance DB --run ID` computes); every rank gets the plan."""
    import torch.distributed as dist

    from hybridlm.distributed.rebalance import plan_from_trace

    traced = MethodRun(model, rank, workload)
    for round_inputs in workload:
        traced.run_round(*round_inputs)
    rows = gather(traced.rows())
    shared = [None]
    if rank == 0:
        run_id = write_run(store, args, name, rows)
        store.flush()
        shared = [
            plan_from_trace(args.db, args.ranks, run_id, args.capacity_slack, args.bias_rate, args.redundant_experts)
        ]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def with_expert_bias(plan, bias_E: dict):
    """A copy of ``plan`` whose bias update is ``bias_E[layer]``."""
    plan = copy.deepcopy(plan)
    for layer_plan in plan.layers:
        layer_plan.expert_bias_update = [float(b) for b in bias_E[layer_plan.layer]]
    return plan


def rank_workload(rank: int, args: argparse.Namespace, vocab_size: int) -> list[tuple]:
    """[(prompt ids [B, P], decode tokens [D, B])] per round: this rank's own, the same for every method."""
    import torch

    g = torch.Generator().manual_seed(10_000 * args.seed + rank)
    B, P, D = args.batch_size, args.prompt_len, args.decode_steps
    return [
        (torch.randint(3, vocab_size, (B, P), generator=g), torch.randint(3, vocab_size, (D, B), generator=g))
        for _ in range(args.rounds)
    ]


def build_model(method: str, args: argparse.Namespace, config, weights: dict, plan):
    """The skewed model with ``method``'s fix, its experts sharded over the group."""
    from hybridlm import HybridLM
    from hybridlm.distributed import shard_experts
    from hybridlm.distributed.rebalance import apply_capacity_factors, apply_expert_bias
    from hybridlm.distributed.skew import apply_routing_skew

    model = HybridLM(config)
    model.load_state_dict(weights)
    model.eval()
    apply_routing_skew(model, args.skew, seed=args.seed)
    if method == "bias":
        apply_expert_bias(model, plan)
    shard_experts(model, placement=plan.placement() if method == "replicate" else None)
    if method == "capacity":
        apply_capacity_factors(model, plan)
    return model


class MethodRun:
    """One model run round by round, traced: the CollectiveTrace's rows, one `step` event per forward call,
    routing rows, each call's chosen expert sets, and the logits of every position."""

    def __init__(self, model, rank: int, workload: list[tuple]) -> None:
        from hybridlm.distributed import CollectiveTrace

        self.model, self.rank = model, rank
        self.routing = RoutingRecorder(model)
        self.trace = CollectiveTrace(rank=rank).attach(model)
        self.logits: list = []
        self.steps: list[tuple] = []
        prompts, tokens = workload[0]
        self.run_round(prompts[:, : prompts.shape[1] // 2], tokens[:2])  # warm-up, then forgotten
        self.trace.rows, self.trace.step_index = [], -1
        self.routing.reset()
        self.logits, self.steps = [], []

    def run_round(self, prompts, tokens) -> None:
        """A prefill of ``prompts`` [B, P], then one decode step per row of ``tokens`` [D, B]."""
        import torch

        from hybridlm.distributed import clock_ns

        model = self.model
        cache = model.new_cache(batch_size=prompts.shape[0], max_seq_len=prompts.shape[1] + len(tokens))
        with torch.no_grad():
            for phase, ids in [("prefill", prompts)] + [("decode", token) for token in tokens]:
                self.trace.phase = self.routing.phase = phase
                start = clock_ns()
                if phase == "prefill":
                    logits = model(ids, cache=cache).logits.flatten(0, 1)  # [B * P, V]
                else:
                    logits = model.decode_step(ids, cache)  # [B, V]
                duration_us = (clock_ns() - start) / 1000
                self.logits.append(logits)
                step = (self.trace.step_index, start / 1000, duration_us, prompts.shape[0])
                self.steps.append(("step", phase, None, None, phase, *step, None, self.rank, None, os.getpid(), None))
                self.routing.end_step(self.trace.step_index)

    def rows(self) -> tuple[list, list]:
        return self.trace.rows + self.steps, self.routing.rows


class RoutingRecorder:
    """Per MoE block call on this rank: tokens and dropped pairs per expert (routing rows), and each
    token's chosen expert set (sorted ids, -1 where the pair was dropped)."""

    def __init__(self, model) -> None:
        self.rows: list[tuple] = []
        self.chosen: list = []
        self.phase = None
        self._pending: list[tuple] = []
        for block in model.layers:
            if block.routes_experts:
                block.mixer.experts.register_forward_hook(self._after_experts(block.index, block.mixer))

    def reset(self) -> None:
        self.rows, self.chosen, self._pending = [], [], []

    def _after_experts(self, layer: int, moe):
        def hook(experts, inputs, output) -> None:
            ids_NK = inputs[1]
            if experts.last_dropped_pairs_NK is not None:
                ids_NK = ids_NK.masked_fill(experts.last_dropped_pairs_NK, -1)
            self.chosen.append(ids_NK.sort(dim=1).values)
            self._pending.append((layer, moe.last_tokens_per_expert.tolist(), experts.last_dropped_per_expert.tolist()))

        return hook

    def end_step(self, step: int) -> None:
        for layer, tokens, dropped in self._pending:
            for expert, (t, d) in enumerate(zip(tokens, dropped, strict=True)):
                self.rows.append((step, self.phase, layer, expert, t, d))
        self._pending = []


def compare_with_baseline(run: MethodRun, baseline: MethodRun) -> dict:
    """Counts: (call, block, token) entries whose expert set changed; positions whose argmax changed;
    the largest |logit difference| and |logit|."""
    changed = sum(
        int((a != b).any(dim=1).sum()) for a, b in zip(run.routing.chosen, baseline.routing.chosen, strict=True)
    )
    entries = sum(a.shape[0] for a in run.routing.chosen)
    flips = sum(int((a.argmax(-1) != b.argmax(-1)).sum()) for a, b in zip(run.logits, baseline.logits, strict=True))
    positions = sum(a.shape[0] for a in run.logits)
    diff = max(float((a - b).abs().max()) for a, b in zip(run.logits, baseline.logits, strict=True))
    scale = max(float(b.abs().max()) for b in baseline.logits)
    return {
        "changed": changed,
        "entries": entries,
        "flips": flips,
        "positions": positions,
        "diff": diff,
        "scale": scale,
    }


def sum_changes(per_rank: list[dict]) -> dict:
    total = {k: sum(r[k] for r in per_rank) for k in ("changed", "entries", "flips", "positions")}
    return {
        "topk_changed": total["changed"] / total["entries"],
        "argmax_changed": total["flips"] / total["positions"],
        "max_logit_diff": max(r["diff"] for r in per_rank),
        "max_logit": max(r["scale"] for r in per_rank),
    }


def gather(value):
    """Every rank's ``value`` on rank 0 (a list, rank 0's first); None elsewhere."""
    import torch.distributed as dist

    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(value, out, dst=0)
    return out


def write_run(store, args, method: str, rows_per_rank: list) -> str:
    notes = {k: getattr(args, k) for k in ("ranks", "skew", "batch_size", "prompt_len", "decode_steps", "rounds",
                                           "seed", "redundant_experts", "capacity_slack", "bias_rate")}  # fmt: skip
    run_id = store.new_run(model=args.preset, device="cpu (gloo)", notes=json.dumps({"method": method, **notes}))
    for events, routing in rows_per_rank:
        store.add_events(run_id, events)
        store.add_routing(run_id, routing)
    store.end_run(run_id)
    return run_id


# -- the table ----------------------------------------------------------------------------------------

METRICS_SQL = """
WITH per_rank AS (
    SELECT step, layer, rank, sum(tokens) AS pairs FROM events
    WHERE run_id = $run AND source = 'layer' AND layer_type = 'moe_experts' GROUP BY ALL
), per_call AS (SELECT step, layer, avg(pairs) AS mean, max(pairs) AS most FROM per_rank GROUP BY ALL),
steps AS (SELECT step, max(duration_us) AS us FROM events WHERE run_id = $run AND source = 'step' GROUP BY step)
SELECT
    (SELECT sum(mean) / sum(most) FROM per_call),
    (SELECT quantile_cont(duration_us, 0.99) FROM events
     WHERE run_id = $run AND source = 'layer' AND layer_type = 'moe_dispatch'),
    (SELECT quantile_cont(duration_us, 0.99) FROM events
     WHERE run_id = $run AND source = 'layer' AND layer_type = 'moe_combine'),
    (SELECT quantile_cont(us, 0.5) FROM steps),
    (SELECT quantile_cont(us, 0.99) FROM steps),
    (SELECT sum(dropped) / sum(tokens) FROM routing WHERE run_id = $run)
"""
METRIC_NAMES = ("balancedness", "dispatch_p99_us", "combine_p99_us", "step_p50_us", "step_p99_us", "dropped")


def report(args: argparse.Namespace, plan, results: dict) -> None:
    import duckdb

    from benchmarks.common import print_table

    with duckdb.connect(args.db, read_only=True) as con:
        for result in results.values():
            values = con.execute(METRICS_SQL, {"run": result["run_id"]}).fetchone()
            result.update(zip(METRIC_NAMES, values, strict=True))
    rows = []
    for method, r in results.items():
        rows.append([
            method, f"{r['balancedness']:.3f}", f"{r['dispatch_p99_us']:,.0f}", f"{r['combine_p99_us']:,.0f}",
            f"{r['step_p50_us'] / 1000:.1f} / {r['step_p99_us'] / 1000:.1f}", f"{r['dropped']:.1%}",
            f"{r['topk_changed']:.1%}", f"{r['argmax_changed']:.1%}", f"{r['max_logit_diff']:.2g}",
        ])  # fmt: skip
    print(
        f"{args.preset}, {args.ranks} gloo ranks, routing skew {args.skew}, per rank {args.rounds} rounds of "
        f"{args.batch_size} x {args.prompt_len} prefill + {args.decode_steps} decode steps; plan: "
        f"{args.redundant_experts} redundant slot(s) per rank, capacity slack {args.capacity_slack}, "
        f"bias rate {args.bias_rate}\n"
    )
    print_table(
        ["method", "balancedness", "dispatch p99 µs", "combine p99 µs", "step p50 / p99 ms", "dropped",
         "top-k changed", "argmax changed", "max |Δlogit|"],
        rows,
    )  # fmt: skip
    print(f"\n(max |logit| {max(r['max_logit'] for r in results.values()):.3g}; trace {args.db}, plan {args.plan})")
    out = {"args": vars(args), "plan_balancedness": _plan_summary(plan), "results": results}
    _write_atomically(Path(args.json), json.dumps(out, indent=1) + "\n")


def _plan_summary(plan) -> dict:
    return {
        str(p.layer): {"trace": p.balancedness, "with_placement": p.balancedness_with_placement} for p in plan.layers
    }


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        f.write(text)
    os.replace(f.name, path)


def main(argv: list[str] | None = None) -> int:
    import torch.multiprocessing as mp

    args = parse_args(argv)
    for path in (args.db, args.db + ".wal"):
        if os.path.exists(path):
            os.remove(path)
    Path(args.db).parent.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    began = time.perf_counter()
    mp.start_processes(rank_main, args=(args, port), nprocs=args.ranks, start_method="spawn", join=True)
    print(f"({time.perf_counter() - began:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
