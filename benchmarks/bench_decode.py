"""Prefill and decode speed of hybridlm against transformers (and llama.cpp) on the same weights, with rooflines.

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.bench_decode [--families nemotron_h,qwen3_next]
        [--repeats N] [--quick] [--json out/bench_decode.json] [--threads 2] [--llama-cpp auto|off]
        [--compile]

1. Measures the machine (``benchmarks.roofline``): copy, read and fp32 GEMV bandwidth, SGEMM rate,
   before and after each family's timings, keeping the best of the two (on a shared machine the
   ceilings move with the load; the best seen is the ceiling).
2. Per family: builds the ~110M checkpoint with transformers (``benchmarks.hf_models``, cached under
   ``out/bench_models/FAMILY``), loads it into hybridlm and checks the logits of a 16-token prompt agree.
3. Times hybridlm and transformers interleaved in this process, best of ``--repeats`` runs: prefill
   1x512 and 1x2048 (last logits only), decode at batch 1 and 8 (16-token random prompts, 128 greedy
   tokens, EOS off; tokens/s = B * 127 / (time(16+128) - time(16+1)), so the prefill cancels out),
   ``generate`` end to end (batch 1, 16 + 128). Rooflines: decode, weights read per step (the routed
   experts actually touched, recorded from hybridlm's MoE blocks) / GEMV bandwidth; prefill, FLOPs /
   SGEMM rate.
4. With ``--llama-cpp auto`` and llama-cpp-python installed (in this python or in
   ``/work/llamacpp/venv``), converts the checkpoint to an f32 GGUF with llama.cpp's own converter and
   times prefill and decode at batch 1 and 8 in a subprocess through its low-level batch API.
5. With ``--compile``, a second copy of the model with ``compile_decode()`` is timed beside the others at
   decode (column "compiled"; its compilation and check happen in the warm-up round, not in the timings).

Prints one table per family and writes everything to the JSON file (default ``out/bench_decode.json``).
``--quick`` is a smoke run (short lengths, two repeats): its numbers mean little.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks import roofline
from benchmarks.common import best_interleaved, greedy_agreement, print_table, random_prompts
from benchmarks.llama_cpp import bench_llama_cpp, find_llama_cpp, merge_llama_cpp
from hybridlm.generation import generate
from hybridlm.loading import load_model

FAMILIES = ("nemotron_h", "qwen3_next")
MODELS_DIR = Path("out/bench_models")
PARITY_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Settings:
    prefill_lengths: tuple[int, ...]
    decode_batches: tuple[int, ...]
    prompt_len: int
    new_tokens: int
    repeats: int
    machine_repeats: int

    @classmethod
    def from_args(cls, quick: bool, repeats: int | None) -> Settings:
        if quick:
            return cls((128,), (1, 2), 16, 16, repeats or 2, 3)
        return cls((512, 2048), (1, 8), 16, 128, repeats or 3, 10)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.flush_denormals:  # before torch starts its threads, which inherit the mode
        torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    settings = Settings.from_args(args.quick, args.repeats)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    print(f"bench_decode {started}: {settings}", flush=True)

    llama_python, llama_reason = find_llama_cpp(args.llama_cpp)
    if llama_python is None:
        print(f"llama.cpp: skipped ({llama_reason})", flush=True)

    results = {}
    for family in args.families:
        results[family] = bench_family(family, settings, llama_python, llama_reason, args.compile)
        print_family(family, results[family])

    report = {
        "started": started,
        "command": " ".join([sys.executable, "-m", "benchmarks.bench_decode", *(argv or sys.argv[1:])]),
        "torch": torch.__version__,
        "flush_denormals": args.flush_denormals,
        "settings": asdict(settings),
        "families": results,
    }
    write_json(args.json, report)
    print(f"wrote {args.json}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_decode", description=__doc__.split("\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated: nemotron_h,qwen3_next")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement, the best kept")
    parser.add_argument("--quick", action="store_true", help="a smoke run: short lengths, two repeats")
    parser.add_argument("--json", type=Path, default=Path("out/bench_decode.json"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llama-cpp", choices=("auto", "off"), default="auto")
    parser.add_argument("--compile", action="store_true", help="also time decode with compile_decode()")
    parser.add_argument(
        "--flush-denormals",
        action="store_true",
        help="run every thread with subnormals flushed to zero from the start, transformers included "
        "(hybridlm's CPU forward flushes them itself)",
    )
    args = parser.parse_args(argv)
    args.families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in args.families if f not in FAMILIES]
    if unknown or not args.families:
        parser.error(f"--families must name some of {', '.join(FAMILIES)}, got {args.families!r}")
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    return args


# ----------------------------------------------------------------------------------------------
# One family: load, check, time


def bench_family(
    family: str, settings: Settings, llama_python: Path | None, llama_reason: str, with_compiled: bool
) -> dict:
    import transformers

    from benchmarks.hf_models import build_and_save  # builds with transformers, which only this part needs

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    directory = MODELS_DIR / family
    hf = build_and_save(family, directory)
    hf.generation_config.eos_token_id = None  # EOS off: every run generates exactly the tokens asked
    model = load_model(directory, quiet=True)
    model.eval()
    parity = max_logit_difference(hf, model)
    print(f"{family}: hybridlm vs transformers logits, 16 tokens: max |diff| = {parity:.2e}", flush=True)
    if not parity <= PARITY_TOLERANCE:
        raise SystemExit(f"{family}: logits differ by {parity:.2e} > {PARITY_TOLERANCE:g}; not timing a wrong model")

    compiled = None
    if with_compiled:
        compiled = load_model(directory, quiet=True).eval()
        compiled.compile_decode()
    counts = roofline.weight_counts(model)
    before = roofline.measure_machine(settings.machine_repeats)
    print(f"before: {before.summary()}", flush=True)
    rows: dict[str, dict] = {}
    for length in settings.prefill_lengths:
        rows[f"prefill 1x{length}"] = time_prefill(hf, model, length, settings.repeats)
    generated: dict[int, dict] = {}
    for batch in settings.decode_batches:
        decode, generated[batch] = time_decode(hf, model, batch, settings, counts, compiled)
        rows[f"decode b{batch}"] = decode
    rows[f"generate e2e 1x{settings.prompt_len}+{settings.new_tokens} (s)"] = {
        **generated[1]["seconds"],
        "kind": "generate",
        "unit": "s",
    }
    after = roofline.measure_machine(settings.machine_repeats)
    print(f"after: {after.summary()}", flush=True)
    machine = roofline.best_of([before, after])
    add_rooflines(rows, model, machine, settings)
    result = {
        "machine": machine.to_dict(),
        "machine_summary": machine.summary(),
        "machine_measurements": [before.to_dict(), after.to_dict()],
        "checkpoint": str(directory),
        "parameters": sum(p.numel() for p in model.parameters()),
        "logits_max_abs_diff": parity,
        "weights": counts.to_dict(),
        "rows": rows,
        "greedy_tokens_agree": generated[1]["tokens_agree"],
    }
    if llama_python is None:
        result["llama_cpp"] = {"skipped": llama_reason}
    else:
        result["llama_cpp"] = bench_llama_cpp(
            llama_python, directory, family, settings, model.config.vocab_size, generated[1]["tokens"]
        )
        merge_llama_cpp(rows, result["llama_cpp"], settings)
    return result


def max_logit_difference(hf: torch.nn.Module, model: torch.nn.Module) -> float:
    ids = random_prompts(1, 16, model.config.vocab_size, seed=1)
    with torch.inference_mode():
        expected = hf(ids).logits
        actual = model(ids).logits
    return float((expected - actual).abs().max())


def time_prefill(hf: torch.nn.Module, model: torch.nn.Module, length: int, repeats: int) -> dict:
    ids = random_prompts(1, length, model.config.vocab_size)

    def hybridlm_prefill() -> None:
        with torch.inference_mode():
            model(ids, cache=model.new_cache(1, length), last_logits_only=True)

    def transformers_prefill() -> None:
        with torch.inference_mode():
            hf(ids, use_cache=True, logits_to_keep=1)

    seconds = best_interleaved({"transformers": transformers_prefill, "hybridlm": hybridlm_prefill}, repeats)
    row = {name: length / s for name, s in seconds.items()}
    row.update(kind="prefill", unit="tokens/s", tokens=length, seconds=seconds)
    return row


def transformers_generate(hf: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    with torch.inference_mode():
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            use_cache=True,
        )
    if out.shape != (ids.shape[0], ids.shape[1] + new_tokens):
        raise RuntimeError(f"transformers generated {tuple(out.shape)}, asked for {ids.shape[1]} + {new_tokens}")
    return out


def hybridlm_generate(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    out = generate(model, ids, max_new_tokens=new_tokens)
    if out.shape != (ids.shape[0], ids.shape[1] + new_tokens):
        raise RuntimeError(f"hybridlm generated {tuple(out.shape)}, asked for {ids.shape[1]} + {new_tokens}")
    return out


def time_decode(
    hf: torch.nn.Module,
    model: torch.nn.Module,
    batch: int,
    settings: Settings,
    counts: roofline.WeightCounts,
    compiled: torch.nn.Module | None = None,
) -> tuple[dict, dict]:
    """Decode tokens/s without the prefill: B * (N - 1) tokens / (time(prompt + N) - time(prompt + 1))."""
    ids = random_prompts(batch, settings.prompt_len, model.config.vocab_size, seed=batch)
    n = settings.new_tokens
    transformers_out: list[torch.Tensor] = []
    compiled_out: list[torch.Tensor] = []
    runs = {
        "transformers_1": lambda: transformers_generate(hf, ids, 1),
        "transformers_n": lambda: transformers_out.append(transformers_generate(hf, ids, n)),
        "hybridlm_1": lambda: hybridlm_generate(model, ids, 1),
        "hybridlm_n": lambda: hybridlm_generate(model, ids, n),
    }
    if compiled is not None:
        runs["compiled_1"] = lambda: hybridlm_generate(compiled, ids, 1)
        runs["compiled_n"] = lambda: compiled_out.append(hybridlm_generate(compiled, ids, n))
    seconds = best_interleaved(runs, settings.repeats)
    touched, source, hybridlm_out = experts_touched_per_step(model, hf, ids, n)
    weight_bytes = counts.decode_bytes(touched)
    names = ("transformers", "hybridlm", "compiled") if compiled is not None else ("transformers", "hybridlm")
    row: dict = {name: batch * (n - 1) / (seconds[f"{name}_n"] - seconds[f"{name}_1"]) for name in names}
    row.update(
        kind="decode",
        unit="tokens/s",
        batch=batch,
        weight_bytes_per_step=weight_bytes,
        experts_touched_per_block=touched,
        experts_touched_source=source,
        experts_touched_if_uniform=roofline.expected_distinct_experts(
            counts.num_experts, counts.experts_per_token, batch
        ),
        state_bytes_per_step=roofline.state_bytes_per_step(model, batch),
        seconds=seconds,
    )
    prompt = settings.prompt_len
    ours, theirs = hybridlm_out[:, prompt:], transformers_out[-1][:, prompt:]
    if compiled is not None:
        row["compiled_tokens_agree"] = greedy_agreement(compiled_out[-1][:, prompt:], ours)
        row["compiled_failure"] = compiled.compiled_decode.failure
    generated = {
        "seconds": {"transformers": seconds["transformers_n"], "hybridlm": seconds["hybridlm_n"]},
        "tokens": ours[0].tolist(),
        "tokens_agree": greedy_agreement(ours, theirs),
    }
    return row, generated


def add_rooflines(rows: dict[str, dict], model: torch.nn.Module, machine: roofline.Machine, settings: Settings) -> None:
    """Each row's best case on ``machine``: prefill at the SGEMM rate, decode at the GEMV bandwidth (and,
    as ``roofline_at_read_bandwidth``, at the read bandwidth: a kernel of one's own can stream weights
    faster than torch's GEMV), generate as its prefill then its decode steps."""
    for row in rows.values():
        if row["kind"] == "prefill":
            flops = roofline.prefill_flops(model, row["tokens"])
            row["flops"] = flops.to_dict()
            row["roofline"] = roofline.prefill_roofline_tokens_per_s(flops, row["tokens"], machine.sgemm_flops_per_s)
        elif row["kind"] == "decode":
            weight_bytes, batch = row["weight_bytes_per_step"], row["batch"]
            row["roofline"] = roofline.decode_roofline_tokens_per_s(weight_bytes, batch, machine.gemv_bytes_per_s)
            row["roofline_at_read_bandwidth"] = roofline.decode_roofline_tokens_per_s(
                weight_bytes, batch, machine.read_bytes_per_s
            )
        else:
            row["roofline"] = roofline.generate_roofline_seconds(
                model, machine, settings.prompt_len, settings.new_tokens
            )


