"""The serving engine: a slot pool sized from a memory budget, a scheduler thread, request handles.

``Engine(model, tokenizer, config)`` plans the pool (``memory_report``), ``start()`` runs the
scheduler's steps on a background thread, and ``submit`` queues a request and returns a
``RequestHandle`` whose events (``Completion``) arrive as the steps produce them, to a blocking
iterator or to an asyncio stream. The HTTP server (``engine/server.py``) is a thin layer on this.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from hybridlm.accounting import cache_bytes
from hybridlm.engine.prefix_cache import PrefixCache
from hybridlm.engine.requests import Completion, EngineStopped, QueueFull, RequestError, SamplingParams
from hybridlm.engine.scheduler import Scheduler
from hybridlm.engine.sequence import Sequence
from hybridlm.engine.worker import MirroredWorker, SlotWorker
from hybridlm.memory import free_memory_bytes
from hybridlm.model import HybridLM
from hybridlm.tokenizer import Decoder

if TYPE_CHECKING:
    from hybridlm.engine.metrics import EngineMetrics

# Without a budget the pool may take this share of the memory free after the weights (vLLM's
# gpu_memory_utilization is 0.9 of the whole GPU; a CPU host runs other things too).
DEFAULT_MEMORY_SHARE = 0.5
IDLE_WAIT_SECONDS = 0.05  # how often an idle scheduler thread looks for work or a stop


@dataclass
class EngineConfig:
    max_slots: int = 16  # sequences running at once (vLLM's max_num_seqs)
    max_model_len: int | None = None  # prompt + completion tokens per sequence; None: the model's context
    memory_budget_bytes: int | None = None  # for the slots' state; None: DEFAULT_MEMORY_SHARE of free memory
    max_waiting: int = 256  # queued requests beyond which submit raises QueueFull
    step_token_budget: int = 512  # prompt + decode tokens per step (chunked prefill)
    prefix_cache_bytes: int = 256 * 2**20  # 0 turns prefix caching off
    snapshot_interval: int = 64  # prefix snapshots at multiples of this many tokens

    def check(self) -> None:
        """A ValueError naming the first bad setting (by its ``hybridlm serve`` flag)."""
        positive = {
            "--max-slots": self.max_slots,
            "--max-waiting": self.max_waiting,
            "--step-token-budget": self.step_token_budget,
            "--snapshot-interval": self.snapshot_interval,
        }
        for flag, value in positive.items():
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"--max-model-len must be >= 2 (a prompt token and a new one), got {self.max_model_len}")
        if self.memory_budget_bytes is not None and self.memory_budget_bytes < 1:
            raise ValueError(f"--memory-budget must be a positive number of bytes, got {self.memory_budget_bytes}")
        if self.prefix_cache_bytes < 0:
            raise ValueError(f"--prefix-cache-bytes must be >= 0 (0 = off), got {self.prefix_cache_bytes}")


@dataclass
class PoolPlan:
    slots: int
    requested_slots: int
    max_model_len: int
    bytes_per_slot: dict[str, int]  # kv / conv / recurrent for one slot of max_model_len tokens
    weights: int
    budget: int
    message: str | None  # why the slot count was clamped (None: as asked)


def plan_pool(model: HybridLM, config: EngineConfig) -> PoolPlan:
    """How many slots of ``max_model_len`` tokens fit the budget: clamped to what fits, with a message
    (vLLM refuses to start instead: vllm#49064); a ValueError only when not even one slot fits."""
    max_len = config.max_model_len or model.config.max_position_embeddings
    per_slot = cache_bytes(model.config, 1, max_len, model.dtype)
    weights = sum(p.nbytes for p in model.parameters())
    if config.memory_budget_bytes is not None:
        budget, source = config.memory_budget_bytes, "--memory-budget"
    else:
        free = free_memory_bytes(model.device)
        budget = int((free if free is not None else 2**40) * DEFAULT_MEMORY_SHARE) - config.prefix_cache_bytes
        source = f"{DEFAULT_MEMORY_SHARE:.0%} of free memory less the prefix cache"
    fitting = budget // max(per_slot.total, 1)
    if fitting < 1:
        raise ValueError(
            f"one slot of --max-model-len {max_len} tokens needs {per_slot.total:,} bytes, more than the "
            f"{max(budget, 0):,} bytes of {source}; lower --max-model-len or raise --memory-budget"
        )
    slots, message = config.max_slots, None
    if fitting < config.max_slots:
        slots = fitting
        message = (
            f"--max-slots {config.max_slots} clamped to {slots}: each slot of {max_len} tokens holds "
            f"{per_slot.total:,} bytes and {source} is {budget:,} bytes"
        )
    by_kind = {"kv": per_slot.kv, "conv": per_slot.conv, "recurrent": per_slot.recurrent}
    return PoolPlan(slots, config.max_slots, max_len, by_kind, weights, budget, message)


class RequestHandle:
    """One submitted request: its events in order, the last one with ``finish_reason`` set."""

    def __init__(self, request_id: str, engine: Engine, loop: asyncio.AbstractEventLoop | None) -> None:
        self.request_id = request_id
        self._engine = engine
        self._loop = loop
        self._events: queue.Queue[Completion] = queue.Queue()
        self._async_events: asyncio.Queue[Completion] | None = asyncio.Queue() if loop is not None else None
        self.sequence: Sequence | None = None

    def _put(self, event: Completion) -> None:  # called on the scheduler thread
        if self._loop is None:
            self._events.put(event)
            return
        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is listening any more
            self._loop.call_soon_threadsafe(self._async_events.put_nowait, event)

    def __iter__(self) -> Iterator[Completion]:
        if self._loop is not None:
            raise RuntimeError("this request was submitted from an event loop: read it with `stream()`")
        while True:
            event = self._events.get()
            yield event
            if event.finish_reason is not None:
                return

    async def stream(self) -> AsyncIterator[Completion]:
        if self._async_events is None:
            raise RuntimeError("this request was submitted outside an event loop: iterate over the handle instead")
        while True:
            event = await self._async_events.get()
            yield event
            if event.finish_reason is not None:
                return

    def abort(self) -> None:
        """Stop the request: its slot is freed at the next step and its stream ends with 'abort'."""
        self._engine.abort(self.request_id)


class Engine:
    def __init__(
        self,
        model: HybridLM,
        tokenizer: Decoder,
        config: EngineConfig | None = None,
        *,
        eos_token_id: int | None = None,
        metrics: EngineMetrics | None = None,
        expert_group: Any = None,
    ) -> None:
        self.config = config or EngineConfig()
        self.config.check()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id if eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
        self.plan = plan_pool(model, self.config)
        self.max_model_len = self.plan.max_model_len
        self.cache = model.new_cache(self.plan.slots, self.max_model_len)
        self.prefix_cache = PrefixCache(self.config.prefix_cache_bytes, self.config.snapshot_interval)
        self.metrics = metrics
        self.tracer = None
        block_timer = None
        if metrics is not None:
            block_timer = metrics.block_timer(inner=model.block_observer)
            model.block_observer = block_timer
            for module in model.modules():  # experts spread over ranks time their own parts
                if hasattr(module, "on_span") and module.on_span is None:
                    module.on_span = block_timer.record_span
            metrics.set_memory(self._memory_by_kind())
        # With experts spread over the ranks of ``expert_group``, the other ranks replay every call
        # (``hybridlm.engine.worker.follow``); alone, the worker runs them here.
        worker = (
            SlotWorker(model, self.cache) if expert_group is None else MirroredWorker(model, self.cache, expert_group)
        )
        self.scheduler = Scheduler(worker, self.prefix_cache, self.config.step_token_budget, metrics, block_timer)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._incoming: list[Sequence] = []
        self._handles: dict[str, RequestHandle] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._accepting = True
        self._stop = False
        self._drain = True
        self.error: BaseException | None = None  # what stopped the scheduler thread, if it failed
        self._stopped_workers = False

    # -- facts -------------------------------------------------------------------------------------
    def memory_report(self) -> dict:
        plan = self.plan
        slots = plan.slots
        return {
            "weights": plan.weights,
            **{kind: size * slots for kind, size in plan.bytes_per_slot.items()},
            "bytes_per_slot": sum(plan.bytes_per_slot.values()),
            "slots": slots,
            "requested_slots": plan.requested_slots,
            "max_model_len": plan.max_model_len,
            "prefix_cache_bytes": self.config.prefix_cache_bytes,
            "recurrent_dtype": "float32",
            "message": plan.message,
        }

    def stats(self) -> dict:
        with self._lock:
            incoming = len(self._incoming)
        scheduler = self.scheduler
        return {
            "running": len(scheduler.running),
            "waiting": len(scheduler.waiting) + incoming,
            "free_slots": scheduler.free_slots,
            "slots": len(scheduler.rows),
            "steps": scheduler.steps,
            "prefix_cache_snapshots": len(self.prefix_cache),
            "prefix_cache_bytes": self.prefix_cache.bytes,
            "accepting": self._accepting,
            "error": None if self.error is None else f"{type(self.error).__name__}: {self.error}",
        }

    def _memory_by_kind(self) -> dict[str, int]:
        report = self.memory_report()
        return {kind: report[kind] for kind in ("weights", "kv", "conv", "recurrent")}

    # -- requests ----------------------------------------------------------------------------------
    def submit(self, prompt: list[int], params: SamplingParams, request_id: str | None = None) -> RequestHandle:
        """Queue a request; its events arrive on the returned handle. Raises RequestError (bad
        request, ``param`` names the field), QueueFull or EngineStopped."""
        try:
            params.check()
            self._check_prompt(prompt, params)
        except RequestError:
            self._report_rejected("bad_request")
            raise
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._lock:
            if not self._accepting or self._stop:
                self._report_rejected("stopped")
                raise EngineStopped("the engine is shutting down and takes no new requests")
            waiting = len(self._incoming) + len(self.scheduler.waiting)
            if waiting - self.scheduler.free_slots >= self.config.max_waiting:
                self._report_rejected("queue_full")
                raise QueueFull(
                    f"all {len(self.scheduler.rows)} slots are busy and {waiting} requests wait "
                    f"(--max-waiting {self.config.max_waiting}); retry later"
                )
            request_id = request_id or f"req-{next(self._ids)}"
            if request_id in self._handles:
                raise RequestError(f"request id {request_id!r} is already running", "request_id")
            handle = RequestHandle(request_id, self, loop)

            def emit(event: Completion) -> None:
                handle._put(event)
                if event.finish_reason is not None:
                    self._handles.pop(event.request_id, None)

            seq = Sequence(request_id, list(prompt), params, self.tokenizer, self.eos_token_id, emit)
            handle.sequence = seq
            self._handles[request_id] = handle
            self._incoming.append(seq)
            self._wake.notify()
        return handle

    def abort(self, request_id: str) -> None:
        handle = self._handles.get(request_id)
        if handle is not None and handle.sequence is not None:
            handle.sequence.abort_requested = True
            with self._lock:
                self._wake.notify()

    def generate(self, prompt: list[int], params: SamplingParams) -> list[int]:
        """Run one request to its end (from a thread that is not the event loop): its token ids."""
        return [event.token_id for event in self.submit(prompt, params) if event.token_id is not None]

    def _check_prompt(self, prompt: list[int], params: SamplingParams) -> None:
        if not isinstance(prompt, list) or not prompt:
            raise RequestError("the prompt is empty: give at least one token", "prompt")
        vocab = self.model.config.vocab_size
        for index, token in enumerate(prompt):
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab:
                raise RequestError(f"prompt token {index} is {token!r}: token ids are 0..{vocab - 1}", "prompt")
        if len(prompt) >= self.max_model_len:
            raise RequestError(
                f"the prompt has {len(prompt)} tokens; this server takes at most {self.max_model_len - 1} "
                f"(max_model_len {self.max_model_len}, one token left to generate)",
                "prompt",
            )
        if len(prompt) + params.max_tokens > self.max_model_len:
            raise RequestError(
                f"the prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) = "
                f"{len(prompt) + params.max_tokens} tokens, more than max_model_len {self.max_model_len}; "
                f"ask for at most {self.max_model_len - len(prompt)} tokens",
                "max_tokens",
            )

    def _report_rejected(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.on_rejected(reason)

    # -- tracing -----------------------------------------------------------------------------------
    def enable_trace(self, path: str | os.PathLike, model_name: str = "", command: str = "serve") -> str:
        """Record the serving run into the trace database at ``path`` (before ``start``): every block
        call with its step and phase, the requests of each step, routing counts. Returns the run id;
        ``hybridlm report PATH`` decomposes it. The run is marked complete at ``shutdown``."""
        from hybridlm.trace.recorder import Tracer
        from hybridlm.trace.store import TraceStore

        if self._thread is not None or self.tracer is not None:
            raise RuntimeError("enable_trace must be called once, before start()")
        store = TraceStore(path)
        notes = {
            "engine": dataclasses.asdict(self.config),
            "slots": self.plan.slots,
            "threads": torch.get_num_threads(),
        }
        tracer = Tracer(
            store, model=model_name, device=str(self.model.device), config=self.model.config.to_dict(),
            command=command, notes=json.dumps(notes),
        )  # fmt: skip
        timer = self.scheduler.block_timer
        if timer is not None:  # the tracer goes inside the block timer: the model has one observer
            self.model.block_observer = timer.inner
        tracer.attach(self.model)
        if timer is not None:
            timer.inner, self.model.block_observer = tracer, timer
        self.tracer = self.scheduler.tracer = tracer
        return tracer.run_id

    def _close_trace(self) -> None:
        if self.tracer is None:
            return
        timer = self.scheduler.block_timer
        if timer is not None and timer.inner is self.tracer:
            timer.inner = None
        self.tracer.close(complete=self.error is None)  # detaches where the tracer is the model's observer
        self.tracer.store.close()
        self.tracer = self.scheduler.tracer = None

    # -- running ---------------------------------------------------------------------------------------
    def step(self) -> bool:
        """Run one scheduler step on the caller's thread (instead of ``start``): for tests and for
        callers with their own loop, as vLLM's ``LLMEngine.step``. Returns whether work is left."""
        if self._thread is not None:
            raise RuntimeError("the engine runs its own thread (start() was called): do not step it by hand")
        with self._lock:
            for seq in self._incoming:
                self.scheduler.add(seq)
            self._incoming.clear()
        if self.scheduler.has_work():
            with torch.inference_mode():
                self.scheduler.step()
        return self.scheduler.has_work()

    def start(self) -> Engine:
        if self._thread is not None:
            raise RuntimeError("the engine is already running")
        self._thread = threading.Thread(target=self._run, name="hybridlm-engine", daemon=True)
        self._thread.start()
        return self

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; with ``drain`` finish the queued and running ones (up to ``timeout``
        seconds, then abort what is left), else abort them now. Returns when the thread has ended."""
        with self._lock:
            self._accepting = False
            self._drain = drain
            self._wake.notify()
        if self._thread is None:
            self._finish_everything()
            return
        self._thread.join(timeout if drain else None)
        with self._lock:
            self._stop = True
            self._wake.notify()
        self._thread.join()

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while self._next_round():
                    self.scheduler.step()
        except BaseException as error:  # the engine cannot go on: every request ends, none hangs
            self.error = error
            raise
        finally:
            self._finish_everything()

    def _next_round(self) -> bool:
        """Take new requests in; False when the thread should end. Waits while there is nothing to do."""
        with self._lock:
            while True:
                for seq in self._incoming:
                    self.scheduler.add(seq)
                self._incoming.clear()
                if self._stop or (not self._accepting and not self._drain):
                    return False
                if self.scheduler.has_work():
                    return True
                if not self._accepting:  # drained
                    return False
                self._wake.wait(IDLE_WAIT_SECONDS)

    def _finish_everything(self) -> None:
        with self._lock:
            for seq in self._incoming:
                self.scheduler.add(seq)
            self._incoming.clear()
            self._accepting = False
        self.scheduler.abort_all("abort")
        self._handles.clear()
        if not self._stopped_workers:
            self._stopped_workers = True
            self.scheduler.worker.stop()
        self._close_trace()
