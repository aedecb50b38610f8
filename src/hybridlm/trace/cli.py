"""Subcommands of ``hybridlm`` for traces: profile, report, query, import."""

from __future__ import annotations

import argparse
import contextlib
import math
import shlex
import sys
import time
from pathlib import Path

from hybridlm.cli_flags import add_device_flag, add_dtype_flag, add_expert_parallel_flags
from hybridlm.trace.analysis import P50_THRESHOLD, P99_THRESHOLD
from hybridlm.trace.schema import TraceError


def _prompt_range(text: str) -> tuple[int, int]:
    low, dash, high = text.partition("-")
    try:
        return int(low), int(high if dash else low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LEN or MIN-MAX, got {text!r}") from None


def check_device(name: str) -> str:
    """`name` if this machine has that device and profiling runs there; a ValueError saying what is there."""
    from hybridlm.loading import resolve_device

    device = resolve_device(name)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: profiling runs on cpu or cuda")
    return name


def cmd_profile(args: argparse.Namespace) -> int:
    from hybridlm.loading import parse_dtype, resolve_config
    from hybridlm.trace.profile import Workload
    from hybridlm.trace.store import check_trace_path

    low, high = args.prompt_len
    workload = Workload(args.batch_size, low, high, args.new_tokens, args.requests, args.seed)
    workload.check()  # a bad workload, device or database path is refused before the model is built
    check_trace_path(Path(args.db))
    device = check_device(args.device)
    parse_dtype(args.dtype)
    command = "hybridlm " + shlex.join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("hybridlm") else ""
    if args.routing_skew is not None:
        from hybridlm.distributed.skew import check_routing_skew

        check_routing_skew(args.routing_skew)
    if args.ep is None:
        return _profile(args, workload, device, command)
    from hybridlm.distributed.launch import check_expert_parallel, run_on_ranks
    from hybridlm.trace.profile import check_shards

    if args.kernels:
        raise ValueError(f"--kernels with --ep {args.ep}: operator traces of several ranks are not supported yet")
    check_expert_parallel(args.ep, resolve_config(args.model), device)
    check_shards(workload, args.ep)
    return run_on_ranks(args.ep, device, args.threads, _profile_rank, args, workload, command)


def _profile(args: argparse.Namespace, workload, device: str, command: str) -> int:
    """One process, every expert in it."""
    from hybridlm.loading import load_model, parse_dtype
    from hybridlm.trace.profile import run_profile
    from hybridlm.trace.store import TraceStore

    model = load_model(args.model, seed=args.seed, dtype=parse_dtype(args.dtype), device=device)
    notes = _apply_skew(model, args)
    began = time.perf_counter()
    with TraceStore(args.db) as store:
        run_id = run_profile(model, store, workload, args.model, kernels=args.kernels, command=command, notes=notes)
    _print_profile(args, workload, run_id, time.perf_counter() - began)
    return 0


def _profile_rank(rank: int, world_size: int, device: str, args: argparse.Namespace, workload, command: str) -> int:
    """One rank of `hybridlm profile --ep N`: its experts, its share of each batch; rank 0 writes and prints."""
    from hybridlm.distributed.launch import build_rank_model
    from hybridlm.loading import parse_dtype
    from hybridlm.trace.profile import run_profile_on_ranks
    from hybridlm.trace.store import TraceStore

    model = build_rank_model(args.model, args.seed, parse_dtype(args.dtype), device, rank)
    notes = _apply_skew(model, args)
    began = time.perf_counter()
    with TraceStore(args.db) if rank == 0 else contextlib.nullcontext() as store:
        run_id = run_profile_on_ranks(model, store, workload, args.model, rank, world_size, command, notes)
    if rank == 0:
        _print_profile(args, workload, run_id, time.perf_counter() - began)
    return 0


def _apply_skew(model, args: argparse.Namespace) -> dict:
    """The routing skew asked for (none for 0), as the run's notes record it."""
    if not args.routing_skew:
        return {}
    from hybridlm.distributed.skew import apply_routing_skew

    skew = apply_routing_skew(model, args.routing_skew, seed=args.seed)
    hottest = {layer: skew.hottest_experts(layer) for layer in skew.offsets}
    return {"routing_skew": {"exponent": args.routing_skew, "seed": args.seed, "hottest_experts": hottest}}


def _print_profile(args: argparse.Namespace, workload, run_id: str, elapsed: float) -> None:
    from hybridlm.trace.report import print_profile_summary
    from hybridlm.trace.store import open_readonly

    ranks = f" on {args.ep} ranks" if args.ep else ""
    skew = f", routing skew {args.routing_skew:g}" if args.routing_skew else ""
    print(
        f"run {run_id}: {workload.num_requests} requests in batches of {workload.batch_size}, prompts "
        f"{workload.min_prompt_len}-{workload.max_prompt_len} tokens, {workload.new_tokens} new tokens{ranks}{skew}; "
        f"traced in {elapsed:.1f} s into {args.db}"
    )
    con = open_readonly(args.db)
    try:
        print_profile_summary(con, run_id)
    finally:
        con.close()


def cmd_report(args: argparse.Namespace) -> int:
    from hybridlm.trace.report import report_main

    for flag, value in (("--p50-threshold", args.p50_threshold), ("--p99-threshold", args.p99_threshold)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{flag} {value}: give the fraction of a rise that fails the gate, > 0 (3.0 = +300%)")

    return report_main(
        args.db,
        run=args.run,
        baseline=args.baseline,
        run2=args.run2,
        plot=args.plot,
        perfetto=args.perfetto,
        as_json=args.json,
        source=args.source,
        p50_threshold=args.p50_threshold,
        p99_threshold=args.p99_threshold,
    )


def cmd_query(args: argparse.Namespace) -> int:
    from hybridlm.trace.query import format_csv, format_json, format_table, run_query

    columns, rows = run_query(args.db, args.sql)
    if args.json:
        print(format_json(columns, rows))
    elif args.csv:
        sys.stdout.write(format_csv(columns, rows))
    else:
        print(format_table(columns, rows))
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from hybridlm.trace.importers import import_trace
    from hybridlm.trace.store import TraceStore

    with TraceStore(args.db) as store:
        run_id = import_trace(args.file, store, command="hybridlm " + shlex.join(sys.argv[1:]))
        counts = store.connection.execute(
            "SELECT source, count(*) FROM events WHERE run_id = ? GROUP BY source ORDER BY 2 DESC", [run_id]
        ).fetchall()
    summary = ", ".join(f"{n:,} {source}" for source, n in counts)
    print(f"imported {args.file} as run {run_id} into {args.db}: {summary or 'no events'}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    about = "trace a prefill + decode workload and print the per-layer-type decomposition"
    p = sub.add_parser(
        "profile",
        help=about,
        description=f"{about}. Random prompts (seeded) run in batches through the model with every block call "
        "timed into a DuckDB file; `hybridlm report` and `hybridlm query` read it.",
    )
    p.add_argument("model", metavar="MODEL", help="preset name (random weights) or checkpoint directory")
    p.add_argument("--db", default="trace.duckdb", help="DuckDB file to write (runs accumulate; default trace.duckdb)")
    p.add_argument("--batch-size", type=int, default=4, metavar="N", help="prompts per batch (default 4)")
    p.add_argument("--prompt-len", type=_prompt_range, default=(16, 128), help="LEN or MIN-MAX (default 16-128)")
    p.add_argument("--new-tokens", type=int, default=32, metavar="N", help="tokens generated per prompt (default 32)")
    p.add_argument("--requests", type=int, default=16, metavar="N", help="number of prompts (default 16)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the prompts and a preset's weights")
    add_dtype_flag(p)
    add_device_flag(p)
    p.add_argument("--kernels", action="store_true", help="also record every operator/kernel under torch.profiler")
    add_expert_parallel_flags(
        p, ranks="each batch is split over the ranks; all ranks' calls go to --db with their rank"
    )
    p.set_defaults(func=cmd_profile)

    about = "decomposition tables, baseline comparison (CI gate), PNG and Perfetto"
    p = sub.add_parser(
        "report",
        help=about,
        description=f"{about}. With --baseline, exits 1 when a layer type got slower beyond the thresholds.",
    )
    p.add_argument("db", metavar="DB", help="trace database (DuckDB file) written by profile or import")
    p.add_argument("--run", default=None, help="run id (default: the latest)")
    p.add_argument("--baseline", default=None, help="DuckDB file of the baseline run")
    p.add_argument(
        "--run2",
        default=None,
        help="baseline run id: in the --baseline file (default: its latest), or without --baseline a run of DB itself",
    )
    p.add_argument(
        "--plot",
        default=None,
        help="write the latency distributions and a step's timeline to exactly this file (PNG; .pdf / .svg by suffix)",
    )
    p.add_argument("--perfetto", default=None, help="write a Chrome/Perfetto trace JSON")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of tables")
    p.add_argument(
        "--source", default=None, help="events to decompose: layer, cuda, cpu, ... (default: best available)"
    )
    p.add_argument(
        "--p50-threshold",
        type=float,
        default=P50_THRESHOLD,
        help=f"flag a p50 rise above this fraction (default {P50_THRESHOLD:g}, i.e. +{P50_THRESHOLD * 100:.0f}%%)",
    )
    p.add_argument("--p99-threshold", type=float, default=P99_THRESHOLD,
                   help=f"flag a p99 rise above this fraction (default {P99_THRESHOLD:g})")  # fmt: skip
    p.set_defaults(func=cmd_report)

    about = "run one read-only SQL statement on a trace database and print the result"
    p = sub.add_parser("query", help=about, description=f"{about} (tables: runs, events, routing).")
    p.add_argument("db", metavar="DB", help="trace database (DuckDB file); opened read-only, never created")
    p.add_argument("sql", metavar="SQL", help="one statement: SELECT, SHOW, DESCRIBE, EXPLAIN, PRAGMA or CALL")
    output = p.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print a JSON list of row objects")
    output.add_argument("--csv", action="store_true", help="print CSV (RFC 4180, header row, NULL as empty field)")
    p.set_defaults(func=cmd_query)

    about = "import a Kineto JSON, Nsight Systems SQLite or Ingero SQLite trace"
    p = sub.add_parser(
        "import",
        help=about,
        description=f"{about} as a new run, its kernels attributed to layer types where the trace says so.",
    )
    p.add_argument("file", metavar="FILE", help="torch.profiler/Kineto .json or .json.gz, Nsight .sqlite, Ingero .db")
    p.add_argument("--db", default="trace.duckdb", help="DuckDB file to add the run to (default trace.duckdb)")
    p.set_defaults(func=cmd_import)


__all__ = ["TraceError", "register"]
