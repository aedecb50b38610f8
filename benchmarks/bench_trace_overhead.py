"""Cost of the Tracer on decode of debug-small: traced vs untraced steps, interleaved, one run.

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.bench_trace_overhead [--threads 1] [--steps 200]

The target is at most 2% on decode. Untraced and traced decode steps alternate in blocks so that
machine noise falls on both alike; the median step times are compared.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from hybridlm import HybridLM, get_preset
from hybridlm.trace.recorder import Tracer
from hybridlm.trace.store import TraceStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=200, help="decode steps per mode")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = HybridLM(get_preset("debug-small")).eval()
    block = 20  # steps per mode before switching
    samples: dict[str, list[float]] = {"untraced": [], "traced": []}
    with tempfile.TemporaryDirectory() as tmp, TraceStore(Path(tmp) / "t.duckdb") as store, torch.no_grad():
        tracer = Tracer(store, model="debug-small")
        cache = model.new_cache(args.batch_size, 32 + 5 + 2 * (args.steps + block))  # room for every step
        model(torch.zeros(args.batch_size, 32, dtype=torch.long), cache=cache)
        token = torch.zeros(args.batch_size, 1, dtype=torch.long)
        for _ in range(5):
            model(token, cache=cache)
        while len(samples["traced"]) < args.steps:
            for mode in ("untraced", "traced"):
                if mode == "traced":
                    tracer.attach(model)
                for _ in range(block):
                    start = time.perf_counter_ns()
                    model(token, cache=cache)
                    samples[mode].append((time.perf_counter_ns() - start) / 1e3)
                tracer.detach()
        tracer.close()
    untraced, traced = statistics.median(samples["untraced"]), statistics.median(samples["traced"])
    blocks = len(get_preset("debug-small").pattern)
    print(f"debug-small decode, batch {args.batch_size}, {args.threads} thread(s), {args.steps} steps per mode")
    print(f"| mode | median step µs |\n|---|---|\n| untraced | {untraced:,.0f} |\n| traced | {traced:,.0f} |")
    print(f"overhead: {100 * (traced / untraced - 1):+.2f}% ({(traced - untraced) / blocks:+.1f} µs per block call)")


if __name__ == "__main__":
    main()
