"""The ``hybridlm`` command: one subcommand per job; each registers its own arguments."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

import torch

from hybridlm.accounting import cache_bytes, count_params, flops_per_token, pure_attention_kv_bytes
from hybridlm.config import HybridConfig
from hybridlm.loading import load_model, parse_dtype, resolve_config


def _gb(n: int) -> str:
    return f"{n / 1e9:,.2f} GB" if n >= 1e8 else f"{n / 1e6:,.2f} MB"


def _billions(n: int) -> str:
    return f"{n / 1e9:,.3f}B" if n >= 1e8 else f"{n / 1e6:,.2f}M"


def info_report(config: HybridConfig, context: int, batch_size: int = 1, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Everything ``hybridlm info`` shows, as plain data."""
    params = count_params(config)
    memory = cache_bytes(config, batch_size, context, dtype)
    baseline = pure_attention_kv_bytes(config, batch_size, context, dtype)
    return {
        "name": config.name,
        "source": config.source,
        "pattern": config.pattern,
        "num_blocks": config.num_blocks,
        "blocks": config.block_counts(),
        "params": params.to_dict(),
        "memory": {
            "context": context,
            "batch_size": batch_size,
            "dtype": str(dtype).removeprefix("torch."),
            **{f"{k}_bytes": v for k, v in memory.to_dict().items()},
            "pure_attention_kv_bytes": baseline,
            "pure_attention_layers": config.num_hidden_layers or config.num_blocks,
            "kv_fraction_of_pure_attention": memory.kv / baseline if baseline else None,
        },
        "flops_per_token": flops_per_token(config, context),
    }


def _print_info(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    title = report["name"] or "model"
    console.print(f"[bold]{title}[/bold]  {report['source']}")
    console.print(f"pattern ({report['num_blocks']} blocks): {report['pattern']}")
    params = report["params"]
    table = Table(title="blocks and parameters")
    for column in ("layer type", "blocks", "params / block", "total", "active / token"):
        table.add_column(column, justify="left" if column == "layer type" else "right")
    for name, row in params["by_block_type"].items():
        table.add_row(
            name,
            str(row["blocks"]),
            _billions(row["per_block_total"]),
            _billions(row["total"]),
            _billions(row["active"]),
        )
    table.add_row("embedding + head", "", "", _billions(params["embedding"] + params["lm_head"]), "")
    table.add_row("[bold]model[/bold]", "", "", _billions(params["total"]), _billions(params["active"]))
    console.print(table)
    console.print(
        f"active per token: {_billions(params['active'])} with embedding and head, "
        f"{_billions(params['active_without_embedding'])} without the input embedding, "
        f"{_billions(params['active_without_embedding_and_head'])} without either"
    )
    memory = report["memory"]
    table = Table(
        title=f"generation state at {memory['context']:,} tokens, batch {memory['batch_size']}, {memory['dtype']}"
    )
    table.add_column("")
    table.add_column("this model", justify="right")
    table.add_column(f"pure attention, {memory['pure_attention_layers']} layers", justify="right")
    table.add_row("KV cache", _gb(memory["kv_bytes"]), _gb(memory["pure_attention_kv_bytes"]))
    table.add_row("conv state", _gb(memory["conv_bytes"]), "-")
    table.add_row("recurrent state (fp32)", _gb(memory["recurrent_bytes"]), "-")
    table.add_row("[bold]total[/bold]", _gb(memory["total_bytes"]), _gb(memory["pure_attention_kv_bytes"]))
    console.print(table)
    fraction = memory["kv_fraction_of_pure_attention"]
    if fraction is not None:
        console.print(f"KV cache is {fraction:.1%} of the pure-attention model's ({1 - fraction:.0%} less)")


def cmd_info(args: argparse.Namespace) -> int:
    config = resolve_config(args.model)
    report = info_report(config, args.context, args.batch_size, parse_dtype(args.dtype))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_info(report)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from hybridlm.generation import stream_generate
    from hybridlm.tokenizer import ByteTokenizer

    model = load_model(args.model, seed=args.seed, dtype=parse_dtype(args.dtype))
    tokenizer = _tokenizer_for(args.model)
    prompt_ids = tokenizer.encode(args.prompt)
    if not prompt_ids:
        raise ValueError("--prompt is empty")
    if isinstance(tokenizer, ByteTokenizer) and model.config.vocab_size < 256:
        raise ValueError(f"the byte tokenizer needs vocab_size >= 256, the model has {model.config.vocab_size}")
    print(args.prompt, end="", flush=True)
    new_ids: list[int] = []
    printed = ""
    for token in stream_generate(
        model,
        [prompt_ids],
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        eos_token_id=tokenizer.eos_token_id,
    ):
        new_ids.append(int(token[0]))
        text = tokenizer.decode(new_ids)
        print(text[len(printed) :], end="", flush=True)
        printed = text
    print()
    return 0


def _tokenizer_for(name_or_path: str):
    try:
        from hybridlm.checkpoints import load_tokenizer
    except ImportError:
        from hybridlm.tokenizer import ByteTokenizer

        return ByteTokenizer()
    return load_tokenizer(name_or_path)


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="block map, parameters and generation-state memory of a model")
    p.add_argument("model", help="preset name or checkpoint directory")
    p.add_argument("--context", type=int, default=131072, help="tokens per sequence (default 131072)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", help="KV and conv state dtype (default bfloat16)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=cmd_info)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt")
    p.add_argument("model", help="preset name (random weights) or checkpoint directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: as stored)")
    p.set_defaults(func=cmd_generate)


REGISTRARS: list[Callable[[argparse._SubParsersAction], None]] = [_add_info, _add_generate]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybridlm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for register in REGISTRARS:
        register(sub)
    for module_name in ("hybridlm.trace.cli", "hybridlm.checkpoints.cli"):
        try:
            module = __import__(module_name, fromlist=["register"])
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"hybridlm {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
