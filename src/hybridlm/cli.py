"""The ``hybridlm`` command: one subcommand per job; each registers its own arguments.

This module imports no torch at the top: the threading environment (``OMP_WAIT_POLICY``,
``OMP_NUM_THREADS``) is read by OpenMP once, when torch loads, so ``main`` sets it before any
subcommand module is imported.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from hybridlm.cli_flags import (
    add_compile_flag,
    add_device_flag,
    add_dtype_flag,
    add_expert_parallel_flags,
    check_compile_flag,
)

if TYPE_CHECKING:
    import torch

    from hybridlm.config import HybridConfig

DESCRIPTION = """\
hybridlm builds, runs and traces hybrid language models that mix Mamba state-space blocks,
attention and mixture-of-experts layers (Nemotron-H, Qwen3-Next, Jamba, Granite 4, Falcon-H1).

A MODEL is a preset name (random weights, for sizing and tracing) or a checkpoint directory
(hybridlm's own format or a Hugging Face directory of a supported family)."""

EPILOG = """\
examples:
  hybridlm info nemotron-3-nano-30b-a3b --context 131072
  hybridlm generate debug-small --prompt "Hybrid models keep state: " --max-new-tokens 24
  hybridlm serve debug-small --port 8000 --max-slots 16
  hybridlm train --quick
  hybridlm convert path/to/hf-checkpoint out/model --to hybridlm
  hybridlm profile debug-small --db trace.duckdb
  hybridlm report trace.duckdb --plot latency.png
  hybridlm query trace.duckdb "SELECT layer_type, count(*) FROM events GROUP BY 1"

threading: hybridlm sets OMP_WAIT_POLICY=PASSIVE unless you set it yourself (idle OpenMP threads
sleep instead of spinning, which otherwise slows small models many times over on shared machines);
--threads N sets the number of CPU threads.

Run 'hybridlm COMMAND --help' for a command's options. --debug (or HYBRIDLM_DEBUG=1) shows the
full traceback of an error."""

SUBCOMMAND_MODULES = (
    "hybridlm.trace.cli",
    "hybridlm.checkpoints.cli",
    "hybridlm.train.cli",
    "hybridlm.distributed.cli",
    "hybridlm.train.ablate",
)


# ---------------------------------------------------------------------------------------------
# info and generate


def _gb(n: int) -> str:
    return f"{n / 1e9:,.2f} GB" if n >= 1e8 else f"{n / 1e6:,.2f} MB"


def _billions(n: int) -> str:
    return f"{n / 1e9:,.3f}B" if n >= 1e8 else f"{n / 1e6:,.2f}M"


def info_report(config: HybridConfig, context: int, batch_size: int = 1, dtype: torch.dtype | None = None) -> dict:
    """Everything ``hybridlm info`` shows, as plain data (state dtype bfloat16 unless given)."""
    import torch

    from hybridlm.accounting import cache_bytes, count_params, flops_per_token, pure_attention_kv_bytes

    dtype = torch.bfloat16 if dtype is None else dtype
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
    from rich.markup import escape
    from rich.table import Table

    class _Console(Console):
        def on_broken_pipe(self) -> None:  # rich exits 1 on a closed pipe; main() exits quietly with 141
            raise BrokenPipeError

    console = _Console()
    title = escape(report["name"] or "model")
    console.print(f"[bold]{title}[/bold]  {escape(str(report['source']))}", highlight=False)
    console.print(f"pattern ({report['num_blocks']} blocks): {escape(report['pattern'])}", highlight=False)
    params = report["params"]
    table = Table(title="blocks and parameters")
    for column in ("layer type", "blocks", "params / block", "total", "active / token"):
        table.add_column(column, justify="left" if column == "layer type" else "right")
    for name, row in params["by_layer_type"].items():
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
    from hybridlm.loading import parse_dtype, resolve_config

    dtype = parse_dtype(args.dtype)
    config = resolve_config(args.model)
    if args.context is None:
        args.context = config.max_position_embeddings
    if args.context > config.max_position_embeddings:
        print(
            f"note: --context {args.context:,} is more than the model's context of "
            f"{config.max_position_embeddings:,} tokens (max_position_embeddings)",
            file=sys.stderr,
        )
    report = info_report(config, args.context, args.batch_size, dtype)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_info(report)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from hybridlm.generation import stream_generate
    from hybridlm.loading import load_model, parse_dtype, resolve_config
    from hybridlm.presets import PRESETS
    from hybridlm.progress import progress
    from hybridlm.tokenizer import ByteTokenizer, IncrementalDetokenizer

    # everything a user typed is checked before a model is built
    dtype = parse_dtype(args.dtype)
    device = _resolve_device(args.device)
    _check_sampling(args)
    config = resolve_config(args.model)
    tokenizer = _tokenizer_for(args.model)
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError as error:  # bytes the shell passed that are not UTF-8 (Python keeps them as surrogates)
        byte = ord(error.object[error.start]) & 0xFF  # surrogateescape keeps byte b as U+DC00 + b
        raise ValueError(f"--prompt is not UTF-8 text (byte 0x{byte:02x} at position {error.start})") from None
    prompt_ids = tokenizer.encode(args.prompt)
    if not prompt_ids:
        raise ValueError("--prompt is empty")
    if max(prompt_ids) >= config.vocab_size:
        raise ValueError(
            f"the tokenizer gives token id {max(prompt_ids)} for --prompt, past the model's vocab_size "
            f"{config.vocab_size}: the tokenizer does not belong to this model"
        )
    if isinstance(tokenizer, ByteTokenizer) and config.vocab_size < 256:
        raise ValueError(f"the byte tokenizer needs vocab_size >= 256, the model has {config.vocab_size}")
    total, context = len(prompt_ids) + args.max_new_tokens, config.max_position_embeddings
    if total > context and not args.allow_longer_than_context:
        raise ValueError(
            f"the prompt ({len(prompt_ids)} tokens) + --max-new-tokens ({args.max_new_tokens}) = {total} tokens, "
            f"more than the model's context of {context}; ask for fewer tokens or pass --allow-longer-than-context"
        )

    if args.routing_skew is not None:
        from hybridlm.distributed.skew import check_routing_skew

        check_routing_skew(args.routing_skew)
    check_compile_flag(args)
    if args.ep is not None:  # the experts spread over ranks: hybridlm.distributed runs the rest
        from hybridlm.distributed.launch import check_expert_parallel, generate_on_ranks

        check_expert_parallel(args.ep, config, args.device)
        return generate_on_ranks(args, prompt_ids, tokenizer)
    if args.model in PRESETS:
        with progress(f"building {args.model} (random weights)"):
            model = load_model(args.model, seed=args.seed, dtype=dtype, device=device)
    else:  # the checkpoint reader draws its own bar, and two live displays would overwrite each other
        model = load_model(args.model, seed=args.seed, dtype=dtype, device=device)
    if args.routing_skew:
        from hybridlm.distributed.skew import apply_routing_skew

        apply_routing_skew(model, args.routing_skew, seed=args.seed)
    if args.compile is not None:
        model.compile_decode(args.compile)
    print(args.prompt, end="", flush=True)
    detokenizer = IncrementalDetokenizer(tokenizer)  # a character split across tokens prints once whole
    for token in stream_generate(
        model,
        [prompt_ids],
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        eos_token_id=tokenizer.eos_token_id,
        allow_longer_than_context=args.allow_longer_than_context,
    ):
        print(detokenizer.add(int(token[0])), end="", flush=True)
    print(detokenizer.finish())
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from hybridlm.loading import parse_dtype, resolve_config

    # everything a user typed is checked, and the port taken, before a model is built
    parse_dtype(args.dtype)
    _resolve_device(args.device)
    _engine_config(args).check()
    model_config = resolve_config(args.model)
    if args.ep is not None:  # the experts spread over ranks: rank 0 serves, the others replay its calls
        from hybridlm.distributed.launch import check_expert_parallel, run_on_ranks

        check_expert_parallel(args.ep, model_config, args.device)
        _bind(args.host, args.port).close()  # a port in use is said before N ranks start
        with _forwarding_sigterm_to_rank0():
            return run_on_ranks(args.ep, args.device, args.threads, _serve_rank, args)
    sock = _bind(args.host, args.port)
    try:
        from hybridlm.loading import load_model

        model = load_model(
            args.model, seed=args.seed, dtype=parse_dtype(args.dtype), device=_resolve_device(args.device)
        )
        return _serve_model(args, model, sock, expert_group=None)
    finally:
        sock.close()


def _engine_config(args: argparse.Namespace) -> Any:
    from hybridlm.engine import EngineConfig

    return EngineConfig(
        max_slots=args.max_slots,
        max_model_len=args.max_model_len,
        memory_budget_bytes=args.memory_budget,
        max_waiting=args.max_waiting,
        step_token_budget=args.step_token_budget,
        prefix_cache_bytes=args.prefix_cache_bytes,
        snapshot_interval=args.snapshot_interval,
    )


def _bind(host: str, port: int) -> Any:
    from hybridlm.engine.server import bind_socket

    return bind_socket(host, port)


def _serve_model(args: argparse.Namespace, model: Any, sock: Any, expert_group: Any) -> int:
    from pathlib import Path

    from hybridlm.engine import Engine
    from hybridlm.engine.chat import ChatTemplate
    from hybridlm.engine.metrics import EngineMetrics
    from hybridlm.engine.server import build_app, run_server

    model_name = args.served_model_name or (
        Path(args.model).resolve().name if Path(args.model).is_dir() else args.model
    )
    tokenizer = _tokenizer_for(args.model)
    chat_template = ChatTemplate.from_checkpoint(args.model)
    port = sock.getsockname()[1]  # the one the system chose for --port 0
    metrics = EngineMetrics(model_name, model.config)
    engine = Engine(model, tokenizer, _engine_config(args), metrics=metrics, expert_group=expert_group)
    if args.trace is not None:
        run_id = engine.enable_trace(args.trace, model_name=model_name)
        print(f"trace: recording run {run_id} into {args.trace} (hybridlm report {args.trace})", file=sys.stderr)
    _print_serving(engine.memory_report(), model_name, chat_template, args.host, port)
    app = build_app(engine, model_name, tokenizer, chat_template)
    engine.start()
    run_server(app, args.host, port, engine, sock=sock, drain_timeout=args.drain_timeout)
    return 0


def _serve_rank(rank: int, world_size: int, device: str, args: argparse.Namespace) -> int:
    """One rank of ``serve --ep N``: rank 0 runs the engine and the HTTP server, broadcasting every model
    call; the others replay them (``hybridlm.engine.worker.follow``) until rank 0 stops."""
    import signal

    import torch.distributed as dist

    from hybridlm.distributed.launch import build_rank_model
    from hybridlm.engine.worker import follow
    from hybridlm.loading import parse_dtype

    if rank != 0:  # rank 0 decides when to stop (it drains on SIGTERM / Ctrl-C) and tells the others
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    model = build_rank_model(args.model, args.seed, parse_dtype(args.dtype), device, rank)
    if rank != 0:
        follow(model)
        return 0
    sock = _bind(args.host, args.port)
    try:
        return _serve_model(args, model, sock, expert_group=dist.group.WORLD)
    finally:
        sock.close()


@contextlib.contextmanager
def _forwarding_sigterm_to_rank0() -> Iterator[None]:
    """While spawned ranks serve: SIGTERM to this process goes on to rank 0 (which drains and stops the
    others); Ctrl-C reaches rank 0 from the terminal itself, so this process ignores it."""
    import multiprocessing
    import signal

    def forward(signum: int, frame: object) -> None:
        for child in multiprocessing.active_children():
            if child.name == "hybridlm-rank0" and child.pid is not None:
                os.kill(child.pid, signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, forward), signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])


