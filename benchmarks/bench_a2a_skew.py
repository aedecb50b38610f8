"""The MoE all-to-all's tail under skewed routing: `hybridlm profile --ep 4 --routing-skew S`, S swept.

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.bench_a2a_skew [--skews 0,0.5,1,2,4] [--out bench-a2a-skew]
    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.bench_a2a_skew --quick     # debug-tiny-nemotron, 2 skews

For each skew S the real command runs (4 local gloo ranks, debug-small's 16 experts 4 per rank, the same
seeded prompts, each batch split over the ranks) into its own trace database, and the trace is read
back: per skew, the max / mean (token, expert) pairs a rank's experts computed per MoE call (1.0 =
even, 4.0 = one rank computes everything), the p50 / p99 / tail ratio of the all-to-all (moe_dispatch +
moe_combine of one MoE call on one rank) and of every other layer type, how long ranks waited for the
straggler, and the aggregate: every block call pooled, and the step time. Decode steps only in the
tables (prefill calls are a few long ones that would be the p99 of any pooled column); the JSON has
both phases. Writes OUT/results.json, OUT/a2a_skew.png and prints markdown tables.

What CPU gloo ranks on a shared 2-core machine can show, and what they cannot:
- they can show the mechanism: the all-to-all waits for the slowest rank, the rank holding the hot
  experts computes more rows, so its peers wait in dispatch and combine while Mamba and attention,
  which do the same work on every rank, stay where they were; and the aggregate columns, pooled over
  every call, move far less than the all-to-all.
- they cannot show GPU numbers: gloo moves rows through loopback TCP, not NCCL over NVLink; there is
  no kernel-launch or SM occupancy effect; 4 ranks time-share 2 cores, so a rank ready to enter a
  collective often waits for a core first and much of the wait is the scheduler's, not the load's
  (with S = 0 the waits are already milliseconds). Every rank also pays the hot experts' matmuls on
  a core the others need. Read the trend across S, not the absolute µs; on a loaded machine (other
  jobs on the same cores) the p99 columns are noisy.
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

DEFAULT = {"model": "debug-small", "skews": "0,0.5,1,2,4", "requests": 16, "batch_size": 4, "new_tokens": 16,
           "prompt_len": "16-64"}  # fmt: skip
QUICK = {"model": "debug-tiny-nemotron", "skews": "0,2", "requests": 4, "batch_size": 4, "new_tokens": 4,
         "prompt_len": "8-16"}  # fmt: skip
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


def measure(db: Path, phase: str) -> dict:
    """What one skew's trace shows in ``phase``."""
    from hybridlm.trace.report.ranks import stragglers

    with duckdb.connect(str(db), read_only=True) as con:
        [(run_id,)] = con.execute("SELECT run_id FROM runs").fetchall()

        def durations(where: str) -> list[float]:
            sql = f"SELECT duration_us FROM events WHERE run_id = ? AND phase = ? AND {where}"
            return [d for (d,) in con.execute(sql, [run_id, phase]).fetchall()]

        a2a = con.execute(
            "SELECT sum(duration_us) FROM events WHERE run_id = ? AND phase = ? AND source = 'layer' "
            "AND layer_type IN ('moe_dispatch', 'moe_combine') GROUP BY rank, step, layer",
            [run_id, phase],
        ).fetchall()
        balance = con.execute(
            "SELECT max(tokens) / avg(tokens) FROM events WHERE run_id = ? AND phase = ? AND source = 'layer' "
            "AND layer_type = 'moe_experts' GROUP BY step, layer HAVING avg(tokens) > 0",
            [run_id, phase],
        ).fetchall()
        waits = {s.layer_type: s for s in stragglers(con, run_id) if s.phase == phase}
        blocks = "source = 'layer' AND layer_type NOT IN ('moe_router', 'moe_dispatch', 'moe_experts', 'moe_combine')"
        return {
            "max_over_mean_tokens_per_rank": float(np.mean([b for (b,) in balance])),
            "a2a": stats([d for (d,) in a2a]),
            "wait_p99_us": {name: s.wait_p99_us for name, s in waits.items()},
            "layer_types": {t: stats(durations(f"source = 'layer' AND layer_type = '{t}'")) for t in OTHER_TYPES},
            "all_layers": stats(durations(blocks)),
            "step": {**stats(durations("source = 'step'")), "mean_us": float(np.mean(durations("source = 'step'")))},
        }


def us(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def tail(entry: dict) -> str:
    return "-" if entry["tail"] is None else f"{entry['tail']:.1f}x"


def print_tables(results: list[dict], phase: str) -> None:
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


def plot(results: list[dict], phase: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    skews = [r["skew"] for r in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    series = {"all-to-all (dispatch + combine)": lambda m: m["a2a"]}
    series |= {t: (lambda m, t=t: m["layer_types"][t]) for t in OTHER_TYPES}
    series |= {"all layers (aggregate)": lambda m: m["all_layers"], "step (aggregate)": lambda m: m["step"]}
    for name, pick in series.items():
        base = pick(results[0][phase])["p99_us"]
        values = [pick(r[phase])["p99_us"] / base if base else None for r in results]
        style = (
            {"linewidth": 3} if name.startswith("all-to-all") else {"linestyle": "--" if "aggregate" in name else "-"}
        )
        left.plot(skews, values, marker="o", label=name, **style)
    left.set(xlabel="routing skew S", ylabel=f"p99 / p99 at S={skews[0]:g}", title=f"{phase} p99 relative to no skew")
    left.legend(fontsize=8)
    right.plot(skews, [r[phase]["max_over_mean_tokens_per_rank"] for r in results], marker="o")
    right.set(xlabel="routing skew S", ylabel="max / mean pairs computed per rank", title="load imbalance over ranks")
    right.set_ylim(bottom=1)
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
    parser.add_argument("--out", type=Path, default=Path("bench-a2a-skew"))
    args = parser.parse_args()
    for key, value in (QUICK if args.quick else DEFAULT).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for skew in [float(s) for s in args.skews.split(",")]:
        db = args.out / f"skew-{skew:g}.duckdb"
        seconds = run_profile(args, skew, db)
        results.append({"skew": skew, "seconds": seconds, **{p: measure(db, p) for p in ("prefill", "decode")}})
        print(f"skew {skew:g}: profiled in {seconds:.1f} s", file=sys.stderr)
    setup = (f"{args.model}, {args.ranks} gloo ranks on {os.cpu_count()} CPUs, {args.requests} requests in batches "
             f"of {args.batch_size}, prompts {args.prompt_len}, {args.new_tokens} new tokens")  # fmt: skip
    (args.out / "results.json").write_text(json.dumps({"setup": setup, "results": results}, indent=2))
    plot(results, "decode", args.out / "a2a_skew.png", setup)
    print(setup)
    print_tables(results, "decode")
    print(f"\nwrote {args.out / 'results.json'} and {args.out / 'a2a_skew.png'}")


if __name__ == "__main__":
    main()
