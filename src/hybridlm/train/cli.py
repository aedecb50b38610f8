"""``hybridlm train``: train a small hybrid on MQAR or on a text file, with checkpoints and a trace.

The main CLI registers it with ``add_train_parser(subparsers)``; ``cmd_train(args)`` runs it and
returns the exit status. Nothing here imports torch until a run starts (the main CLI sets the
threading environment first).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hybridlm.cli_flags import add_device_flag

if TYPE_CHECKING:
    from hybridlm.config import HybridConfig
    from hybridlm.train.config import TrainConfig
    from hybridlm.train.data import TrainData

DEFAULT_PATTERN = "M*"  # one Mamba-2 block then one attention block
DEFAULT_HIDDEN_SIZE = 128  # the small default model: debug-tiny's blocks at this width
# The quick MQAR setting (`--quick`): the small default model reached 0.9 held-out recall at steps 400-725
# over seeds 0-4 (9-15 s on one loaded CPU core), so 1000 steps leave room. Explicit flags override each value.
QUICK_DATA = {"vocab_size": 64, "seq_len": 32, "num_pairs": 4, "num_train_examples": 8192, "num_eval_examples": 256}
QUICK_TRAIN = {"steps": 1000, "batch_size": 32, "lr": 3e-3, "warmup_steps": 100, "weight_decay": 0.0, "eval_every": 25}
QUICK_STOP_AT = 0.9

EPILOG = """\
examples:
  hybridlm train --quick                                  # MQAR, Mamba-2 + attention, seconds on a CPU
  hybridlm train --pattern 'MM*M' --data mqar --steps 2000 --out runs/a --trace runs/a.duckdb
  hybridlm train debug-tiny --pattern 'M*ME' --aux-loss-free --data text:book.txt --seq-len 128
  hybridlm train --data text:book.txt --out runs/b --resume      # continue runs/b/checkpoint.pt

MODEL is a preset name or a config JSON file (random initial weights, vocab_size set from the data
for a preset); without one, debug-tiny's blocks at width 128 with --pattern (default 'M*')."""


def add_train_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help="train a small hybrid on MQAR or a text file (checkpoints, resume, trace)",
        description="Train a hybrid model from random weights with AdamW (warmup + cosine), gradient clipping "
        "and accumulation, the MoE balancing losses or aux-loss-free balancing; evaluate held-out MQAR recall "
        "or text perplexity. Checkpoints are atomic and resumable bit for bit.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", nargs="?", metavar="MODEL", help="preset name or config JSON (default: a small model)")
    p.add_argument("--pattern", help=f"layer pattern (default {DEFAULT_PATTERN!r} for the small model)")
    p.add_argument("--quick", action="store_true", help="the quick MQAR setting: small vocab, short sequences")
    add_device_flag(p)

    data = p.add_argument_group("data")
    data.add_argument("--data", default="mqar", help="mqar, text:PATH or shakespeare (default mqar)")
    data.add_argument("--seq-len", type=int, help="tokens per sequence (MQAR default 64, text 128)")
    data.add_argument("--vocab-size", type=int, help="MQAR vocabulary (default 8192)")
    data.add_argument("--num-pairs", type=int, help="MQAR key-value pairs per sequence (default 4)")
    data.add_argument("--power-a", type=float, help="MQAR query-gap power law exponent (default 0.01)")
    data.add_argument("--zero-filler", action="store_true", help="MQAR filler token 0 instead of random tokens")
    data.add_argument("--num-train-examples", type=int, help="MQAR training sequences (default 20000)")
    data.add_argument("--num-eval-examples", type=int, help="MQAR held-out sequences (default 1000)")
    data.add_argument("--tokenizer", metavar="DIR", help="text: a directory with tokenizer.json (default bytes)")
    data.add_argument("--held-out", type=float, default=0.1, help="text: held-out share (default 0.1)")

    train = p.add_argument_group("training")
    train.add_argument("--steps", type=int, help="optimizer steps (default 1000)")
    train.add_argument("--batch-size", type=int, help="sequences per micro-batch (default 32)")
    train.add_argument("--grad-accum", type=int, help="micro-batches per step (default 1)")
    train.add_argument("--lr", type=float, help="peak learning rate (default 1e-3)")
    train.add_argument("--min-lr-ratio", type=float, help="final lr / peak lr of the cosine (default 0.1)")
    train.add_argument("--warmup-steps", type=int, help="linear warmup steps (default 100)")
    train.add_argument("--weight-decay", type=float, help="AdamW weight decay of matrices (default 0.1)")
    train.add_argument("--betas", type=_betas, help="AdamW betas B1,B2 (default 0.9,0.95)")
    train.add_argument("--grad-clip", type=float, help="max gradient norm, 0 = off (default 1.0)")
    train.add_argument("--seed", type=int, help="seed of the weights, the data and its order (default 0)")
    train.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU; on CPU it runs but rarely helps)")
    train.add_argument("--aux-loss-free", action="store_true", help="DeepSeek-V3 expert-bias balancing")
    train.add_argument("--bias-update-rate", type=float, help="expert bias step per update (default 1e-3)")
    train.add_argument("--aux-loss-coef", type=float, help="the model's MoE balancing loss weight (0 = off)")
    train.add_argument("--eval-every", type=int, help="evaluate every N steps (default: at the end)")
    train.add_argument("--checkpoint-every", type=int, help="checkpoint every N steps (default: at the end)")
    train.add_argument("--stop-at-accuracy", type=float, help="stop at the first evaluation reaching it")

    output = p.add_argument_group("output")
    output.add_argument("--out", metavar="DIR", help="checkpoints (DIR/checkpoint.pt), final model and metrics")
    output.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt of --out")
    output.add_argument("--trace", metavar="DB", help="record the run into this trace database")
    p.set_defaults(func=cmd_train)
    return p


