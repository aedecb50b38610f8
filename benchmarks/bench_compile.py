"""Decode speed of the compiled step (``compile_decode``) against the eager one, fp32 and bf16 weights.

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.bench_compile [--families nemotron_h,qwen3_next]
        [--new-tokens 64] [--repeats 3] [--json out/bench_compile.json]

Loads ``benchmarks.bench_decode``'s checkpoints (built there with transformers; run it first) three times:
fp32 eager, bf16 eager and bf16 compiled (and fp32 compiled with ``--fp32-compiled``), and times decode
at batch 1 and 8 interleaved, best of ``--repeats``: tokens/s = B * (N - 1) / (time(16 + N) - time(16 + 1)).
The compiled step's compilation and check run in a warm-up round first. Also prints how many greedy tokens
each agrees on with the eager step of its dtype (random weights in bf16 are chaotic: bf16 and fp32 part
within a few tokens, so this says little for bf16), and the compiled step's failure, if any.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.bench_decode import FAMILIES, MODELS_DIR, write_json
from benchmarks.common import decode_speeds, greedy_agreement, print_table, random_prompts
from hybridlm.loading import load_model

PROMPT = 16


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    report: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "torch": torch.__version__, "families": {}}
    for family in args.families:
        directory = MODELS_DIR / family
        if not (directory / "config.json").exists():
            raise SystemExit(f"{directory} holds no checkpoint: run python -m benchmarks.bench_decode first")
        variants = {
            "fp32 eager": ("float32", False),
            "bf16 eager": ("bfloat16", False),
            "bf16 compiled": ("bfloat16", True),
        }
        if args.fp32_compiled:
            variants["fp32 compiled"] = ("float32", True)
        models = {}
        for name, (dtype, compiled) in variants.items():
            models[name] = load_model(directory, quiet=True, dtype=dtype).eval()
            if compiled:
                models[name].compile_decode()
        rows = {}
        for batch in (1, 8):
            rows[f"decode b{batch}"] = time_decode(models, batch, args.new_tokens, args.repeats)
        report["families"][family] = rows
        table = [[row_name, *(f"{row[name]:.1f}" for name in models)] for row_name, row in rows.items()]
        print(f"\n{family}: decode tokens/s, {PROMPT} + {args.new_tokens} tokens, best of {args.repeats}")
        print_table(["", *models], table)
        for row_name, row in rows.items():
            print(f"{row_name}: greedy tokens equal to the eager step of the same dtype: {row['agree']}")
        print({name: m.compiled_decode.failure for name, m in models.items() if m.compiled_decode is not None})
    write_json(args.json, report)
    print(f"wrote {args.json}")


def time_decode(models: dict[str, torch.nn.Module], batch: int, new_tokens: int, repeats: int) -> dict:
    ids = random_prompts(batch, PROMPT, next(iter(models.values())).config.vocab_size, seed=batch)
    speeds, tokens = decode_speeds(models, ids, new_tokens, repeats)
    agree = {name: greedy_agreement(tokens[name], tokens[name.split()[0] + " eager"]) for name in models}
    return {**speeds, "agree": {name: a for name, a in agree.items() if name.endswith("compiled")}}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_compile", description=__doc__.split("\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated: nemotron_h,qwen3_next")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fp32-compiled", action="store_true", help="also time the compiled step on fp32 weights")
    parser.add_argument("--json", type=Path, default=Path("out/bench_compile.json"))
    args = parser.parse_args(argv)
    args.families = [f.strip() for f in args.families.split(",") if f.strip()]
    if not args.families or any(f not in FAMILIES for f in args.families):
        parser.error(f"--families must name some of {', '.join(FAMILIES)}, got {args.families!r}")
    if args.new_tokens < 2 or args.repeats < 1 or args.threads < 1:
        parser.error("--new-tokens must be >= 2, --repeats and --threads >= 1")
    return args


if __name__ == "__main__":
    main()
