"""Run a hybridlm command on N expert-parallel ranks: joined under torchrun, or started here.

    torchrun --nproc-per-node 4 -m hybridlm profile debug-small --ep 4   # torchrun starts the ranks
    hybridlm profile debug-small --ep 4                                   # hybridlm starts them itself

Under torchrun (RANK, WORLD_SIZE and MASTER_ADDR in the environment) this process is one rank: it checks
WORLD_SIZE == --ep and joins the process group (gloo on CPU, NCCL on CUDA). Otherwise ``run_on_ranks``
spawns N local processes (gloo on a free loopback port), one torch thread each unless --threads says
otherwise, and waits for them. Rank 0 keeps this terminal's stdout and stderr (the command's output,
progress, the trace writer); the other ranks write nothing. A rank that fails stops the others at once
and the command fails with one line naming the rank; a rank left waiting in a collective (a peer that
hangs) gives up after EP_TIMEOUT_S.

Every rank builds the same model (a preset from the same seed; a checkpoint read with ``load_sharded``,
each rank its own experts) and keeps its share of the experts (``shard_experts``).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import multiprocessing.connection
import os
import pickle
import signal
import socket
import sys
import tempfile
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

if TYPE_CHECKING:
    from hybridlm.config import HybridConfig
    from hybridlm.model import HybridLM

# How long a rank waits in one collective (and at start-up for the others) before failing. Loading a
# large checkpoint on one rank while another waits is the longest legitimate wait.
EP_TIMEOUT_S = 600
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR")
PEER_GRACE_S = 5  # after a rank failed because its peer went away, how long to wait for that peer's own error

# rank_main(rank, world_size, device, *args) -> exit status; rank 0's is the command's. ``device`` is the
# rank's own: "cpu" or "cuda:LOCAL_RANK".
RankMain = Callable[..., int]


def is_torchrun() -> bool:
    """Whether torchrun (or another launcher setting the same variables) started this process as one rank."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def check_expert_parallel(ep: int, config: HybridConfig, device: str = "cpu") -> None:
    """A ValueError naming --ep for a world size this model, launcher or machine cannot run."""
    if ep < 1:
        raise ValueError(f"--ep {ep}: give the number of ranks to spread the experts over, 1 or more")
    if "E" not in config.pattern:
        raise ValueError(f"--ep {ep}: the model has no MoE blocks (pattern {config.pattern!r}): no experts to spread")
    num_experts = config.moe.num_experts
    if num_experts % ep:
        divisors = ", ".join(str(d) for d in range(1, num_experts + 1) if num_experts % d == 0)
        raise ValueError(f"--ep {ep}: {num_experts} experts do not divide over {ep} ranks; give one of {divisors}")
    if is_torchrun():
        world_size = int(os.environ["WORLD_SIZE"])
        if world_size != ep:
            raise ValueError(
                f"--ep {ep}, but torchrun started {world_size} ranks (WORLD_SIZE={world_size}): give the same number"
            )
    elif device.startswith("cuda") and ep > torch.cuda.device_count():
        gpus = torch.cuda.device_count()
        raise ValueError(f"--ep {ep} on {device}: needs {ep} GPUs, one per rank; this machine has {gpus}")


