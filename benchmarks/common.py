"""Timing helpers for the benchmarks: interleaved repeats, medians, a plain table."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def median_time(fn: Callable[[], object], repeats: int = 7, warmup: int = 1) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int = 7) -> dict[str, float]:
    """Median seconds of each function, timed in alternation so machine noise hits all alike."""
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def best_interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Fastest seconds of each function over ``repeats`` rounds, alternating so machine noise hits all alike."""
    for fn in fns.values():
        fn()  # warm-up: first-call allocations, lazy inits, compilation
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def decode_speeds(
    models: dict[str, torch.nn.Module], ids: torch.Tensor, new_tokens: int, repeats: int
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Each hybridlm model's decode tokens/s without the prefill, B * (N - 1) / (time(prompt + N) -
    time(prompt + 1)), best of ``repeats`` interleaved; and the N tokens each generated greedily. The tokens
    are brought to the host inside the timed call, which waits for the device."""
    from hybridlm.generation import generate

    prompt = ids.shape[1]
    tokens: dict[str, torch.Tensor] = {}

    def run(name: str, model: torch.nn.Module, n: int) -> None:
        out = generate(model, ids, max_new_tokens=n)[:, prompt:].cpu()
        if out.shape != (ids.shape[0], n):
            raise RuntimeError(f"{name} generated {tuple(out.shape)} new tokens, asked for {n}")
        if n == new_tokens:
            tokens[name] = out

    fns = {}
    for name, model in models.items():
        fns[f"{name}_1"] = lambda name=name, model=model: run(name, model, 1)
        fns[f"{name}_n"] = lambda name=name, model=model: run(name, model, new_tokens)
    seconds = best_interleaved(fns, repeats)
    batch = ids.shape[0]
    speeds = {name: batch * (new_tokens - 1) / (seconds[f"{name}_n"] - seconds[f"{name}_1"]) for name in models}
    return speeds, tokens


def greedy_agreement(actual: torch.Tensor, expected: torch.Tensor) -> str:
    """ "k/N": the leading k of N generated tokens on which every row of ``actual`` equals ``expected``."""
    return f"{int((actual == expected).all(0).cumprod(0).sum())}/{expected.shape[1]}"


def random_prompts(batch: int, length: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    """[batch, length] token ids, away from the low ids that checkpoints use for special tokens."""
    import torch  # here, not at the top: bench_scaling's parent process imports no torch

    return torch.randint(3, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def print_table(headers: list[str], rows: list[list[object]]) -> None:
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print(
            "| "
            + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
            + " |"
        )
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
