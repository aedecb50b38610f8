"""One point of ``bench_scaling``, measured in a fresh process: prefill time, peak memory, decode step.

    python -m benchmarks.scaling_worker PATTERN TOKENS [--repeats N] [--decode-steps N]

Builds a random-weight model of the given pattern (debug-small's width: hidden 512, Mamba-2 16x64
heads with state 64, GQA 8/2 heads of 64, 16-expert relu2 MoE, byte vocab), then:

1. checks ``accounting.cache_bytes(config, 1, TOKENS)`` against ``model.new_cache(1, TOKENS)``
   (exit 1 with both numbers if they differ);
2. warms up (a 256-token prefill and two decode steps: oneDNN/MKL set-up is not part of any timing);
3. prefills TOKENS random tokens, batch 1, in one forward with a fresh cache under
   ``torch.inference_mode()``, ``last_logits_only=True``; best of ``--repeats`` by wall seconds,
   with that run's CPU seconds over all threads (the work done, less sensitive to other load), its
   kernel (sys) share and its minor page faults (first touches of freshly mapped memory);
4. peak memory: the kernel's high-water mark of resident memory (VmHWM) is reset just before the
   first prefill (``echo 5 > /proc/self/clear_refs``); the number reported is VmHWM after the
   prefills minus VmRSS before the cache was allocated: the cache plus everything the forward held
   at its peak. A fresh process per point keeps earlier, larger points from hiding in the baseline;
5. decode: ``--decode-steps`` single-token steps continuing the prefilled sequence (context TOKENS,
   TOKENS+1, ...), each timed alone; the median is reported.

The cache is allocated for TOKENS plus the decode steps, so that one prefill serves both
measurements; those ~20 extra positions change neither time nor memory measurably.
Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import time
from pathlib import Path

import torch

import hybridlm
from hybridlm import HybridLM, get_preset
from hybridlm.accounting import cache_bytes
from hybridlm.config import HybridConfig

WARMUP_TOKENS = 256
WARMUP_DECODE_STEPS = 2


def scaling_config(pattern: str, max_len: int) -> HybridConfig:
    """debug-small's width and blocks with another pattern (same width for every pattern)."""
    return get_preset(
        "debug-small",
        name=f"scaling-{pattern}",
        pattern=pattern,
        max_position_embeddings=max(8192, max_len),
    )


def _status_bytes(field: str) -> int:
    """A ``kB`` line of /proc/self/status (VmRSS, VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} line")


def _reset_peak_rss() -> None:
    """Set VmHWM back to the current RSS (Linux >= 4.0: clear_refs value 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def check_cache_accounting(model: HybridLM, tokens: int) -> dict[str, int]:
    """accounting.cache_bytes must equal the bytes of a real cache, kind by kind; returns them."""
    predicted = cache_bytes(model.config, 1, tokens, model.dtype).to_dict()
    real = model.new_cache(1, tokens).bytes_by_kind()
    real["total"] = sum(real.values())
    if predicted != real:
        raise SystemExit(
            f"cache accounting disagrees for pattern {model.config.pattern!r} at {tokens} tokens: "
            f"accounting.cache_bytes {predicted} != new_cache().bytes_by_kind() {real}"
        )
    return real


def _timed_forward(model: HybridLM, ids: torch.Tensor, cache: object) -> tuple[dict[str, float], torch.Tensor]:
    """Costs of one forward (wall seconds; this process's user and kernel CPU seconds over all threads;
    minor page faults) and its last logits."""
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    logits = model(ids, cache=cache, last_logits_only=True).logits
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    costs = {
        "seconds": seconds,
        "user_seconds": after.ru_utime - before.ru_utime,
        "sys_seconds": after.ru_stime - before.ru_stime,
        "minor_faults": after.ru_minflt - before.ru_minflt,
    }
    return costs, logits


def measure(pattern: str, tokens: int, repeats: int, decode_steps: int) -> dict:
    max_len = tokens + WARMUP_DECODE_STEPS + decode_steps
    torch.manual_seed(0)
    model = HybridLM(scaling_config(pattern, max_len)).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, tokens))
    cache_sizes = check_cache_accounting(model, tokens)

    with torch.inference_mode():
        warm_cache = model.new_cache(1, WARMUP_TOKENS + WARMUP_DECODE_STEPS)
        logits = model(ids[:, :WARMUP_TOKENS], cache=warm_cache, last_logits_only=True).logits
        for _ in range(WARMUP_DECODE_STEPS):
            logits = model(logits.argmax(-1), cache=warm_cache).logits
        del warm_cache, logits
        gc.collect()

        rss_before = _status_bytes("VmRSS")
        _reset_peak_rss()
        prefills = []
        cache = None
        for _ in range(repeats):
            cache = None  # free the previous cache before allocating the next
            cache = model.new_cache(1, max_len)
            costs, logits = _timed_forward(model, ids, cache)
            prefills.append(costs)
        peak_rss = _status_bytes("VmHWM")
        best = min(prefills, key=lambda costs: costs["seconds"])

        token = logits.argmax(-1)
        decode_seconds = []
        for step in range(WARMUP_DECODE_STEPS + decode_steps):
            costs, logits = _timed_forward(model, token, cache)
            token = logits.argmax(-1)
            if step >= WARMUP_DECODE_STEPS:
                decode_seconds.append(costs["seconds"])

    return {
        "pattern": pattern,
        "tokens": tokens,
        "hybridlm": str(Path(hybridlm.__file__).parent),
        "torch": torch.__version__,
        "params": model.num_parameters(),
        "threads": torch.get_num_threads(),
        "prefill_seconds": best["seconds"],
        "prefill_samples": [costs["seconds"] for costs in prefills],
        "prefill_cpu_seconds": best["user_seconds"] + best["sys_seconds"],
        "prefill_sys_seconds": best["sys_seconds"],
        "prefill_minor_faults": best["minor_faults"],
        "rss_before_cache_bytes": rss_before,
        "peak_rss_bytes": peak_rss,
        "prefill_peak_extra_bytes": peak_rss - rss_before,
        "cache_bytes": cache_sizes,
        "decode_step_seconds": statistics.median(decode_seconds),
        "decode_samples": decode_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pattern")
    parser.add_argument("tokens", type=int)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--decode-steps", type=int, default=16)
    args = parser.parse_args()
    if args.tokens < WARMUP_TOKENS or args.repeats < 1 or args.decode_steps < 1:
        parser.error(f"need tokens >= {WARMUP_TOKENS}, repeats >= 1, decode-steps >= 1")
    print(json.dumps(measure(args.pattern, args.tokens, args.repeats, args.decode_steps)))


if __name__ == "__main__":
    main()