def run_on_ranks(ep: int, device: str, threads: int | None, rank_main: RankMain, *args: object) -> int:
    """``rank_main(rank, ep, rank's device, *args)`` on every rank of an ``ep``-rank process group; returns rank 0's
    status. Under torchrun this process is one of the ranks; otherwise ``ep`` local ranks are spawned
    (``rank_main`` and ``args`` must pickle) and this process waits for them. ``threads``: torch threads
    per spawned rank (default: the CPUs shared out, at least 1)."""
    if is_torchrun():
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        return _in_process_group(rank, world_size, local_rank, device, rank_main, args)
    _warn_if_time_shared(ep, device)
    threads = threads or max(1, _cpu_count() // ep)
    with tempfile.TemporaryDirectory(prefix="hybridlm-ep-") as errors:
        context = mp.get_context("spawn")
        port = _free_port()
        processes = [
            context.Process(
                target=_spawned_rank,
                args=(rank, ep, port, threads, device, errors, rank_main, args),
                name=f"hybridlm-rank{rank}",
            )
            for rank in range(ep)
        ]
        try:
            for process in processes:
                process.start()
            return _wait_for_ranks(processes, Path(errors))
        finally:
            _stop(processes)


def build_rank_model(name_or_path: str, seed: int, dtype: torch.dtype | None, device: str, rank: int) -> HybridLM:
    """This rank's model: a preset built from ``seed`` (the same weights on every rank) or a checkpoint
    with only this rank's experts read, its experts sharded over the process group."""
    from hybridlm.distributed import load_sharded, shard_experts
    from hybridlm.loading import load_model
    from hybridlm.presets import PRESETS

    if name_or_path in PRESETS:
        return shard_experts(load_model(name_or_path, seed=seed, dtype=dtype, device=device, quiet=rank != 0))
    return load_sharded(name_or_path, dtype=dtype, device=device)


def rank_device(device: str, local_rank: int) -> str:
    """The device of one rank: the CPU, or GPU ``local_rank`` when ``device`` is cuda."""
    return f"cuda:{local_rank}" if device.startswith("cuda") else "cpu"


# -- hybridlm generate --ep N ------------------------------------------------------------------------------


def generate_on_ranks(args: argparse.Namespace, prompt_ids: list[int], tokenizer: object) -> int:
    """``hybridlm generate --ep N``: the prompt is replicated (every rank runs the same one sequence, its
    experts serving all ranks' tokens); rank 0 prints the text. Ranks stop together: rank 0 decides each
    step (its EOS) and tells the others, so every rank runs the same number of forward calls."""
    return run_on_ranks(args.ep, args.device, args.threads, _generate_rank, args, prompt_ids, tokenizer)


def _generate_rank(
    rank: int, world_size: int, device: str, args: argparse.Namespace, prompt_ids: list[int], tokenizer
) -> int:
    from hybridlm.generation import stream_generate
    from hybridlm.loading import parse_dtype
    from hybridlm.tokenizer import IncrementalDetokenizer

    model = build_rank_model(args.model, args.seed, parse_dtype(args.dtype), device, rank)
    if args.routing_skew:
        from hybridlm.distributed.skew import apply_routing_skew

        apply_routing_skew(model, args.routing_skew, seed=args.seed)
    tokens = stream_generate(
        model, [prompt_ids], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed, allow_longer_than_context=args.allow_longer_than_context,
    )  # fmt: skip
    detokenizer = IncrementalDetokenizer(tokenizer)
    if rank == 0:
        print(args.prompt, end="", flush=True)
    stop = torch.zeros(1, dtype=torch.int64, device=device)
    for token in tokens:
        if rank == 0:
            print(detokenizer.add(int(token[0])), end="", flush=True)
            stop.fill_(int(token[0]) == tokenizer.eos_token_id)
        dist.broadcast(stop, src=0)
        if stop.item():
            break
    if rank == 0:
        print(detokenizer.finish())
    return 0


# -- one rank ------------------------------------------------------------------------------------------


def _in_process_group(
    rank: int, world_size: int, local_rank: int, device: str, rank_main: RankMain, args: tuple
) -> int:
    own_device = rank_device(device, local_rank)
    backend = "nccl" if own_device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(own_device)
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=EP_TIMEOUT_S))
    try:
        return rank_main(rank, world_size, own_device, *args)
    finally:
        dist.destroy_process_group()


def _spawned_rank(
    rank: int, world_size: int, port: int, threads: int, device: str, errors: str, rank_main: RankMain, args: tuple
) -> None:
    _die_with_parent()
    if rank != 0:
        _silence()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    try:
        status = _in_process_group(rank, world_size, rank, device, rank_main, args)
    except KeyboardInterrupt:
        status = 130
    except Exception as error:  # every failure goes to the parent, which names it
        _write_error(Path(errors) / f"rank{rank}.pickle", error)
        status = 1
    exit_without_teardown(status)


