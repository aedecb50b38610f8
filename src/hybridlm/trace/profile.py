"""``hybridlm profile``: run a mixed prefill + decode workload under the Tracer.

Requests arrive in batches of ``batch_size`` prompts whose lengths are drawn from a range, are
left-padded into one prefill, then decode ``new_tokens`` tokens: the shape of serving traffic,
where prefill steps are long and bursty and decode steps short and many.
With ``kernels=True`` the run also goes under torch.profiler, every block inside a
``record_function`` range ``L{index}.{layer_type}``, and each CPU operator / CUDA kernel is stored
(``source = 'cpu'`` / ``'cuda'``) attributed to the block that launched it.

With the experts spread over ranks (``run_profile_on_ranks``, ``hybridlm profile --ep N``) every rank
draws the same batches and runs its share of each: prompts r, r + N, r + 2N, ... of a batch on rank r
(the batch is sharded, as in data parallelism), left-padded to the longest prompt of the whole batch so
that every rank runs the same forward calls (each MoE block's collectives need every rank). Each rank
traces its block calls (``Tracer``) and its MoE blocks' parts and collectives (``CollectiveTrace``);
after each batch rank 0 gathers every rank's rows and writes them, each with its rank.
"""

from __future__ import annotations

import contextlib
import json
import random
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hybridlm.generation import generate
from hybridlm.model import HybridLM
from hybridlm.progress import progress
from hybridlm.trace.recorder import Tracer
from hybridlm.trace.store import TraceStore

# A profile is a sample, not a benchmark of endurance: past these a flag is a typo (the prompts are
# built in memory up front, so 10**20 requests would never start).
MAX_REQUESTS = 100_000
MAX_PROMPT_LEN = 1_000_000


@dataclass
class Workload:
    batch_size: int = 4
    min_prompt_len: int = 16
    max_prompt_len: int = 128
    new_tokens: int = 32
    num_requests: int = 16
    seed: int = 0

    def check(self) -> None:
        """A ValueError naming the flag for a workload that cannot run (or would never end)."""
        if self.min_prompt_len < 1 or self.max_prompt_len < self.min_prompt_len:
            raise ValueError(f"--prompt-len {self.min_prompt_len}-{self.max_prompt_len}: need 1 <= MIN <= MAX")
        if self.max_prompt_len > MAX_PROMPT_LEN:
            raise ValueError(f"--prompt-len {self.max_prompt_len}: at most {MAX_PROMPT_LEN:,} tokens per prompt")
        for flag, value, most in (
            ("--batch-size", self.batch_size, MAX_REQUESTS),
            ("--requests", self.num_requests, MAX_REQUESTS),
            ("--new-tokens", self.new_tokens, MAX_PROMPT_LEN),
        ):
            if not 1 <= value <= most:
                raise ValueError(f"{flag} {value}: give 1 to {most:,}")
        if not 0 <= self.seed < 2**64:  # what torch.manual_seed takes, as `generate --seed`
            raise ValueError(f"--seed {self.seed}: give 0 to 2**64 - 1")

    def batches(self, vocab_size: int) -> list[list[list[int]]]:
        """The prompts, as token lists grouped in batches (deterministic in ``seed``)."""
        self.check()
        rng = random.Random(self.seed)
        prompts = [
            [rng.randrange(vocab_size) for _ in range(rng.randint(self.min_prompt_len, self.max_prompt_len))]
            for _ in range(self.num_requests)
        ]
        return [prompts[i : i + self.batch_size] for i in range(0, len(prompts), self.batch_size)]


def run_profile(
    model: HybridLM,
    store: TraceStore,
    workload: Workload,
    model_name: str,
    kernels: bool = False,
    command: str = "",
    notes: dict | None = None,
) -> str:
    """Trace ``workload`` on ``model`` into ``store``; returns the run id. ``notes``: more facts for the
    run's notes (JSON), e.g. a routing skew."""
    batches = workload.batches(model.config.vocab_size)
    generate(model, batches[0][:1], max_new_tokens=2)  # warm-up: first-call allocations are not the model
    run_notes = {"workload": asdict(workload), "kernels": kernels, "threads": torch.get_num_threads(), **(notes or {})}
    tracer = Tracer(
        store,
        model=model_name,
        device=_device_name(model),
        config=model.config.to_dict(),
        command=command,
        notes=json.dumps(run_notes),
    )
    tracer.attach(model)
    # A run interrupted here (Ctrl-C, an error) keeps what was flushed and stays marked incomplete.
    with tracer, progress(f"profiling {model_name}", total=len(batches)) as advance:
        if kernels:
            _run_under_profiler(model, tracer, store, batches, workload.new_tokens, advance)
        else:
            for batch in batches:
                generate(model, batch, max_new_tokens=workload.new_tokens)
                advance()
    return tracer.run_id


def _device_name(model: HybridLM) -> str:
    device = str(model.device)
    if model.device.type == "cuda":
        device = f"{device} ({torch.cuda.get_device_name(model.device)})"
    return device


def _run_under_profiler(
    model: HybridLM, tracer: Tracer, store: TraceStore, batches, new_tokens: int, advance: Callable[[], None]
) -> None:
    from torch.profiler import ProfilerActivity, profile

    from hybridlm.trace.importers.kineto import import_kineto

    activities = [ProfilerActivity.CPU]
    if model.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    tracer.emit_ranges = True
    with profile(activities=activities) as prof:
        for batch in batches:
            generate(model, batch, max_new_tokens=new_tokens)
            advance()
    tracer.emit_ranges = False
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kineto.json"
        prof.export_chrome_trace(str(path))
        import_kineto(path, store, run_id=tracer.run_id)