def experts_touched_per_step(
    model: torch.nn.Module, hf: torch.nn.Module, ids: torch.Tensor, new_tokens: int
) -> tuple[list[float], str, torch.Tensor]:
    """Distinct routed experts each MoE block reads per decode step, averaged over one greedy run of
    hybridlm (whose output ids are returned too).

    Read from the routing counts hybridlm hands its block observer (``model.block_observer``); if those
    are missing or implausible, from transformers' routers on the same weights and prompts; else the
    uniform-routing estimate E(1 - (1 - k/E)^B).
    """
    batch = ids.shape[0]
    moe_blocks = [block.index for block in model.layers if block.routes_experts]
    recorder = RoutingRecorder()
    previous, model.block_observer = model.block_observer, recorder
    try:
        output = hybridlm_generate(model, ids, new_tokens)
    finally:
        model.block_observer = previous
    steps = [recorder.distinct.get(index, []) for index in moe_blocks]
    top_k = model.config.moe.num_experts_per_tok
    is_plausible = all(len(s) == new_tokens - 1 for s in steps) and (batch > 1 or all(set(s) == {top_k} for s in steps))
    if is_plausible:
        return [sum(s) / len(s) for s in steps], "measured: hybridlm block_observer routing counts", output

    routers = [m for m in hf.modules() if type(m).__name__.lower().endswith("topkrouter")]
    if len(routers) == len(moe_blocks):
        touched = record_router_decode_steps(routers, batch, lambda: transformers_generate(hf, ids, new_tokens))
        if touched is not None:
            return touched, "measured: transformers router top-k indices", output
    config = model.config.moe
    uniform = roofline.expected_distinct_experts(config.num_experts, config.num_experts_per_tok, batch)
    return [uniform] * len(moe_blocks), "estimated: E(1-(1-k/E)^B), routing could not be recorded", output


