"""A single-process model's decode speed, before and after expert parallelism landed (it must not change).

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.bench_ep_off [--baseline REV] [--rounds 6] [--steps 200]

The baseline revision (default: the commit before the first expert-parallel change to the model) is
checked out into a temporary git worktree; each round times ``decode_step`` of debug-small (batch 1
and 8, one thread) in a fresh process on each tree in turn, so the two share the machine's noise.
Prints the medians per tree and their ratio, and says whether ``hybridlm.distributed`` was imported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# the parent of "layers/moe: Experts.holds_all_experts", the one change expert parallelism made to the model
DEFAULT_BASELINE = "8bbecbe^"
REPOSITORY = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, sys, time, torch
torch.set_num_threads(1)
from hybridlm.loading import load_model
model = load_model("debug-small", seed=0, quiet=True)
steps = int(sys.argv[1])
out = {}
with torch.inference_mode():
    for batch in (1, 8):
        cache = model.new_cache(batch, steps + 16)
        model(torch.randint(0, 256, (batch, 8)), cache=cache)
        tokens = torch.randint(0, 256, (batch,))
        for _ in range(10):
            model.decode_step(tokens, cache)
        times = []
        for _ in range(steps - 10):
            start = time.perf_counter_ns()
            model.decode_step(tokens, cache)
            times.append(time.perf_counter_ns() - start)
        times.sort()
        out[f"batch {batch}"] = times[len(times) // 2] / 1e3
out["imports hybridlm.distributed"] = "hybridlm.distributed" in sys.modules
import hybridlm
out["source"] = hybridlm.__file__
print(json.dumps(out))
"""


def _time(tree: Path, steps: int) -> dict:
    command = [sys.executable, "-c", WORKER, str(steps)]
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "OMP_WAIT_POLICY": "PASSIVE", "HYBRIDLM_PROGRESS": "0"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=True, timeout=600)
    timings = json.loads(result.stdout.strip().splitlines()[-1])
    if not timings["source"].startswith(str(tree)):  # an editable install can win over PYTHONPATH
        raise SystemExit(f"the run meant for {tree} imported hybridlm from {timings['source']}")
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, help=f"revision to compare with ({DEFAULT_BASELINE})")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=200, help="decode steps timed per batch size and round")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hybridlm-baseline-") as tmp:
        baseline = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(REPOSITORY), "worktree", "add", "--detach", str(baseline), args.baseline],
                       check=True, capture_output=True)  # fmt: skip
        try:
            runs: dict[str, list[dict]] = {"baseline": [], "current": []}
            for _ in range(args.rounds):
                runs["baseline"].append(_time(baseline, args.steps))
                runs["current"].append(_time(REPOSITORY, args.steps))
        finally:
            subprocess.run(["git", "-C", str(REPOSITORY), "worktree", "remove", "--force", str(baseline)], check=False)
    print(f"decode_step of debug-small, 1 thread, median of {args.rounds} rounds x {args.steps - 10} steps (µs)")
    print("| batch | baseline | current | current / baseline |")
    print("|---|---|---|---|")
    for key in ("batch 1", "batch 8"):
        before = statistics.median(r[key] for r in runs["baseline"])
        after = statistics.median(r[key] for r in runs["current"])
        print(f"| {key.split()[1]} | {before:,.0f} | {after:,.0f} | {after / before:.3f} |")
    imported = any(r["imports hybridlm.distributed"] for r in runs["current"])
    print(f"hybridlm.distributed imported by a single-process model: {imported}")


if __name__ == "__main__":
    main()