def _print_serving(report: dict, model_name: str, chat_template: Any, host: str, port: int) -> None:
    """Start-up lines: the memory the slot pool takes by kind, the clamp when there was one, the URL."""
    kinds = ", ".join(f"{kind} {_gb(report[kind])}" for kind in ("weights", "kv", "conv", "recurrent"))
    print(f"memory: {kinds}", file=sys.stderr)
    print(
        f"slots: {report['slots']} of {report.get('max_model_len', '?')} tokens "
        f"(asked for {report['requested_slots']})",
        file=sys.stderr,
    )
    if report.get("message"):
        print(f"note: {report['message']}", file=sys.stderr)
    print(f"chat template: {chat_template.source}", file=sys.stderr)
    url_host = f"[{host}]" if ":" in host else host
    print(f"serving {model_name} on http://{url_host}:{port}/v1 (Ctrl-C or SIGTERM stops)", file=sys.stderr, flush=True)


def _resolve_device(name: str) -> Any:
    from hybridlm.loading import resolve_device

    try:
        return resolve_device(name)
    except ValueError as error:
        raise ValueError(f"--device: {error}") from None


def _check_sampling(args: argparse.Namespace) -> None:
    from hybridlm.generation import check_sampling

    try:
        check_sampling(args.temperature, args.top_k, args.top_p)
    except ValueError as error:
        message = str(error)  # it names the keyword (top_p); the user typed the flag (--top-p)
        for keyword in ("temperature", "top_k", "top_p"):
            if message.startswith(f"{keyword} "):
                message = f"--{keyword.replace('_', '-')}{message.removeprefix(keyword)}"
        raise ValueError(message) from None