class RoutingRecorder:
    """A hybridlm block observer: for each MoE block, the distinct experts of every decode step."""

    def __init__(self) -> None:
        self.distinct: dict[int, list[int]] = {}

    def before_block(self, index: int, layer_type: str, hidden: torch.Tensor) -> None:
        pass

    def after_block(
        self, index: int, layer_type: str, hidden: torch.Tensor, routing_counts: torch.Tensor | None
    ) -> None:
        if routing_counts is not None and hidden.shape[1] == 1:  # hidden [B, T, D]: a decode step has T == 1
            self.distinct.setdefault(index, []).append(int((routing_counts > 0).sum()))


def record_router_decode_steps(
    routers: list[torch.nn.Module], batch: int, run: Callable[[], object]
) -> list[float] | None:
    """Mean distinct experts per decode step of each transformers router while ``run()`` runs; None if
    some router saw no decode step."""
    records: list[list[int]] = [[] for _ in routers]

    def hook(records: list[int], module: torch.nn.Module, inputs: tuple, output: tuple) -> None:
        indices = output[-1]  # transformers' routers return (logits, weights, top-k indices [N, k])
        if indices.shape[0] == batch:  # a decode step routes B tokens, a prefill B * T
            records.append(int(indices.unique().numel()))

    handles = [r.register_forward_hook(functools.partial(hook, rec)) for r, rec in zip(routers, records, strict=True)]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    if any(not r for r in records):
        return None
    return [sum(r) / len(r) for r in records]