def exit_without_teardown(status: int) -> NoReturn:
    """End a rank process after its process group is gone: the atexit handlers run and stdout / stderr are
    flushed, but not the interpreter's teardown. A gloo worker thread can still hold the tensors of the last
    collectives for a moment after they return; when it drops them during the teardown it asks for the GIL,
    the finalising interpreter ends the thread, and the process aborts ("terminate called without an active
    exception", pytorch/pytorch#190489): 5 of 20 runs of the 4-rank serving test, after correct outputs."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


def _die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent dies, so no rank outlives a killed command."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _silence() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.close(devnull)


def _write_error(path: Path, error: BaseException) -> None:
    from hybridlm.cli import _is_bug

    record = {
        "message": f"{type(error).__name__}: {error}" if _is_bug(error) else str(error),
        "is_bug": _is_bug(error),
        "is_peer_failure": _is_peer_failure(error),
        "traceback": traceback.format_exc(),
    }
    path.write_bytes(pickle.dumps(record))


def _is_peer_failure(error: BaseException) -> bool:
    """Whether ``error`` only says another rank went away (a collective lost its peer or timed out)."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error).lower()
    return any(s in text for s in ("connection closed by peer", "connection reset", "timed out", "broken pipe"))


# -- the parent of spawned ranks -----------------------------------------------------------------------


def _wait_for_ranks(processes: list, errors: Path) -> int:
    waiting = {process.sentinel: rank for rank, process in enumerate(processes)}
    failed: list[int] = []
    while waiting:
        # Once a rank failed, wait a little for the others: a rank that only lost its peer (the failing
        # rank closed its connections) often exits first, and the failing rank's own error says more.
        timeout = PEER_GRACE_S if failed else None
        ready = multiprocessing.connection.wait(list(waiting), timeout=timeout)
        for sentinel in ready:
            rank = waiting.pop(sentinel)
            processes[rank].join()
            if _has_failed(processes[rank], errors / f"rank{rank}.pickle"):
                failed.append(rank)
        if failed and (not ready or not _only_peer_failures(failed, errors)):
            break
    if failed:
        _stop(processes)
        raise _failure(processes, failed, errors)
    return processes[0].exitcode


def _only_peer_failures(failed: list[int], errors: Path) -> bool:
    for rank in failed:
        path = errors / f"rank{rank}.pickle"
        if not path.exists() or not pickle.loads(path.read_bytes())["is_peer_failure"]:
            return False
    return True


def _has_failed(process, error_file: Path) -> bool:
    return process.exitcode < 0 or error_file.exists() or (process.exitcode != 0 and process.exitcode != 130)


def _stop(processes: list) -> None:
    for process in processes:
        if process.is_alive():
            process.kill()
    for process in processes:
        if process.pid is not None:
            process.join()


def _failure(processes: list, failed: list[int], errors: Path) -> Exception:
    """One exception naming the rank that failed first. Of ranks that failed together, one with its own
    error goes before one that only lost its peer."""
    world_size = len(processes)
    records = {}
    for rank in failed:
        path = errors / f"rank{rank}.pickle"
        if path.exists():
            records[rank] = pickle.loads(path.read_bytes())
    rank = min(failed, key=lambda r: (records.get(r, {}).get("is_peer_failure", False), r not in records, r))
    where = f"rank {rank} of {world_size}"
    record = records.get(rank)
    if record is None:
        exitcode = processes[rank].exitcode
        how = f"was killed by {signal.Signals(-exitcode).name}" if exitcode < 0 else f"exited with status {exitcode}"
        return ChildProcessError(f"{where} {how}; the other ranks were stopped")
    if record["is_bug"]:
        sys.stderr.write(f"{where} failed:\n{record['traceback']}")
        return RuntimeError(f"{where}: {record['message']}")
    return ValueError(f"{where}: {record['message']}")


def _warn_if_time_shared(ep: int, device: str) -> None:
    cpus = _cpu_count()
    if device == "cpu" and ep > cpus:
        print(
            f"warning: --ep {ep} starts {ep} ranks on {cpus} CPU{'s' * (cpus != 1)}: they will time-share the cores, "
            "and time spent waiting in collectives will be mostly scheduling",
            file=sys.stderr,
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


__all__ = [
    "EP_TIMEOUT_S",
    "build_rank_model",
    "check_expert_parallel",
    "exit_without_teardown",
    "generate_on_ranks",
    "is_torchrun",
    "rank_device",
    "run_on_ranks",
]
