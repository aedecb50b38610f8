"""Cost of the engine's BlockTimer (hybridlm:block_seconds, expert counts) on decode of debug-small.

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.bench_block_timer [--threads 1] [--steps 400] [--device cpu]

The timer is meant to stay on while serving, so its cost on the cheapest step there is (one decode
token per slot, ``model.decode_step``) is what counts. Steps without and with the timer alternate in
rounds of ``--round`` steps, the order of the modes flipping every round, so machine noise falls on
every mode alike; median step times are compared. A no-op observer separates what any observer
costs the model (the hook calls, the views it passes) from the timer's own work. On CUDA a third mode times with
``synchronize=True`` (true block times, at the price of a device sync per block), and every step
ends with a synchronisation so that the step time is the device's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import print_table, random_prompts
from hybridlm import HybridLM, get_preset
from hybridlm.engine.metrics import BlockTimer, EngineMetrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=400, help="decode steps per mode")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--round", type=int, default=10, help="steps per mode before switching")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = HybridLM(get_preset("debug-small")).to(device).eval()
    metrics = EngineMetrics("debug-small", model.config)
    timers = {"off": None, "no-op observer": NoOpObserver(), "timer": metrics.block_timer()}
    if device.type == "cuda":
        timers["timer, synchronize"] = metrics.block_timer(synchronize=True)
    for timer in timers.values():
        if isinstance(timer, BlockTimer):
            timer.phase = "decode"

    prompt_len, warmup = 16, 10
    num_steps = warmup + len(timers) * (args.steps + args.round)
    cache = model.new_cache(args.batch_size, prompt_len + num_steps + 1)
    samples: dict[str, list[float]] = {mode: [] for mode in timers}
    with torch.no_grad():
        model(random_prompts(args.batch_size, prompt_len, model.config.vocab_size).to(device), cache)
        token_ids = torch.full((args.batch_size,), 7, dtype=torch.long, device=device)
        for _ in range(warmup):
            model.decode_step(token_ids, cache)
        order = list(timers)
        while min(len(s) for s in samples.values()) < args.steps:
            for mode in order:
                model.block_observer = timers[mode]
                for _ in range(args.round):
                    samples[mode].append(_timed_step(model, token_ids, cache, device))
            order.reverse()
        model.block_observer = None

    per_call_us = _hook_cost_us(metrics, model, device)
    start = time.perf_counter()
    body, _ = metrics.render()
    render_ms = (time.perf_counter() - start) * 1e3

    medians = {mode: statistics.median(s) for mode, s in samples.items()}
    blocks = len(model.config.pattern)
    print(f"debug-small decode_step on {device}, batch {args.batch_size}, {args.threads} thread(s), "
          f"{args.steps} steps per mode, interleaved in rounds of {args.round}")  # fmt: skip
    rows = []
    for mode, median in medians.items():
        extra_us = (median - medians["off"]) * 1e6
        rows.append([mode, f"{median * 1e6:,.0f}", f"{100 * (median / medians['off'] - 1):+.2f}%",
                     f"{extra_us / blocks:+.2f}"])  # fmt: skip
    print_table(["mode", "median step µs", "vs off", "µs per block call"], rows)
    print(f"the hooks alone, called in a loop as a forward calls them: {per_call_us:.2f} µs per block call "
          f"({per_call_us * blocks:.0f} µs per step of {blocks} blocks)")  # fmt: skip
    print(f"one scrape (render of {len(body):,} bytes, binning the pending block times): {render_ms:.1f} ms")


class NoOpObserver:
    """What any observer costs the model (the hook calls and the views it passes), the timer's work aside."""

    def before_block(self, index: int, layer_type: str, hidden: torch.Tensor) -> None:
        pass

    def after_block(self, index: int, layer_type: str, hidden: torch.Tensor, routing_counts: torch.Tensor | None):
        pass


def _hook_cost_us(metrics: EngineMetrics, model: HybridLM, device: torch.device, forwards: int = 2000) -> float:
    """Mean µs of before_block + after_block per block, with the real routing counts of MoE blocks."""
    timer = metrics.block_timer()
    timer.phase = "decode"
    hidden = torch.zeros(1, 1, model.config.hidden_size, device=device)
    counts = torch.ones(model.config.moe.num_experts, dtype=torch.int64, device=device)
    calls = [(block.index, block.layer_type, counts if block.routes_experts else None) for block in model.layers]
    start = time.perf_counter()
    for _ in range(forwards):
        for index, layer_type, routing_counts in calls:
            timer.before_block(index, layer_type, hidden)
            timer.after_block(index, layer_type, hidden, routing_counts)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e6 / (forwards * len(calls))


def _timed_step(model: HybridLM, token_ids: torch.Tensor, cache, device: torch.device) -> float:
    start = time.perf_counter()
    model.decode_step(token_ids, cache)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
