"""How prefill, decode and cache memory grow with context, for attention-free, 1-in-8 and pure attention.

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.bench_scaling [--max-tokens 16384] [--quick]
        [--json out/bench_scaling.json] [--plot out/bench_scaling.png] [--decode-steps 16]

Three random-weight models of debug-small's width (hidden 512, 16 blocks, 16-expert MoE in every
other block, byte vocab) that differ only in their sequence mixers:

    attention-free    MEMEMEMEMEMEMEME   8 Mamba-2 mixers
    1-in-8 attention  MEMEME*EMEMEMEME   7 Mamba-2 + 1 attention
    pure attention    *E*E*E*E*E*E*E*E   8 attention mixers

For each pattern and each prompt length (512, 1K, ... up to --max-tokens; batch 1) one fresh
process (``benchmarks.scaling_worker``, see its docstring for the exact method) measures:
prefill seconds (one forward over the whole prompt with a fresh cache, best of 3 up to 2K tokens,
else 1), the peak resident memory the prefill added (VmHWM, cache included), the median
single-token decode step at that context, and the cache bytes (``accounting.cache_bytes``,
checked equal to the real cache's ``bytes_by_kind``). This parent imports no torch.

Linearity check (issue 8): attention-free prefill wall time at 16K / at 2K <= 9 (8x tokens, at most
9x time), and at 8K / at 1K; the CPU-time ratio is printed beside it, as a shared machine's load
moves wall time more. ``--quick`` stops at 2K tokens (a smoke run). Prints tables, writes JSON and a
three-panel plot (both written to a temporary name, then renamed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import print_table

PATTERNS = {
    "attention-free": "MEMEMEMEMEMEMEME",
    "1-in-8 attention": "MEMEME*EMEMEMEME",
    "pure attention": "*E*E*E*E*E*E*E*E",
}
MIN_TOKENS = 512
QUICK_MAX_TOKENS = 2048
REPEAT_UP_TO = 2048  # prefills up to this length are timed 3 times (best of 3), longer ones once
LINEARITY_CHECKS = [(2048, 16384), (1024, 8192)]  # (short, 8x longer)
MAX_TIME_RATIO = 9.0
MIB = 2**20


def token_sizes(max_tokens: int) -> list[int]:
    """512, 1024, ... doubling while <= max_tokens."""
    if max_tokens < MIN_TOKENS:
        raise ValueError(f"--max-tokens must be at least {MIN_TOKENS}, got {max_tokens}")
    sizes = [MIN_TOKENS]
    while sizes[-1] * 2 <= max_tokens:
        sizes.append(sizes[-1] * 2)
    return sizes


def run_point(pattern: str, tokens: int, decode_steps: int) -> dict:
    """One worker process; {'error': ..., 'command': ...} if it fails, else its measurements."""
    repeats = 3 if tokens <= REPEAT_UP_TO else 1
    command = [sys.executable, "-m", "benchmarks.scaling_worker", pattern, str(tokens)]
    command += ["--repeats", str(repeats), "--decode-steps", str(decode_steps)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        tail = "\n".join(result.stderr.strip().splitlines()[-6:])
        return {"error": f"exit {result.returncode}: {tail}", "command": " ".join(command)}
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure_all(sizes: list[int], decode_steps: int) -> dict[str, dict[int, dict]]:
    """results[pattern name][tokens]; sizes outside, patterns inside, so load drifts hit all alike."""
    results: dict[str, dict[int, dict]] = {name: {} for name in PATTERNS}
    for tokens in sizes:
        for name, pattern in PATTERNS.items():
            start = time.perf_counter()
            point = run_point(pattern, tokens, decode_steps)
            results[name][tokens] = point
            if tokens == sizes[0] and name == next(iter(PATTERNS)) and "error" not in point:
                print(f"  hybridlm from {point['hybridlm']}, torch {point['torch']}, {point['threads']} threads")
            status = "FAILED" if "error" in point else f"prefill {point['prefill_seconds']:.2f} s"
            print(f"  {name:>16} {tokens:>6} tokens: {status} ({time.perf_counter() - start:.0f} s)", flush=True)
    return results


def linearity_checks(results: dict[str, dict[int, dict]]) -> list[dict]:
    """Attention-free prefill time ratios for 8x the tokens, where both sizes were measured."""
    points = results["attention-free"]
    checks = []
    for short, long in LINEARITY_CHECKS:
        if short in points and long in points and "error" not in points[short] and "error" not in points[long]:
            ratio = points[long]["prefill_seconds"] / points[short]["prefill_seconds"]
            cpu_ratio = points[long]["prefill_cpu_seconds"] / points[short]["prefill_cpu_seconds"]
            passed = ratio <= MAX_TIME_RATIO
            checks.append({"short": short, "long": long, "ratio": ratio, "cpu_ratio": cpu_ratio, "passed": passed})
    return checks


def _cell(point: dict, key: str, scale: float, digits: int) -> str:
    return "FAILED" if "error" in point else f"{point[key] * scale:.{digits}f}"


def print_tables(results: dict[str, dict[int, dict]], sizes: list[int]) -> None:
    names = list(PATTERNS)
    tables = [
        ("Prefill, wall seconds (batch 1, one forward)", "prefill_seconds", 1.0, 2),
        ("Prefill, CPU seconds of the process, all threads (user + sys)", "prefill_cpu_seconds", 1.0, 2),
        ("Prefill, kernel (sys) CPU seconds: mostly page faults", "prefill_sys_seconds", 1.0, 2),
        ("Prefill, minor page faults, thousands", "prefill_minor_faults", 1e-3, 0),
        ("Prefill peak extra resident memory, MiB (cache + activations)", "prefill_peak_extra_bytes", 1 / MIB, 0),
        ("Decode step at that context, ms (median)", "decode_step_seconds", 1000.0, 1),
    ]
    for title, key, scale, digits in tables:
        print(f"\n{title}")
        rows = [[t, *(_cell(results[n][t], key, scale, digits) for n in names)] for t in sizes]
        print_table(["tokens", *names], rows)
    print("\nPrefill tokens/s")
    rows = []
    for t in sizes:
        row = [t]
        for n in names:
            point = results[n][t]
            row.append("FAILED" if "error" in point else f"{t / point['prefill_seconds']:.0f}")
        rows.append(row)
    print_table(["tokens", *names], rows)
    print("\nCache bytes per sequence, MiB (KV + conv + recurrent; accounting == real cache)")
    rows = [[t, *(_cache_cell(results[n][t]) for n in names)] for t in sizes]
    print_table(["context", *names], rows)


def _cache_cell(point: dict) -> str:
    if "error" in point:
        return "FAILED"
    c = point["cache_bytes"]
    return f"{c['total'] / MIB:.2f} (kv {c['kv'] / MIB:.1f})"


def _write_atomically(path: Path, write: object) -> None:
    """Call write(temp_path) on a temporary file beside ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    os.chmod(temp, 0o644)  # mkstemp creates 0600; results are meant to be shared
    try:
        write(Path(temp))  # type: ignore[operator]
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def write_plot(results: dict[str, dict[int, dict]], sizes: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, NullLocator, ScalarFormatter

    fig, (ax_prefill, ax_decode, ax_cache) = plt.subplots(1, 3, figsize=(16, 4.8))
    for name in PATTERNS:
        ok = [(t, p) for t, p in sorted(results[name].items()) if "error" not in p]
        x = [t for t, _ in ok]
        (line,) = ax_prefill.plot(x, [p["prefill_seconds"] for _, p in ok], "o-", label=f"{name} (wall)")
        cpu = [p["prefill_cpu_seconds"] for _, p in ok]
        ax_prefill.plot(x, cpu, "x--", color=line.get_color(), alpha=0.6, label=f"{name} (CPU, all threads)")
        ax_decode.plot(x, [p["decode_step_seconds"] * 1000 for _, p in ok], "o-", label=name)
        ax_cache.plot(x, [p["cache_bytes"]["total"] / MIB for _, p in ok], "o-", label=name)
    free = [(t, p) for t, p in sorted(results["attention-free"].items()) if "error" not in p]
    if free:
        t0, p0 = free[0]
        ax_prefill.plot(sizes, [p0["prefill_seconds"] * t / t0 for t in sizes], "k:", label="linear (from first point)")
    ax_prefill.set(yscale="log", xlabel="prompt tokens", ylabel="prefill seconds", title="Prefill (log-log)")
    ax_decode.set(xlabel="context tokens", ylabel="ms per decode step", title="Decode step (batch 1)")
    ax_decode.set_ylim(bottom=0)
    ax_cache.set(yscale="log", xlabel="context tokens", ylabel="MiB per sequence", title="KV + state cache")
    for ax in (ax_prefill, ax_decode, ax_cache):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [f"{t // 1024}K" if t >= 1024 else str(t) for t in sizes])
        ax.xaxis.set_minor_locator(NullLocator())
        if ax.get_yscale() == "log":
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("hybridlm scaling, hidden 512, 16 blocks, fp32, batch 1, CPU")
    fig.tight_layout()
    _write_atomically(path, lambda temp: fig.savefig(temp, dpi=110, format=path.suffix.lstrip(".") or "png"))
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--quick", action="store_true", help=f"stop at {QUICK_MAX_TOKENS} tokens (smoke run)")
    parser.add_argument("--decode-steps", type=int, default=16, help="timed decode steps per context (median)")
    parser.add_argument("--json", type=Path, help="write all measurements here")
    parser.add_argument("--plot", type=Path, help="write the three-panel plot here (.png, .pdf, .svg)")
    args = parser.parse_args()
    max_tokens = min(args.max_tokens, QUICK_MAX_TOKENS) if args.quick else args.max_tokens
    try:
        sizes = token_sizes(max_tokens)
    except ValueError as error:
        parser.error(str(error))
    if args.decode_steps < 1:
        parser.error(f"--decode-steps must be at least 1, got {args.decode_steps}")
    if os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        print("warning: OMP_WAIT_POLICY is not PASSIVE; spinning threads distort timings on a shared machine")

    started = time.perf_counter()
    print(f"sizes {sizes}, patterns {', '.join(f'{n} {p}' for n, p in PATTERNS.items())}", flush=True)
    results = measure_all(sizes, args.decode_steps)
    print_tables(results, sizes)

    checks = linearity_checks(results)
    print()
    for check in checks:
        verdict = "PASS" if check["passed"] else "FAIL"
        print(
            f"linearity {verdict}: attention-free prefill {check['long']} / {check['short']} tokens = "
            f"{check['ratio']:.2f}x wall time for 8x tokens (limit {MAX_TIME_RATIO:g}x; "
            f"CPU time {check['cpu_ratio']:.2f}x)"
        )
    if not checks:
        print("linearity check skipped: needs attention-free prefill at 2K and 16K (or 1K and 8K)")

    failures = [
        {"pattern": n, "tokens": t, **p} for n, points in results.items() for t, p in points.items() if "error" in p
    ]
    for failure in failures:
        print(f"FAILED {failure['pattern']} at {failure['tokens']} tokens: {failure['command']}\n{failure['error']}")
    elapsed = time.perf_counter() - started
    print(f"\ntotal {elapsed:.0f} s")

    if args.json:
        report = {
            "patterns": PATTERNS,
            "sizes": sizes,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "results": {n: {str(t): p for t, p in points.items()} for n, points in results.items()},
            "linearity": checks,
            "failures": failures,
            "seconds": elapsed,
        }
        _write_atomically(args.json, lambda temp: temp.write_text(json.dumps(report, indent=2) + "\n"))
        print(f"wrote {args.json}")
    if args.plot:
        write_plot(results, sizes, args.plot)
        print(f"wrote {args.plot}")
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
