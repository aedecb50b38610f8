"""Tracer: times every block call of a built model, from outside, into a TraceStore.

It attaches to ``model.block_observer`` (the model's one hook point) and records, per block call:
run, step, phase, layer index, layer type, start, duration, batch size and token count; per MoE
block, the tokens routed to each expert. On CPU the clock is ``perf_counter_ns``; on CUDA a pair of
events per block, resolved once at the end of the step (no synchronisation per block).

A step is one forward call. Callers may mark steps with ``tracer.step(phase)``; otherwise the
tracer opens one at block 0 and closes it after the last block, with the phase inferred
(``train`` when the model is training, ``prefill`` for more than one token, else ``decode``).
Steps are also stored as events with ``source = 'step'`` (name = phase), the wall time that block
shares are measured against. A serving engine names the requests in each step
(``tracer.step(phase, requests=[(request_id, tokens), ...])``): one event each with
``source = 'request'``, ``name`` = the request id, the step's time and phase, and ``tokens`` = that
request's tokens in the step, so a query can join a request's life with the block calls of its steps.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from hybridlm.trace.store import TraceStore


class Tracer:
    def __init__(self, store: TraceStore, run_id: str | None = None, *, rank: int = 0, **run_info: object) -> None:
        """``run_info`` (model, device, config, command, notes) describes a new run when ``run_id`` is None."""
        self.store = store
        self.run_id = run_id or store.new_run(kind="recorded", **run_info)
        self.rank = rank
        self.pid = os.getpid()
        self.model: nn.Module | None = None
        self.step_index = -1
        self._phase: str | None = None
        self._is_explicit_step = False
        self._last_block = -1
        self._batch = self._tokens = 0
        self._use_cuda_events = False
        self._pending: list[tuple] = []  # (index, layer_type, start, end) with ns ints or CUDA events
        self._routing: list[tuple[int, Tensor]] = []
        self._requests: list[tuple[str, int]] = []  # (request id, tokens) in the current step
        self._step_start_ns = 0
        self.emit_ranges = False  # also open a torch.profiler record_function range per block
        self._range: torch.profiler.record_function | None = None
        self._step_range: torch.profiler.record_function | None = None
        self._origin_ns = time.perf_counter_ns()

    @property
    def origin_ns(self) -> int:
        """Where this Tracer's start times count from, on ``time.perf_counter_ns``'s clock."""
        return self._origin_ns

    def timestamp(self) -> object:
        """Now, as this Tracer times calls: a recorded CUDA event for a model on a GPU, else perf_counter_ns."""
        if self._use_cuda_events:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter_ns()

    def record_call(self, index: int, layer_type: str, start: object, end: object) -> bool:
        """Add a call timed elsewhere (two ``timestamp()``s) to the open step, written with its block calls
        when the step closes; False, and nothing recorded, when no step is open."""
        if self._phase is None:
            return False
        self._pending.append((index, layer_type, start, end))
        return True

    # -- attaching ---------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> Tracer:
        if getattr(model, "block_observer", None) is not None:
            raise ValueError("the model already has a block observer attached; detach it first")
        self.model = model
        self._last_block = len(model.layers) - 1
        self._use_cuda_events = next(model.parameters()).is_cuda
        model.block_observer = self
        return self

    def detach(self) -> None:
        if self.model is not None and self.model.block_observer is self:
            self.model.block_observer = None
        self.model = None

    def close(self, complete: bool = True) -> None:
        """Detach and flush; with ``complete`` (the work ran to its end) also mark the run complete.
        Pass ``complete=False`` when the work was interrupted: the run then reads as incomplete."""
        self.detach()
        if complete:
            self.store.end_run(self.run_id)
        else:
            self.store.flush()

    def __enter__(self) -> Tracer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        self.close(complete=exc_type is None)

    # -- steps -------------------------------------------------------------------------------------
    @contextmanager
    def step(self, phase: str, requests: list[tuple[str, int]] | None = None) -> Iterator[None]:
        """Mark one forward call (or several, e.g. a training step's forward + backward) as one step;
        ``requests``: the (request id, tokens) a serving step runs, recorded with it."""
        self._begin_step(phase, explicit=True)
        self._requests = list(requests or [])
        try:
            yield
        finally:
            self._end_step()

    def _begin_step(self, phase: str, explicit: bool) -> None:
        self.step_index += 1
        self._phase = phase
        self._is_explicit_step = explicit
        self._batch = self._tokens = 0
        if self._use_cuda_events:
            torch.cuda.current_stream().synchronize()  # once per step: the step's wall clock starts here
            self._first_event = torch.cuda.Event(enable_timing=True)
            self._first_event.record()
        self._step_start_ns = time.perf_counter_ns()
        if self.emit_ranges:  # the importers read the step and phase of profiled kernels from this range
            self._step_range = torch.profiler.record_function(f"hybridlm.step{self.step_index}.{phase}")
            self._step_range.__enter__()

    def _end_step(self) -> None:
        if self._step_range is not None:
            self._step_range.__exit__(None, None, None)
            self._step_range = None
        if self._use_cuda_events:
            torch.cuda.current_stream().synchronize()
        end_ns = time.perf_counter_ns()
        rows = []
        step_start_us = (self._step_start_ns - self._origin_ns) / 1000
        for index, layer_type, start, end in self._pending:
            if self._use_cuda_events:
                offset_us = self._first_event.elapsed_time(start) * 1000
                duration_us = start.elapsed_time(end) * 1000
                start_us = step_start_us + offset_us
            else:
                start_us = (start - self._origin_ns) / 1000
                duration_us = (end - start) / 1000
            rows.append(self._row("layer", f"L{index}.{layer_type}", index, layer_type, start_us, duration_us))
        step_us = (end_ns - self._step_start_ns) / 1000
        rows.append(self._row("step", self._phase, None, None, step_start_us, step_us))
        for request_id, tokens in self._requests:
            row = list(self._row("request", request_id, None, None, step_start_us, step_us))
            row[8], row[9] = len(self._requests), tokens  # batch: requests in the step; tokens: this one's
            rows.append(tuple(row))
        self._requests = []
        self.store.add_events(self.run_id, rows)
        if self._routing:
            routing_rows = []
            for index, counts in self._routing:
                for expert, tokens in enumerate(counts.tolist()):
                    routing_rows.append((self.step_index, self._phase, index, expert, tokens, 0, self.rank))
            self.store.add_routing(self.run_id, routing_rows)
        self._pending.clear()
        self._routing.clear()
        self._phase = None

    def _row(self, source, name, layer, layer_type, start_us, duration_us) -> tuple:
        return (source, name, layer, layer_type, self._phase, self.step_index, start_us, duration_us,
                self._batch, self._tokens, self.rank, None, self.pid, None)  # fmt: skip

    # -- the model's hook point --------------------------------------------------------------------
    def before_block(self, index: int, layer_type: str, hidden: Tensor) -> None:
        if index == 0:
            if self._phase is None:
                model_is_training = self.model is not None and self.model.training
                phase = "train" if model_is_training else ("prefill" if hidden.shape[1] > 1 else "decode")
                self._begin_step(phase, explicit=False)
            self._batch, self._tokens = hidden.shape[0], hidden.shape[0] * hidden.shape[1]
        if self.emit_ranges:
            self._range = torch.profiler.record_function(f"L{index}.{layer_type}")
            self._range.__enter__()
        self._start = self.timestamp()

    def after_block(self, index: int, layer_type: str, hidden: Tensor, routing_counts: Tensor | None) -> None:
        end = self.timestamp()
        if self._range is not None:
            self._range.__exit__(None, None, None)
            self._range = None
        self._pending.append((index, layer_type, self._start, end))
        if routing_counts is not None:
            self._routing.append((index, routing_counts))
        if index == self._last_block and not self._is_explicit_step:
            self._end_step()