def _betas(text: str) -> tuple[float, float]:
    try:
        first, second = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers B1,B2 like 0.9,0.95, got {text!r}") from None
    return first, second


def cmd_train(args: argparse.Namespace) -> int:
    from hybridlm.loading import resolve_device

    if args.resume and not args.out:
        raise ValueError("--resume continues the checkpoint in --out DIR: give --out")
    config = _with_flag_names(lambda: _train_config(args))
    device = resolve_device(args.device)
    data = _with_flag_names(lambda: _build_data(args))
    model_config = _model_config(args, data)
    model = _build_model(model_config, config.seed, device)
    return _run(args, model, data, config)


def _run(args: argparse.Namespace, model: Any, data: TrainData, config: TrainConfig) -> int:
    from hybridlm.train.trainer import Trainer

    name = args.model or f"pattern {model.config.pattern}"
    trainer = Trainer(
        model,
        data,
        config,
        out_dir=args.out,
        trace_path=args.trace,
        model_name=name,
        command=" ".join(["hybridlm", *sys.argv[1:]]) if sys.argv else "hybridlm train",
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    if args.resume:
        trainer.resume(args.out)
    size = f"{model.num_parameters():,} parameters"
    print(f"training {name} on {data.name}: {size}, {config.steps} steps", file=sys.stderr)
    result = trainer.train()
    final = result.final_eval or trainer.evaluate()
    if data.metric == "recall":
        print(f"held-out recall {final.accuracy:.4f} at step {final.step}")
    else:
        print(f"held-out perplexity {final.perplexity:.3f} (loss {final.loss:.4f} nats/token) at step {final.step}")
    if args.trace:
        print(f"trace: run {result.trace_run_id} in {args.trace} (hybridlm report {args.trace})", file=sys.stderr)
    if args.out:
        _write_outputs(Path(args.out), model, result)
    return 0


def _write_outputs(out: Path, model: Any, result: Any) -> None:
    """DIR/model (a hybridlm checkpoint `hybridlm generate` reads) and DIR/metrics.json."""
    from dataclasses import asdict

    from hybridlm.checkpoints import save_pretrained

    save_pretrained(model, out / "model", overwrite=True)
    metrics = {
        "steps_done": result.steps_done,
        "steps_to_accuracy": result.steps_to_accuracy,
        "evals": [e.to_dict() for e in result.evals],
        "history": [asdict(r) for r in result.history],
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(f"model: {out / 'model'}; metrics: {out / 'metrics.json'}", file=sys.stderr)


# -- building the run from the flags ------------------------------------------------------------------


def _train_config(args: argparse.Namespace) -> TrainConfig:
    from hybridlm.train.config import TrainConfig

    values: dict[str, Any] = dict(QUICK_TRAIN) if args.quick else {}
    if args.quick and args.stop_at_accuracy is None:
        values["stop_at_accuracy"] = QUICK_STOP_AT
    for name in (
        "steps", "batch_size", "grad_accum", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "betas",
        "grad_clip", "seed", "bias_update_rate", "eval_every", "checkpoint_every", "stop_at_accuracy",
    ):  # fmt: skip
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    values["bf16"], values["aux_loss_free"] = args.bf16, args.aux_loss_free
    if args.warmup_steps is None and args.steps is not None:  # a shorter run than the default warms up less
        values["warmup_steps"] = min(values.get("warmup_steps", TrainConfig.warmup_steps), args.steps // 10)
    config = TrainConfig(**values)
    config.check()
    return config


MQAR_FLAGS = ("vocab_size", "num_pairs", "power_a", "num_train_examples", "num_eval_examples", "zero_filler")


def _build_data(args: argparse.Namespace) -> TrainData:
    seed = args.seed if args.seed is not None else 0
    if args.data == "mqar" and args.tokenizer is not None:
        raise ValueError("--tokenizer applies to text data; MQAR tokens are ids below --vocab-size")
    if args.data != "mqar":
        given = [name for name in MQAR_FLAGS if getattr(args, name) not in (None, False)]
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} is an MQAR option; this run trains on {args.data}")
    if args.data == "mqar":
        from hybridlm.train.mqar import MQARConfig, mqar_data

        values: dict[str, Any] = dict(QUICK_DATA) if args.quick else {}
        for name in ("vocab_size", "seq_len", "num_pairs", "power_a", "num_train_examples", "num_eval_examples"):
            if getattr(args, name) is not None:
                values[name] = getattr(args, name)
        return mqar_data(MQARConfig(**values, random_filler=not args.zero_filler, seed=seed))
    if args.quick:
        raise ValueError("--quick is the quick MQAR setting; it takes --data mqar")
    seq_len = args.seq_len if args.seq_len is not None else 128
    from hybridlm.train.text import shakespeare_text, text_data, text_data_from_string

    if args.data == "shakespeare":
        return text_data_from_string(shakespeare_text(), seq_len, args.tokenizer, args.held_out, name="shakespeare")
    if args.data.startswith("text:") and len(args.data) > len("text:"):
        return text_data(args.data[len("text:") :], seq_len, args.tokenizer, args.held_out)
    raise ValueError(f"--data {args.data!r}: expected mqar, text:PATH or shakespeare")


def _model_config(args: argparse.Namespace, data: TrainData) -> HybridConfig:
    from hybridlm.config import HybridConfig
    from hybridlm.presets import PRESETS, get_preset

    overrides: dict[str, Any] = {} if args.pattern is None else {"pattern": args.pattern}
    if args.model is None:
        overrides = {"pattern": DEFAULT_PATTERN, "hidden_size": DEFAULT_HIDDEN_SIZE, **overrides}
        config = get_preset("debug-tiny", name="train-small", **overrides).replace(vocab_size=data.vocab_size)
    elif args.model in PRESETS:
        config = get_preset(args.model, **overrides).replace(vocab_size=data.vocab_size)
    elif Path(args.model).is_file():
        config = HybridConfig.load(args.model)
        config = config.replace(**overrides) if overrides else config
    else:
        raise ValueError(f"MODEL {args.model!r} is neither a preset ({', '.join(PRESETS)}) nor a config JSON file")
    config = _apply_moe_flags(config, args)
    try:
        config.validate()
    except ValueError as error:
        raise ValueError(str(error).replace("moe.aux_loss_coef", "--aux-loss-coef")) from None
    return config


def _apply_moe_flags(config: HybridConfig, args: argparse.Namespace) -> HybridConfig:
    """--aux-loss-free gives the routers their expert bias; --aux-loss-coef sets the balancing loss weight."""
    if config.moe is None or "E" not in config.pattern:
        if args.aux_loss_coef is not None:
            raise ValueError(f"--aux-loss-coef: pattern {config.pattern!r} has no MoE block ('E')")
        return config  # the trainer names what --aux-loss-free needs
    changes: dict[str, Any] = {}
    if args.aux_loss_free:
        changes["use_expert_bias"] = True
    if args.aux_loss_coef is not None:
        changes["aux_loss_coef"] = args.aux_loss_coef
    return config.replace(moe=dataclasses.replace(config.moe, **changes)) if changes else config


def _build_model(config: HybridConfig, seed: int, device: Any) -> Any:
    import torch

    from hybridlm.model import HybridLM

    torch.manual_seed(seed)
    with torch.device(device):
        return HybridLM(config)


def _with_flag_names(build: Any) -> Any:
    """Run ``build``; a ValueError naming a config field (``TrainConfig.lr = ...``, ``MQAR num_pairs = ...``)
    is re-raised naming the flag the user typed (``--lr ...``)."""
    try:
        return build()
    except ValueError as error:
        message = str(error)
        for prefix in ("TrainConfig.", "MQAR "):
            if message.startswith(prefix):
                name, _, rest = message.removeprefix(prefix).partition(" = ")
                flag = {"random_filler": "zero-filler"}.get(name, name.replace("_", "-"))
                message = f"--{flag} {rest}" if rest else message
        raise ValueError(message) from None


def register(subparsers: argparse._SubParsersAction) -> None:
    """The main CLI's hook for subcommand modules (``SUBCOMMAND_MODULES`` in hybridlm/cli.py)."""
    add_train_parser(subparsers)
