"""``hybridlm profile``: run a mixed prefill + decode workload under the Tracer.

Requests arrive in batches of ``batch_size`` prompts whose lengths are drawn from a range, are
left-padded into one prefill, then decode ``new_tokens`` tokens: the shape of serving traffic,
where prefill steps are long and bursty and decode steps short and many.
With ``kernels=True`` the run also goes under torch.profiler, every block inside a
``record_function`` range ``L{index}.{layer_type}``, and each CPU operator / CUDA kernel is stored
(``source = 'cpu'`` / ``'cuda'``) attributed to the block that launched it.
"""

from __future__ import annotations

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
    model: HybridLM, store: TraceStore, workload: Workload, model_name: str, kernels: bool = False, command: str = ""
) -> str:
    """Trace ``workload`` on ``model`` into ``store``; returns the run id."""
    batches = workload.batches(model.config.vocab_size)
    generate(model, batches[0][:1], max_new_tokens=2)  # warm-up: first-call allocations are not the model
    device = str(model.device)
    if model.device.type == "cuda":
        device = f"{device} ({torch.cuda.get_device_name(model.device)})"
    tracer = Tracer(
        store,
        model=model_name,
        device=device,
        config=model.config.to_dict(),
        command=command,
        notes=json.dumps({"workload": asdict(workload), "kernels": kernels, "threads": torch.get_num_threads()}),
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
