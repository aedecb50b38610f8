"""The MoE all-to-all's tail under skewed routing: `hybridlm profile --ep 4 --routing-skew S`, S swept.

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.bench_a2a_skew [--skews 0,0.5,1,2,4] [--out bench-a2a-skew]
    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.bench_a2a_skew --quick     # debug-tiny-nemotron, 2 skews

For each skew S the real command runs (4 local gloo ranks, debug-small's 16 experts 4 per rank, the same
seeded prompts, each batch split over the ranks) into its own trace database, and the trace is read
back: per skew, the max / mean (token, expert) pairs a rank's experts computed per MoE call (1.0 =
even, 4.0 = one rank computes everything), the p50 / p99 / tail ratio of the all-to-all (moe_dispatch +
moe_combine of one MoE call on one rank) and of every other layer type, how long ranks waited for the
straggler, and the aggregate: every block call pooled, and the step time. Decode steps only in the
tables that lead (prefill calls are a few long ones that would be the p99 of any pooled column); then
the prefill steps' first table (few calls: their p99 is about their maximum). The JSON has both phases.
Writes OUT/results.json and OUT/a2a_skew.png, and prints markdown tables.

What CPU gloo ranks on a shared 2-core machine can show, and what they cannot (default sweep, 2 rounds,
on a 2-core VM that other jobs were also using, load average ~4.5):
- the imbalance itself: max / mean pairs per rank goes 1.25, 1.45, 1.88, 2.33, 2.50 over S = 0..4;
- the mechanism, where the hot rank's extra rows are real work (prefill: hundreds of rows per expert):
  the all-to-all p50 doubled (48 -> 95 ms) and p99 doubled (81 -> 163 ms), the waits at the combine (for
  the rank still computing its experts) rose 3.2x at p99 (34 -> 108 ms), while the pooled block calls
  ("all layers" p50 158-167 ms) and the step time (+4%) hardly moved: the aggregate hides it;
- not the decode tail: 16 sequences per rank give each rank ~32 pairs per MoE call, and the hot rank's
  extra matmul time (~1 ms) vanishes next to a gloo all-to-all of ~20 ms on time-shared cores; the
  all-to-all p99 stays at 35-37 ms for every S (one round at S = 0.5 met a burst of load: 63 ms);
- nothing about GPUs: gloo moves rows through loopback TCP, not NCCL over NVLink; no kernel-launch or
  occupancy effects; 4 ranks time-share 2 cores, so a rank ready for a collective often waits for a core
  first, and the waits are mostly the scheduler's (already 10-16 ms at p99 with S = 0). The hot rank's
  matmuls also take cores from the other ranks, which is why attention and Mamba move with S here
  (attention decode p50 1.3 -> 3.2 ms) where on GPUs they would not. Read trends across S, not µs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np

from benchmarks.common import print_table

# 16 sequences per rank: with fewer, a decode step gives each rank a handful of (token, expert) pairs and
# the hot rank's extra rows cost nothing next to gloo's own latency.
DEFAULT = {"model": "debug-small", "skews": "0,0.5,1,2,4", "requests": 64, "batch_size": 64, "new_tokens": 16,
           "prompt_len": "8-32", "rounds": 2}  # fmt: skip
QUICK = {"model": "debug-tiny-nemotron", "skews": "0,2", "requests": 4, "batch_size": 4, "new_tokens": 4,
         "prompt_len": "8-16", "rounds": 1}  # fmt: skip
OTHER_TYPES = ("mamba2", "attention", "moe_router", "moe_experts", "moe")  # moe: the whole block on one rank


def run_profile(args: argparse.Namespace, skew: float, db: Path) -> float:
    """The real `hybridlm profile --ep N --routing-skew S` into ``db``; returns its wall seconds."""
    db.unlink(missing_ok=True)
    db.with_name(db.name + ".wal").unlink(missing_ok=True)
    command = [sys.executable, "-m", "hybridlm", "profile", args.model, "--ep", str(args.ranks),
               "--routing-skew", str(skew), "--db", str(db), "--requests", str(args.requests),
               "--batch-size", str(args.batch_size), "--new-tokens", str(args.new_tokens),
               "--prompt-len", args.prompt_len, "--seed", str(args.seed)]  # fmt: skip
    env = {**os.environ, "HYBRIDLM_PROGRESS": "0", "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    began = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode:
        sys.exit(f"hybridlm profile failed for skew {skew}:\n{result.stderr}")
    return time.perf_counter() - began


def stats(values: list[float]) -> dict:
    """p50 / p99 (linear interpolation) and their ratio, in µs."""
    if not values:
        return {"calls": 0, "p50_us": None, "p99_us": None, "tail": None}
    p50, p99 = np.percentile(values, [50, 99])
    return {"calls": len(values), "p50_us": float(p50), "p99_us": float(p99), "tail": float(p99 / p50) if p50 else None}


PARTS = "('moe_router', 'moe_dispatch', 'moe_experts', 'moe_combine')"
SAMPLES = {  # name -> one value per row, from one trace (its one run), for phase $phase
    # the all-to-all of one MoE call on one rank: dispatch + combine
    "a2a": "SELECT sum(duration_us) FROM events WHERE phase = $phase AND source = 'layer' "
    "AND layer_type IN ('moe_dispatch', 'moe_combine') GROUP BY rank, step, layer",
    # per MoE call: max / mean over the ranks of the pairs their experts computed
    "balance": "SELECT max(tokens) / avg(tokens) FROM events WHERE phase = $phase AND source = 'layer' "
    "AND layer_type = 'moe_experts' GROUP BY step, layer HAVING avg(tokens) > 0",
    "all_layers": "SELECT duration_us FROM events WHERE phase = $phase AND source = 'layer' "
    f"AND layer_type NOT IN {PARTS}",
    "step": "SELECT duration_us FROM events WHERE phase = $phase AND source = 'step'",
    **{t: f"SELECT duration_us FROM events WHERE phase = $phase AND source = 'layer' AND layer_type = '{t}'"
       for t in OTHER_TYPES},
    # each rank's wait for the last rank into the same collective (the last rank's own wait, 0, left out)
    **{f"{c}_wait": "SELECT wait FROM (SELECT max(start_us) OVER (PARTITION BY step, layer) - start_us AS wait "
       f"FROM events WHERE phase = $phase AND source = 'collective' AND layer_type = '{c}') WHERE wait > 0"
       for c in ("moe_dispatch", "moe_combine")},
}  # fmt: skip


def measure(dbs: list[Path], phase: str) -> dict:
    """What the traces of one skew (one per round) show in ``phase``, their calls pooled."""
    samples: dict[str, list[float]] = {name: [] for name in SAMPLES}
    for db in dbs:
        with duckdb.connect(str(db), read_only=True) as con:
            for name, sql in SAMPLES.items():
                samples[name] += [float(v) for (v,) in con.execute(sql, {"phase": phase}).fetchall()]
    return {
        "max_over_mean_tokens_per_rank": float(np.mean(samples["balance"])),
        "a2a": stats(samples["a2a"]),
        "wait_p99_us": {c: stats(samples[f"{c}_wait"])["p99_us"] for c in ("moe_dispatch", "moe_combine")},
        "layer_types": {t: stats(samples[t]) for t in OTHER_TYPES},
        "all_layers": stats(samples["all_layers"]),
        "step": {**stats(samples["step"]), "mean_us": float(np.mean(samples["step"]))},
    }


def us(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def tail(entry: dict) -> str:
    return "-" if entry["tail"] is None else f"{entry['tail']:.1f}x"


def print_tables(results: list[dict], phase: str, other_types: bool = True) -> None:
    print(f"\nall-to-all, waits and the aggregate ({phase} steps; µs)\n")
    headers = ["skew", "max/mean tokens per rank", "a2a p50", "a2a p99", "a2a tail", "dispatch wait p99",
               "combine wait p99", "all layers p50", "p99", "tail", "step p50", "step p99", "step mean"]  # fmt: skip
    rows = []
    for r in results:
        m = r[phase]
        rows.append([f"{r['skew']:g}", f"{m['max_over_mean_tokens_per_rank']:.2f}", us(m["a2a"]["p50_us"]),
                     us(m["a2a"]["p99_us"]), tail(m["a2a"]), us(m["wait_p99_us"].get("moe_dispatch")),
                     us(m["wait_p99_us"].get("moe_combine")), us(m["all_layers"]["p50_us"]),
                     us(m["all_layers"]["p99_us"]), tail(m["all_layers"]), us(m["step"]["p50_us"]),
                     us(m["step"]["p99_us"]), us(m["step"]["mean_us"])])  # fmt: skip
    print_table(headers, rows)
    if not other_types:
        return
    print(f"\nthe other layer types ({phase} steps; p50 / p99 µs, tail ratio)\n")
    headers = ["skew", *OTHER_TYPES]
    rows = [
        [f"{r['skew']:g}"]
        + [
            f"{us(e['p50_us'])} / {us(e['p99_us'])} ({tail(e)})"
            for e in (r[phase]["layer_types"][t] for t in OTHER_TYPES)
        ]
        for r in results
    ]
    print_table(headers, rows)


PHASES = ("decode", "prefill")


def plot(results: list[dict], path: Path, title: str) -> None:
    """Per phase, each series' p99 relative to the first skew's; and the imbalance over ranks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    skews = [r["skew"] for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    series = {"all-to-all (dispatch + combine)": lambda m: m["a2a"]}
    series |= {t: (lambda m, t=t: m["layer_types"][t]) for t in OTHER_TYPES}
    series |= {"all layers (aggregate)": lambda m: m["all_layers"], "step (aggregate)": lambda m: m["step"]}
    for axis, phase in zip(axes, PHASES, strict=False):
        for name, pick in series.items():
            base = pick(results[0][phase])["p99_us"]
            values = [pick(r[phase])["p99_us"] / base if base else None for r in results]
            aggregate = "aggregate" in name
            style = {"linewidth": 3} if name.startswith("all-to-all") else {"linestyle": "--" if aggregate else "-"}
            axis.plot(skews, values, marker="o", label=name, **style)
        axis.set(xlabel="routing skew S", ylabel=f"p99 / p99 at S={skews[0]:g}", title=f"{phase}: p99 vs no skew")
    axes[0].legend(fontsize=8)
    for phase in PHASES:
        axes[2].plot(skews, [r[phase]["max_over_mean_tokens_per_rank"] for r in results], marker="o", label=phase)
    axes[2].set(xlabel="routing skew S", ylabel="max / mean pairs computed per rank", title="imbalance over ranks")
    axes[2].set_ylim(bottom=1)
    axes[2].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="debug-tiny-nemotron, skews 0 and 2, a few steps")
    parser.add_argument("--model", default=None, help=f"default {DEFAULT['model']}")
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--skews", default=None, help=f"comma-separated (default {DEFAULT['skews']})")
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--prompt-len", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=None, help="runs per skew, interleaved (default 2; quick 1)")
    parser.add_argument("--out", type=Path, default=Path("bench-a2a-skew"))
    args = parser.parse_args()
    for key, value in (QUICK if args.quick else DEFAULT).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out.mkdir(parents=True, exist_ok=True)
    skews = [float(s) for s in args.skews.split(",")]
    traces: dict[float, list[Path]] = {skew: [] for skew in skews}
    seconds: dict[float, float] = dict.fromkeys(skews, 0.0)
    for round_index in range(args.rounds):  # skews interleaved: a change in the machine's load hits all alike
        for skew in skews:
            db = args.out / f"skew-{skew:g}-round{round_index}.duckdb"
            seconds[skew] += run_profile(args, skew, db)
            traces[skew].append(db)
            print(f"round {round_index}, skew {skew:g}: profiled in {seconds[skew]:.1f} s so far", file=sys.stderr)
    results = [
        {"skew": skew, "seconds": seconds[skew], **{p: measure(traces[skew], p) for p in ("prefill", "decode")}}
        for skew in skews
    ]
    setup = (f"{args.model}, {args.ranks} gloo ranks on {os.cpu_count()} CPUs, {args.requests} requests in batches "
             f"of {args.batch_size}, prompts {args.prompt_len}, {args.new_tokens} new tokens, {args.rounds} "
             f"round{'s' * (args.rounds != 1)} per skew")  # fmt: skip
    (args.out / "results.json").write_text(json.dumps({"setup": setup, "results": results}, indent=2))
    plot(results, args.out / "a2a_skew.png", setup)
    print(setup)
    print_tables(results, "decode")
    print_tables(results, "prefill", other_types=False)
    print(f"\nwrote {args.out / 'results.json'} and {args.out / 'a2a_skew.png'}")


if __name__ == "__main__":
    main()
