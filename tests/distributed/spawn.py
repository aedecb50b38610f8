"""Run a function on W real torch.distributed ranks (gloo on loopback), each its own process."""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hybridlm.distributed.launch import exit_without_teardown

# A rank left waiting in a collective (a bug: some rank skipped it) fails after this, not never.
COLLECTIVE_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world_size: int, worker: Callable[..., object], *args: object, timeout_s: float = 120) -> list:
    """``worker(rank, world_size, *args)`` on ``world_size`` spawned ranks of one gloo group; returns
    what each returned (through torch.save), rank 0's first. A failing rank fails the call with its
    traceback; a group still running after ``timeout_s`` is killed and fails it."""
    with tempfile.TemporaryDirectory() as results:
        context = mp.start_processes(
            _rank_main,
            args=(world_size, free_port(), worker, args, results),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout_s
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                raise AssertionError(f"{world_size} ranks of {worker.__name__} still running after {timeout_s} s")
        return [torch.load(Path(results) / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


def _rank_main(rank: int, world_size: int, port: int, worker: Callable, args: tuple, results: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)  # ranks share the machine's cores
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        result = worker(rank, world_size, *args)
        torch.save(result, Path(results) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    exit_without_teardown(0)  # as hybridlm's own ranks end (a failure above propagates to torch's handler)