# ----------------------------------------------------------------------------------------------
# Output


def print_family(family: str, result: dict) -> None:
    headers = ["", "transformers", "hybridlm", "hybridlm/tf", "llama.cpp", "roofline", "hybridlm % roof", "tf % roof"]
    with_compiled = any("compiled" in row for row in result["rows"].values())
    if with_compiled:
        headers.append("compiled")
    table = []
    for name, row in result["rows"].items():
        is_seconds = row["unit"] == "s"
        speed = (lambda v: 1 / v) if is_seconds else (lambda v: v)  # e2e: fewer seconds is faster
        ours, theirs, best = row["hybridlm"], row["transformers"], row["roofline"]
        llama = row.get("llama_cpp")
        table.append(
            [
                name,
                _number(theirs),
                _number(ours),
                f"{speed(ours) / speed(theirs):.2f}x",
                "-" if llama is None else _number(llama),
                _number(best),
                f"{100 * speed(ours) / speed(best):.0f}%",
                f"{100 * speed(theirs) / speed(best):.0f}%",
                *([_number(row["compiled"]) if "compiled" in row else "-"] if with_compiled else []),
            ]
        )
        row["hybridlm_over_transformers"] = speed(ours) / speed(theirs)
        row["hybridlm_fraction_of_roofline"] = speed(ours) / speed(best)
        row["transformers_fraction_of_roofline"] = speed(theirs) / speed(best)
        if llama is not None:
            row["llama_cpp_fraction_of_roofline"] = speed(llama) / speed(best)
    print(
        f"\n{family}: {result['parameters'] / 1e6:.1f}M parameters, "
        f"logits max |diff| {result['logits_max_abs_diff']:.1e}, "
        f"greedy tokens agree {result['greedy_tokens_agree']}; tokens/s unless marked (s)"
    )
    print_table(headers, table)
    print(f"best of before/after: {result['machine_summary']}", flush=True)


def _number(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:,.0f}"


def write_json(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as file:
        json.dump(report, file, indent=2)
    Path(file.name).replace(path)


if __name__ == "__main__":
    main()