def _tokenizer_for(name_or_path: str):
    from hybridlm.checkpoints import load_tokenizer

    return load_tokenizer(name_or_path)


# ---------------------------------------------------------------------------------------------
# argument types


def _int_between(low: int, high: int | None = None, high_text: str | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number in [low, high] (no upper bound when high is None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"between {low} and {high_text or high}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the CPUs this process may run on, not the machine's
    except (AttributeError, OSError):
        return os.cpu_count() or 1


_positive_int = _int_between(1)
# sizes past 2**40 tokens or sequences are typing mistakes, and their byte counts stop being readable
_size = _int_between(1, 2**40, "2**40")
# torch.manual_seed takes an unsigned 64-bit seed
_seed = _int_between(0, 2**64 - 1, "2**64 - 1")
# more threads than CPUs only makes OpenMP threads wait on each other
_threads = _int_between(1, _cpu_count(), f"the {_cpu_count()} CPUs this process may use")


def _bytes(zero_allowed: bool) -> Callable[[str], int]:
    """An argparse type: a byte count, bare or with a suffix (512M and 4G are binary: 2**20, 2**30;
    500MB and 4GiB as ``convert --max-shard-size`` takes them)."""

    def parse(text: str) -> int:
        from hybridlm.checkpoints.cli import parse_size

        clean = text.strip()
        if zero_allowed and clean == "0":
            return 0
        if clean[-1:].upper() in ("K", "M", "G", "T") and clean[:-1].replace(".", "", 1).isdigit():
            size = int(float(clean[:-1]) * 2 ** (10 * (" KMGT".index(clean[-1].upper()))))
            if size < 1:
                raise argparse.ArgumentTypeError(f"must be at least one byte, got {text!r}")
            return size
        try:
            return parse_size(clean, "size")
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a size like 512M, 4G or 1000000, got {text!r}") from None

    parse.__name__ = "size"
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="block map, parameter counts and generation-state memory of a model",
        description="Show a model's block pattern, parameters (total and active per token) and the memory its "
        "generation state takes at a given context, next to an all-attention model of the same depth. "
        "Reads only the config: no weights are loaded.",
    )
    p.add_argument("model", metavar="MODEL", help="preset name or checkpoint directory")
    p.add_argument(
        "--context", type=_size, default=None, metavar="N", help="tokens per sequence (default: the model's context)"
    )
    p.add_argument("--batch-size", type=_size, default=1, metavar="N", help="sequences (default 1)")
    p.add_argument("--dtype", default="bfloat16", help="dtype of the KV cache and conv state (default bfloat16)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=cmd_info)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="continue a prompt, streaming the text as it is generated",
        description="Continue a prompt and stream the text to stdout. A preset name builds random weights "
        "(the text is noise; useful for timing); a checkpoint directory loads real weights and its "
        "tokenizer.json (UTF-8 bytes without one).",
    )
    p.add_argument("model", metavar="MODEL", help="preset name (random weights) or checkpoint directory")
    p.add_argument("--prompt", required=True, metavar="TEXT", help="text to continue")
    p.add_argument(
        "--max-new-tokens", type=_positive_int, default=32, metavar="N", help="tokens to generate (default 32)"
    )
    p.add_argument(
        "--temperature", type=float, default=0.0, metavar="T", help="sampling temperature; 0 (default) is greedy"
    )
    p.add_argument("--top-k", type=_positive_int, default=None, metavar="K", help="sample among the K likeliest tokens")
    p.add_argument(
        "--top-p",
        type=float,
        default=None,
        metavar="P",
        help="sample among the likeliest tokens that hold P, in (0, 1]",
    )
    p.add_argument(
        "--seed",
        type=_seed,
        default=0,
        metavar="N",
        help="seed of a preset's random weights and of sampling (default 0)",
    )
    add_dtype_flag(p)
    add_device_flag(p)
    p.add_argument(
        "--allow-longer-than-context",
        action="store_true",
        help="run past the model's context length (max_position_embeddings) instead of refusing",
    )
    add_compile_flag(p)
    add_expert_parallel_flags(p, ranks="the prompt runs on every rank, rank 0 prints")
    p.set_defaults(func=cmd_generate)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model behind an OpenAI-compatible HTTP API",
        description="Serve a model over HTTP: POST /v1/completions and /v1/chat/completions (OpenAI's schema, "
        "streaming included), GET /v1/models, /health and /metrics (Prometheus). Requests are batched "
        "continuously over a fixed pool of slots sized from a memory budget; prompts sharing a prefix reuse "
        "its state. SIGTERM or Ctrl-C stops taking requests, lets the running ones finish "
        "(--drain-timeout), then exits.",
    )
    p.add_argument("model", metavar="MODEL", help="preset name (random weights) or checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=_int_between(0, 65535), default=8000, metavar="N", help="port (default 8000)")
    p.add_argument(
        "--max-slots", type=_positive_int, default=16, metavar="N", help="sequences run at once (default 16)"
    )
    p.add_argument(
        "--max-model-len",
        type=_int_between(2, 2**40, "2**40"),
        default=None,
        metavar="N",
        help="prompt + completion tokens per request (default: the model's context)",
    )
    p.add_argument(
        "--memory-budget",
        type=_bytes(zero_allowed=False),
        default=None,
        metavar="BYTES",
        help="memory for the slots' state, e.g. 512M or 4G (default: half the free memory); the slot count is "
        "clamped to what fits",
    )
    p.add_argument(
        "--max-waiting",
        type=_positive_int,
        default=256,
        metavar="N",
        help="queued requests beyond which new ones get 429 (default 256)",
    )
    p.add_argument(
        "--step-token-budget",
        type=_positive_int,
        default=512,
        metavar="N",
        help="prompt + decode tokens per engine step: long prompts are prefilled in chunks (default 512)",
    )
    p.add_argument(
        "--prefix-cache-bytes",
        type=_bytes(zero_allowed=True),
        default=256 * 2**20,
        metavar="BYTES",
        help="memory for prefix-state snapshots, e.g. 256M; 0 turns prefix caching off (default 256M)",
    )
    p.add_argument(
        "--snapshot-interval",
        type=_positive_int,
        default=64,
        metavar="N",
        help="prefix snapshots at multiples of N tokens where a prompt chunk ends, where a prompt leaves a "
        "prefix seen before, and at each prompt's end (default 64)",
    )
    p.add_argument("--trace", default=None, metavar="PATH.duckdb", help="record the serving run for hybridlm report")
    add_expert_parallel_flags(
        p, ranks="rank 0 serves HTTP and schedules, the other ranks replay its model calls", skew=False
    )
    p.add_argument(
        "--served-model-name",
        default=None,
        metavar="NAME",
        help="the model name clients send (default: the preset name or the checkpoint directory's name)",
    )
    p.add_argument(
        "--drain-timeout",
        type=_positive_float,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM, how long running requests may finish before they are aborted (default 30)",
    )
    add_dtype_flag(p)
    add_device_flag(p)
    p.add_argument("--seed", type=_seed, default=0, metavar="N", help="seed of a preset's random weights (default 0)")
    p.set_defaults(func=cmd_serve)


REGISTRARS: list[Callable[[argparse._SubParsersAction], None]] = [_add_info, _add_generate, _add_serve]


# ---------------------------------------------------------------------------------------------
# the parser, global options and errors


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, like every other error of the command."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _version() -> str:
    from importlib import metadata

    def installed(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    own = installed("hybridlm") or getattr(sys.modules.get("hybridlm"), "__version__", "unknown")
    python = ".".join(map(str, sys.version_info[:3]))
    return f"hybridlm {own} (torch {installed('torch') or 'not installed'}, python {python})"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hybridlm",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("--debug", action="store_true", help="show tracebacks and the threading settings")
    parser.add_argument(
        "--threads", type=_threads, default=None, metavar="N", help="CPU threads for torch (default: one per core)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    for register in REGISTRARS:
        register(sub)
    for module_name in SUBCOMMAND_MODULES:
        try:
            module = __import__(module_name, fromlist=["register"])
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            continue
        module.register(sub)
    return parser


def _global_options(argv: Sequence[str]) -> tuple[bool, bool, int | None]:
    """(--version, --debug, --threads N) from the options before the subcommand, read before the parser
    exists (its subcommand modules load torch). A bad --threads value is left for the parser to report."""
    version, debug, threads = False, False, None
    index = 0
    while index < len(argv) and argv[index].startswith("-"):
        arg = argv[index]
        value = None
        if arg == "--version":
            version = True
        elif arg == "--debug":
            debug = True
        elif arg == "--threads" and index + 1 < len(argv):
            index += 1
            value = argv[index]
        elif arg.startswith("--threads="):
            value = arg.partition("=")[2]
        if value is not None and value.isdigit() and 1 <= int(value) <= _cpu_count():
            threads = int(value)
        index += 1
    if os.environ.get("HYBRIDLM_DEBUG", "").strip().lower() in ("1", "true", "yes", "on"):
        debug = True
    return version, debug, threads


def _configure_threads(threads: int | None) -> list[str]:
    """Set the OpenMP environment before torch loads; returns notes for --debug."""
    notes, changed = [], False
    if "OMP_WAIT_POLICY" in os.environ:
        notes.append(f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']} (yours)")
    else:
        # spin-waiting OpenMP threads starve each other on shared machines: up to 30x slower decode
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        notes.append("OMP_WAIT_POLICY=PASSIVE (set by hybridlm)")
        changed = True
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        changed = True
    notes.append(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    if changed and "torch" in sys.modules:  # main() called from Python after torch was imported
        notes.append("torch was loaded before these were set, so OpenMP did not see them")
    return notes


def _one_line(error: BaseException) -> str:
    """An exception as one line: OSError as 'path: reason', duckdb's LINE/caret block dropped."""
    if isinstance(error, OSError) and error.strerror:
        paths = [str(p) for p in (error.filename, error.filename2) if p is not None]
        return f"{' -> '.join(paths)}: {error.strerror}" if paths else error.strerror
    lines = [line.strip() for line in str(error).splitlines()]
    lines = [line for line in lines if line and set(line) != {"^"}]
    return " ".join(lines) or type(error).__name__


def _user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that are the user's input or environment, not a hybridlm bug."""
    types: list[type[BaseException]] = [ValueError, OSError, MemoryError]
    duckdb = sys.modules.get("duckdb")  # only when a command used it
    if duckdb is not None:
        types.append(duckdb.Error)
    return tuple(types)


def _is_bug(error: BaseException) -> bool:
    duckdb = sys.modules.get("duckdb")
    if duckdb is not None and isinstance(error, duckdb.InternalException | duckdb.FatalException):
        return True
    return not isinstance(error, _user_error_types())


def _quiet_stdout() -> None:
    """After a closed pipe (``hybridlm query ... | head``): point stdout at devnull so that Python's
    final flush does not raise again (the recipe in the signal module's documentation)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    finally:
        os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    version, debug, threads = _global_options(argv)
    if version:  # without building the parser, which loads torch
        print(_version())
        return 0
    notes = _configure_threads(threads)
    command = "hybridlm"
    try:
        args = build_parser().parse_args(argv)
        command = f"hybridlm {args.command}"
        debug = debug or args.debug
        if args.threads is not None:
            import torch

            torch.set_num_threads(args.threads)
        if debug:
            if "torch" in sys.modules:  # loaded by now for every command but a bad one
                notes.append(f"torch threads {sys.modules['torch'].get_num_threads()}")
            print(f"{command}: debug: {'; '.join(notes)}", file=sys.stderr)
        status = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handlers below
        return status
    except KeyboardInterrupt:
        print(f"\n{command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _quiet_stdout()
        return 141  # what a shell reports for a command ended by SIGPIPE
    except Exception as error:
        if _is_bug(error):
            traceback.print_exc()
            print(
                f"{command}: internal error: {type(error).__name__}: {_one_line(error)}\n"
                "This is a bug in hybridlm; please report it with the traceback above.",
                file=sys.stderr,
            )
            return 1
        if debug:
            traceback.print_exc()
        print(f"{command}: error: {_one_line(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
