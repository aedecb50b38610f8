"""Issue 8's GPU fast path, checked and timed in one call on a lent GPU (`run` in the device tool).

    python3 -m benchmarks.gpu_check [--device cuda] [--families nemotron_h,qwen3_next] [--new-tokens 64]
        [--repeats 3] [--modes default,reduce-overhead] [--json PATH]

Builds the two bench models from their configs (``benchmarks/configs``, written from bench_decode's
checkpoints: no transformers, no weights to carry) with random weights (seed 0), and for bf16 and fp32 on
the device:

1. prefill 1x512 and 1x2048 tokens/s, and which CUDA scan kernels ``hybridlm.ops.cuda_kernels`` chose
   (mamba_ssm's SSD, fla's gated delta rule: each after matching the plain loop there, else the torch form;
   a missing package is logged);
2. decode tokens/s at batch 1 and 8 (16-token prompts, ``--new-tokens`` greedy tokens, tokens/s without
   the prefill), eager and through ``compile_decode(mode)`` for each of ``--modes`` ("reduce-overhead" is
   the CUDA-graph one), each compiled model's check verdict, and its greedy tokens against eager.

Each timed call ends by bringing its result to the host, which waits for the device; best of
``--repeats``. Runs on CPU too (``--device cpu``: a smoke run of the script itself; the C kernels then run
the eager fp32 step). Writes everything to ``--json`` (default ``$OUT/gpu_check.json`` where ``OUT`` is
set, else out/gpu_check.json). Needs no package beyond torch and numpy; mamba-ssm and fla-core are used
where installed.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from benchmarks.bench_decode import write_json
from benchmarks.common import best_interleaved, decode_speeds, greedy_agreement, print_table, random_prompts
from hybridlm.config import HybridConfig
from hybridlm.model import HybridLM
from hybridlm.ops import cuda_kernels

CONFIGS = Path(__file__).parent / "configs"
FAMILIES = ("nemotron_h", "qwen3_next")
PROMPT = 16


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    report: dict = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "families": {},
    }
    print(f"gpu_check {report['started']} on {report['device']}, torch {report['torch']}", flush=True)
    for family in args.families:
        config = HybridConfig.from_dict(json.loads((CONFIGS / f"{family}.json").read_text()))
        for dtype in (torch.bfloat16, torch.float32):
            name = f"{family} {str(dtype).removeprefix('torch.')}"
            report["families"][name] = result = check_family(config, dtype, device, args)
            print_result(name, result)
    write_json(args.json, report)
    print(f"wrote {args.json}")


def build(config: HybridConfig, dtype: torch.dtype, device: torch.device) -> HybridLM:
    torch.manual_seed(0)
    return HybridLM(config).to(device=device, dtype=dtype).eval()


def check_family(config: HybridConfig, dtype: torch.dtype, device: torch.device, args: argparse.Namespace) -> dict:
    eager = build(config, dtype, device)
    result: dict = {"prefill tokens/s": {}, "decode tokens/s": {}, "compiled": {}}
    for length in args.prefill_lengths:
        ids = random_prompts(1, length, config.vocab_size).to(device)

        def prefill(ids: torch.Tensor = ids, length: int = length) -> None:
            with torch.inference_mode():
                eager(ids, cache=eager.new_cache(1, length), last_logits_only=True).logits.cpu()  # waits

        result["prefill tokens/s"][length] = length / best_interleaved({"prefill": prefill}, args.repeats)["prefill"]
    result["scan kernels"] = cuda_kernels.chosen()
    models = {"eager": eager}
    for mode in args.modes:
        models[mode] = build(config, dtype, device)
        models[mode].compile_decode(mode)
    for batch in (1, 8):
        ids = random_prompts(batch, PROMPT, config.vocab_size, seed=batch).to(device)
        result["decode tokens/s"][batch], tokens = decode_speeds(models, ids, args.new_tokens, args.repeats)
        for mode in args.modes:
            agree = greedy_agreement(tokens[mode], tokens["eager"])
            result["compiled"].setdefault(mode, {})[f"greedy equal to eager, batch {batch}"] = agree
    for mode in args.modes:
        result["compiled"][mode]["failure"] = models[mode].compiled_decode.failure
    return result


def print_result(name: str, result: dict) -> None:
    print(f"\n{name}: scan kernels chosen {result['scan kernels'] or 'none asked'}")
    print("prefill tokens/s: " + ", ".join(f"1x{n} {v:,.0f}" for n, v in result["prefill tokens/s"].items()))
    rows = [
        [f"decode b{b}", *(f"{v:,.1f}" for v in speeds.values())] for b, speeds in result["decode tokens/s"].items()
    ]
    print_table(["tokens/s", *next(iter(result["decode tokens/s"].values()))], rows)
    for mode, facts in result["compiled"].items():
        print(f"compile_decode({mode!r}): {facts}", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default="default,reduce-overhead", help="compile_decode modes to time")
    parser.add_argument("--prefill-lengths", default="512,2048")
    out = os.environ.get("OUT")
    parser.add_argument(
        "--json", type=Path, default=Path(out) / "gpu_check.json" if out else Path("out/gpu_check.json")
    )
    args = parser.parse_args(argv)
    args.families = [f for f in args.families.split(",") if f]
    args.modes = [m for m in args.modes.split(",") if m]
    args.prefill_lengths = [int(n) for n in args.prefill_lengths.split(",") if n]
    if any(f not in FAMILIES for f in args.families):
        parser.error(f"--families must name some of {', '.join(FAMILIES)}")
    if args.new_tokens < 2 or args.repeats < 1:
        parser.error("--new-tokens must be >= 2 and --repeats >= 1")
    return args


if __name__ == "__main__":
    main()