# -- expert parallel: every rank runs its share, rank 0 writes ------------------------------------------


def check_shards(workload: Workload, world_size: int) -> None:
    """A ValueError naming the flag when some batch has fewer prompts than ranks (a rank would sit out
    a batch, and every rank must join each MoE block's collectives)."""
    workload.check()
    if workload.batch_size < world_size:
        raise ValueError(
            f"--batch-size {workload.batch_size} with --ep {world_size}: each batch is split over the ranks, "
            f"so give --batch-size {world_size} or more"
        )
    last = workload.num_requests % workload.batch_size
    if workload.num_requests < world_size or 0 < last < world_size:
        raise ValueError(
            f"--requests {workload.num_requests} in batches of {workload.batch_size} leaves a batch of "
            f"{last or workload.num_requests} prompts for {world_size} ranks; give a multiple of --batch-size"
        )


def rank_share(batch: list[list[int]], rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [b, T], attention mask [b, T]): prompts rank, rank + W, ... of ``batch``, left-padded to
    T = the longest prompt of the whole batch, so every rank's forward calls match."""
    length = max(len(prompt) for prompt in batch)
    share = batch[rank::world_size]
    ids = torch.tensor([[0] * (length - len(p)) + p for p in share])
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in share])
    return ids, mask


class RankRows:
    """What a Tracer writes, kept in memory (it stands in for a TraceStore) until handed over."""

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.routing: list[tuple] = []

    def add_events(self, run_id: str, rows) -> None:
        self.events.extend(tuple(row) for row in rows)

    def add_routing(self, run_id: str, rows) -> None:
        self.routing.extend(tuple(row) for row in rows)

    def flush(self) -> None:
        pass

    def end_run(self, run_id: str) -> None:
        pass


def run_profile_on_ranks(
    model: HybridLM,
    store: TraceStore | None,
    workload: Workload,
    model_name: str,
    rank: int,
    world_size: int,
    command: str = "",
    notes: dict | None = None,
) -> str | None:
    """Trace ``workload`` on a model whose experts are sharded over a process group of ``world_size``
    ranks; call on every rank, with ``store`` on rank 0 (None elsewhere). Returns the run id on rank 0."""
    import torch.distributed as dist

    from hybridlm.distributed import CollectiveTrace, clock_ns

    check_shards(workload, world_size)
    batches = workload.batches(model.config.vocab_size)
    generate(model, batches[0][:1], max_new_tokens=2)  # warm-up, the same on every rank
    run_id = None
    if rank == 0:
        run_notes = {"workload": asdict(workload), "threads": torch.get_num_threads(), **(notes or {})}
        run_notes["expert_parallel"] = {"world_size": world_size, "inputs": "batch sharded over ranks"}
        backend = dist.get_backend()
        run_id = store.new_run(
            model=model_name, device=f"{_device_name(model)}, {world_size} ranks ({backend})",
            config=model.config.to_dict(), command=command, notes=json.dumps(run_notes),
        )  # fmt: skip
    shared = [clock_ns()]
    dist.broadcast_object_list(shared, src=0)  # one time origin for every rank: one clock (CLOCK_MONOTONIC)
    rows = RankRows()
    tracer = Tracer(rows, run_id=run_id or "rank", rank=rank).attach(model)
    collectives = CollectiveTrace(rank, origin_ns=shared[0]).attach(model)
    # The Tracer times from its own origin on the same clock (perf_counter is CLOCK_MONOTONIC on Linux).
    shift_us = (tracer.origin_ns - shared[0]) / 1000
    try:
        bar = progress(f"profiling {model_name} on {world_size} ranks", total=len(batches))
        with bar if rank == 0 else contextlib.nullcontext(lambda steps=1: None) as advance:
            for batch in batches:
                ids, mask = rank_share(batch, rank, world_size)
                generate(model, ids, max_new_tokens=workload.new_tokens, attention_mask=mask)
                events, routing = _take_rows(rows, collectives, shift_us)
                gathered = [None] * world_size if rank == 0 else None
                dist.gather_object((events, routing), gathered, dst=0)
                if rank == 0:
                    for rank_events, rank_routing in gathered:
                        store.add_events(run_id, rank_events)
                        store.add_routing(run_id, rank_routing)
                    store.flush()
                advance()
    finally:
        tracer.detach()
        collectives.detach()
    if rank == 0:
        store.end_run(run_id)
    return run_id


def _take_rows(rows: RankRows, collectives, shift_us: float) -> tuple[list[tuple], list[tuple]]:
    """This rank's rows since the last call: the Tracer's, moved onto the shared time origin, and the
    collectives', given the phase the Tracer saw for their step."""
    events, routing = rows.events, rows.routing
    rows.events, rows.routing = [], []
    spans, collectives.rows = collectives.rows, []
    # EVENT_ROW_COLUMNS: source, name, layer, layer_type, phase, step, start_us, ...
    phases = {row[5]: row[4] for row in events if row[0] == "step"}
    events = [(*row[:6], row[6] + shift_us, *row[7:]) for row in events]
    events += [(*row[:4], phases.get(row[5]), *row[5:]) for row in spans]
    return events, routing
