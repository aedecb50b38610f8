"""Prometheus metrics of the serving engine (GET /metrics).

The request and scheduler metrics carry vLLM's names with the prefix ``hybridlm:`` instead of
``vllm:``, vLLM's histogram buckets and its ``model_name`` label, so dashboards built for vLLM work
after a prefix change (vllm/v1/metrics/loggers.py, ``PrometheusStatLogger``). Differences: no
``engine`` label (one engine per server); ``prompt_tokens_total`` and ``generation_tokens_total``
grow when a request finishes, with its exact counts, not at every step; vLLM's block-based
``kv_cache_usage_perc`` is here the fraction of slots in use (a slot holds one sequence's whole KV
and recurrent state).

Two kinds no engine exposes:

- ``hybridlm:block_seconds{layer_type, phase}``: the time of every block call, fed by a
  ``BlockTimer`` that the engine sets as ``model.block_observer``. The timer appends integers to
  Python lists on the hot path and bins them into the histogram in bulk (every few hundred forwards
  and at scrape time), so it is cheap enough to leave on (benchmarks/bench_block_timer.py).
- ``hybridlm:expert_routed_tokens_total{layer, expert}``: (token, expert) pairs routed per MoE block,
  summed on the model's device into one [moe blocks, experts] tensor and read only at scrape time.
  When moe blocks x experts exceeds ``max_expert_series`` the per-expert series are replaced by
  per-layer ``hybridlm:expert_routed_tokens_max{layer}``; ``hybridlm:expert_load_imbalance{layer}``
  (max / mean tokens per expert, 1.0 = balanced) is exported in both modes.

Every method is cheap and thread-safe: the engine thread reports, the server thread renders.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString
from torch import Tensor

from hybridlm.blocks import layer_type_name
from hybridlm.config import HybridConfig
from hybridlm.model import BlockObserver

PREFIX = "hybridlm:"

# vLLM's buckets (vllm/v1/metrics/loggers.py)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
INTER_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                       20.0, 40.0, 80.0)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
# ours: one block call takes ~10 us (a tiny block decoding) to ~1 s (a big prefill chunk)
BLOCK_SECONDS_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1,
                         0.25, 0.5, 1.0)  # fmt: skip
STEP_SECONDS_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# The classic text format, which every Prometheus reads (prometheus_client >= 0.22 labels its output
# version=1.0.0; for names like ours, which need none of 1.0.0's escaping, the body is the same)
TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PHASES = ("prefill", "decode", "mixed")  # mixed: one forward holding prefill chunks and decodes
FINISH_REASONS = ("stop", "length", "abort")
REJECT_REASONS = ("queue_full", "bad_request", "stopped")
PREFIX_MISS_REASONS = ("too_short", "no_snapshot", "evicted")
FLUSH_EVERY_FORWARDS = 256  # a timer bins its pending durations at least this often


def one_two_five_buckets(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to ``max_value`` (vLLM's ``build_1_2_5_buckets``)."""
    buckets, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_value:
                return buckets
            buckets.append(mantissa * scale)
        scale *= 10


class BlockSecondsStore:
    """Histogram counts of block durations per (layer type, phase), filled in bulk with numpy."""

    def __init__(self, bounds_seconds: Sequence[float] = BLOCK_SECONDS_BUCKETS) -> None:
        self.bounds_seconds = tuple(bounds_seconds)
        self._bounds_ns = np.array([round(b * 1e9) for b in self.bounds_seconds], dtype=np.int64)
        self._counts: dict[tuple[str, str], np.ndarray] = {}  # [buckets + 1], the last one past every bound
        self._sums_ns: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def add(self, layer_type: str, phase: str, durations_ns: Sequence[int]) -> None:
        if not durations_ns:
            return
        values = np.asarray(durations_ns, dtype=np.int64)
        # Prometheus buckets are `le`: a value equal to a bound belongs to that bound's bucket
        bucket_of_each = np.searchsorted(self._bounds_ns, values, side="left")
        binned = np.bincount(bucket_of_each, minlength=len(self._bounds_ns) + 1)
        with self._lock:
            key = (layer_type, phase)
            if key not in self._counts:
                self._counts[key] = np.zeros(len(self._bounds_ns) + 1, dtype=np.int64)
                self._sums_ns[key] = 0
            self._counts[key] += binned
            self._sums_ns[key] += int(values.sum())

    def family(self, name: str, documentation: str, model_name: str) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, documentation, labels=["model_name", "layer_type", "phase"])
        with self._lock:
            items = [(key, counts.copy(), self._sums_ns[key]) for key, counts in sorted(self._counts.items())]
        for (layer_type, phase), counts, sum_ns in items:
            cumulative = np.cumsum(counts).tolist()
            bounds = [floatToGoString(b) for b in self.bounds_seconds]
            buckets = [(le, float(c)) for le, c in zip(bounds, cumulative, strict=False)]
            buckets.append(("+Inf", float(cumulative[-1])))
            family.add_metric([model_name, layer_type, phase], buckets, sum_ns / 1e9)
        return family


class ExpertTokens:
    """(token, expert) pairs routed per MoE block since start: one [moe blocks, experts] int64 tensor
    on the model's device, added to without waiting for the device and read at scrape time."""

    def __init__(self, config: HybridConfig) -> None:
        self.moe_block_indices = [i for i, char in enumerate(config.pattern) if layer_type_name(char) == "moe"]
        self.num_experts = config.moe.num_experts if config.moe is not None and self.moe_block_indices else 0
        self._tokens_LE: Tensor | None = None  # allocated at the first count, on its device
        self._row_of_block: dict[int, Tensor] = {}

    @property
    def num_series(self) -> int:
        return len(self.moe_block_indices) * self.num_experts

    def add(self, block_index: int, counts_E: Tensor) -> None:
        row = self._row_of_block.get(block_index)
        if row is None:
            row = self._allocate(counts_E.device)[block_index]
        row.add_(counts_E)

    def _allocate(self, device: torch.device) -> dict[int, Tensor]:
        if self._tokens_LE is None:
            self._tokens_LE = torch.zeros(
                len(self.moe_block_indices), self.num_experts, dtype=torch.int64, device=device
            )
            self._row_of_block = {b: self._tokens_LE[r] for r, b in enumerate(self.moe_block_indices)}
        return self._row_of_block

    def read(self) -> list[list[int]]:
        """Tokens [moe block][expert]; zeros before the first forward. Waits for the device."""
        if self._tokens_LE is None:
            return [[0] * self.num_experts for _ in self.moe_block_indices]
        return self._tokens_LE.tolist()


class BlockTimer:
    """A BlockObserver that times every block call into ``hybridlm:block_seconds``.

    Set ``timer.phase`` ("prefill", "decode" or "mixed") before each forward; left at None, the phase
    of each forward is inferred (more than one token per sequence: prefill). Each call to the
    ``inner`` observer (e.g. the trace recorder) is forwarded, outside the timed interval.

    The clock is ``time.perf_counter_ns`` on the host. On CUDA that measures how long the host took
    to launch the block's kernels, not how long they ran, unless ``synchronize=True`` (a device
    synchronisation before and after each block: true block times, but a slower model).
    """

    def __init__(
        self,
        store: BlockSecondsStore,
        experts: ExpertTokens | None = None,
        inner: BlockObserver | None = None,
        *,
        synchronize: bool = False,
        flush_every_forwards: int = FLUSH_EVERY_FORWARDS,
    ) -> None:
        if flush_every_forwards < 1:
            raise ValueError(f"flush_every_forwards must be >= 1, got {flush_every_forwards}")
        self.inner = inner
        self.synchronize = synchronize
        self._store = store
        self._experts = experts
        self._flush_every_forwards = flush_every_forwards
        self._forwards_since_flush = 0
        self._pending: dict[str, defaultdict[str, list[int]]] = {p: defaultdict(list) for p in PHASES}
        self._current: defaultdict[str, list[int]] = self._pending["decode"]
        self._phase: str | None = None
        self._start_ns = 0
        self._flush_lock = threading.Lock()

    @property
    def phase(self) -> str | None:
        return self._phase

    @phase.setter
    def phase(self, phase: str | None) -> None:
        if phase is not None and phase not in PHASES:
            raise ValueError(f"phase must be one of {', '.join(PHASES)} (or None to infer it), got {phase!r}")
        self._phase = phase
        if phase is not None:
            self._current = self._pending[phase]

    def before_block(self, index: int, layer_type: str, hidden: Tensor) -> None:
        if self.inner is not None:
            self.inner.before_block(index, layer_type, hidden)
        if index == 0:
            self._begin_forward(hidden)
        if self.synchronize and hidden.is_cuda:
            torch.cuda.synchronize(hidden.device)
        self._start_ns = time.perf_counter_ns()

    def after_block(self, index: int, layer_type: str, hidden: Tensor, routing_counts: Tensor | None) -> None:
        if self.synchronize and hidden.is_cuda:
            torch.cuda.synchronize(hidden.device)
        self._current[layer_type].append(time.perf_counter_ns() - self._start_ns)
        if routing_counts is not None and self._experts is not None:
            self._experts.add(index, routing_counts)
        if self.inner is not None:
            self.inner.after_block(index, layer_type, hidden, routing_counts)

    def record_span(self, layer_index: int, layer_type: str, start_ns: int, end_ns: int, *details: object) -> None:
        """A part of a block timed by the block itself (an expert-parallel MoE block's ``on_span``:
        moe_router, moe_dispatch, moe_experts, moe_combine), into the same histogram."""
        self._current[layer_type].append(end_ns - start_ns)

    def _begin_forward(self, hidden: Tensor) -> None:
        if self._phase is None:  # hidden: [B, T, hidden]
            self._current = self._pending["prefill" if hidden.shape[1] > 1 else "decode"]
        self._forwards_since_flush += 1
        if self._forwards_since_flush >= self._flush_every_forwards:
            self.flush()

    def flush(self) -> None:
        """Bin the durations recorded so far into the histogram (the scrape does it too)."""
        with self._flush_lock:  # a scrape and the engine thread may flush at once
            self._forwards_since_flush = 0
            for phase, by_layer_type in self._pending.items():
                for layer_type, durations in list(by_layer_type.items()):
                    taken = len(durations)
                    if taken:
                        self._store.add(layer_type, phase, durations[:taken])
                        del durations[:taken]  # appends made meanwhile stay for the next flush


class EngineMetrics:
    """Every metric of one engine, in its own ``CollectorRegistry`` (never the global one).

    The engine thread calls the ``on_*`` and ``set_*`` methods; ``render()`` gives /metrics its body.
    """

    def __init__(self, model_name: str, config: HybridConfig, *, max_expert_series: int = 1024) -> None:
        if max_expert_series < 0:
            raise ValueError(f"max_expert_series must be >= 0, got {max_expert_series}")
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.block_seconds = BlockSecondsStore()
        self.expert_tokens = ExpertTokens(config)
        self.is_expert_series_bounded = self.expert_tokens.num_series > max_expert_series
        self._timers: list[BlockTimer] = []
        self._timers_lock = threading.Lock()
        self._evictions_seen = 0
        self._build_request_metrics(config.max_position_embeddings)
        self._build_state_metrics()
        self.registry.register(_LayerCollector(self))

    # -- construction ------------------------------------------------------------------------------
    def _histogram(self, name: str, documentation: str, buckets: Sequence[float]) -> Histogram:
        return Histogram(PREFIX + name, documentation, ["model_name"], buckets=buckets, registry=self.registry).labels(
            self.model_name
        )

    def _counter(self, name: str, documentation: str, label: str | None = None) -> Counter:
        labels = ["model_name"] if label is None else ["model_name", label]
        counter = Counter(PREFIX + name, documentation, labels, registry=self.registry)
        return counter.labels(self.model_name) if label is None else counter

    def _gauge(self, name: str, documentation: str, label: str | None = None) -> Gauge:
        labels = ["model_name"] if label is None else ["model_name", label]
        gauge = Gauge(PREFIX + name, documentation, labels, registry=self.registry)
        return gauge.labels(self.model_name) if label is None else gauge

    def _build_request_metrics(self, max_model_len: int) -> None:
        h = self._histogram
        self.time_to_first_token = h(
            "time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS
        )
        self.inter_token_latency = h(
            "inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", INTER_TOKEN_BUCKETS
        )
        self.e2e_request_latency = h(
            "e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", REQUEST_LATENCY_BUCKETS
        )
        self.request_queue_time = h(
            "request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        length_buckets = one_two_five_buckets(max_model_len)
        self.request_prompt_tokens = h("request_prompt_tokens", "Number of prefill tokens processed.", length_buckets)
        self.request_generation_tokens = h(
            "request_generation_tokens", "Number of generation tokens processed.", length_buckets
        )
        self.iteration_tokens = h(
            "iteration_tokens_total", "Histogram of number of tokens per engine_step.", ITERATION_TOKENS_BUCKETS
        )
        self.step_seconds = Histogram(
            PREFIX + "engine_step_seconds",
            "Wall time of one engine step, by what it ran: prefill, decode or mixed.",
            ["model_name", "step_kind"],
            buckets=STEP_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.step_tokens = self._counter("step_tokens", "Tokens run through the model, by phase.", "phase")
        self.prompt_tokens = self._counter(
            "prompt_tokens", "Number of prefill tokens processed (counted when the request ends)."
        )
        self.generation_tokens = self._counter(
            "generation_tokens", "Number of generation tokens processed (counted when the request ends)."
        )
        self.requests_queued = self._counter("requests_queued", "Requests accepted into the waiting queue.")
        self.request_success = self._counter(
            "request_success", "Count of successfully processed requests.", "finished_reason"
        )
        self.request_rejected = self._counter(
            "request_rejected",
            "Requests refused at submission: queue_full (429), bad_request (400), stopped (503).",
            "reason",
        )
        for reason in FINISH_REASONS:
            self.request_success.labels(self.model_name, reason)
        for reason in REJECT_REASONS:
            self.request_rejected.labels(self.model_name, reason)

    def _build_state_metrics(self) -> None:
        self.num_requests_running = self._gauge(
            "num_requests_running", "Number of requests in model execution batches."
        )
        self.num_requests_waiting = self._gauge("num_requests_waiting", "Number of requests waiting to be processed.")
        self.slots_used = self._gauge("slots_used", "Slots held by a request (each slot: one sequence's state).")
        self.slots_total = self._gauge("slots_total", "Slots in the pool, allocated at start-up.")
        self.kv_cache_usage = self._gauge(
            "kv_cache_usage_perc",
            "Fraction of slots in use, 1 = all (vLLM's name; a slot holds one sequence's KV and recurrent state).",
        )
        self.memory_bytes = self._gauge(
            "memory_bytes", "Bytes allocated, by kind (weights, kv, conv, recurrent, prefix_cache).", "kind"
        )
        c = self._counter
        self.prefix_cache_queries = c(
            "prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens (the prompt tokens of each request looked up).",
        )
        self.prefix_cache_hits = c(
            "prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens (prompt tokens restored from a snapshot).",
        )
        self.prefix_cache_lookups = c("prefix_cache_lookups", "Requests looked up in the prefix cache.")
        self.prefix_cache_misses = c(
            "prefix_cache_misses",
            "Requests that restored nothing, by reason: too_short (no usable snapshot boundary in the prompt), "
            "no_snapshot (none stored for this prefix), evicted (one was stored but evicted).",
            "reason",
        )
        for reason in PREFIX_MISS_REASONS:
            self.prefix_cache_misses.labels(self.model_name, reason)
        self.prefix_cache_evictions = c("prefix_cache_evictions", "Snapshots evicted from the prefix cache (LRU).")
        self.prefix_cache_snapshots = self._gauge("prefix_cache_snapshots", "Snapshots held by the prefix cache.")
        self.prefix_cache_bytes = self._gauge("prefix_cache_bytes", "Bytes held by prefix cache snapshots.")

    # -- what the engine reports -------------------------------------------------------------------
    def on_queued(self) -> None:
        self.requests_queued.inc()

    def on_scheduled(self, queue_seconds: float) -> None:
        """A request left the waiting queue and got a slot."""
        self.request_queue_time.observe(queue_seconds)

    def on_first_token(self, ttft_seconds: float) -> None:
        self.time_to_first_token.observe(ttft_seconds)

    def on_token(self, inter_token_seconds: float) -> None:
        self.inter_token_latency.observe(inter_token_seconds)

    def on_finished(self, e2e_seconds: float, prompt_tokens: int, generation_tokens: int, finish_reason: str) -> None:
        self.e2e_request_latency.observe(e2e_seconds)
        self.request_success.labels(self.model_name, finish_reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generation_tokens)
        self.request_prompt_tokens.observe(prompt_tokens)
        self.request_generation_tokens.observe(generation_tokens)

    def on_rejected(self, reason: str) -> None:
        """reason: "queue_full" | "bad_request" | "stopped"."""
        self.request_rejected.labels(self.model_name, reason).inc()

    def set_load(self, running: int, waiting: int, used_slots: int, total_slots: int) -> None:
        self.num_requests_running.set(running)
        self.num_requests_waiting.set(waiting)
        self.slots_used.set(used_slots)
        self.slots_total.set(total_slots)
        self.kv_cache_usage.set(used_slots / total_slots if total_slots else 0.0)

    def set_memory(self, bytes_by_kind: dict[str, int]) -> None:
        """Bytes by kind: weights, kv, conv, recurrent, prefix_cache (byte counts only, no slot counts)."""
        for kind, num_bytes in bytes_by_kind.items():
            if isinstance(num_bytes, bool) or not isinstance(num_bytes, int) or num_bytes < 0:
                raise ValueError(f"memory_bytes[{kind!r}] must be a byte count >= 0, got {num_bytes!r}")
            self.memory_bytes.labels(self.model_name, kind).set(num_bytes)

    def on_prefix_query(self, prompt_tokens: int, cached_tokens: int, miss_reason: str | None) -> None:
        """One request looked up: miss_reason None on a hit, else "too_short" | "no_snapshot" | "evicted"."""
        self.prefix_cache_lookups.inc()
        self.prefix_cache_queries.inc(prompt_tokens)
        self.prefix_cache_hits.inc(cached_tokens)
        if miss_reason is not None:
            self.prefix_cache_misses.labels(self.model_name, miss_reason).inc()

    def set_prefix_cache(self, snapshots: int, snapshot_bytes: int, evictions_total: int) -> None:
        self.prefix_cache_snapshots.set(snapshots)
        self.prefix_cache_bytes.set(snapshot_bytes)
        if evictions_total > self._evictions_seen:  # the cache counts since start; a counter takes increments
            self.prefix_cache_evictions.inc(evictions_total - self._evictions_seen)
            self._evictions_seen = evictions_total

    def on_step(self, phase_tokens: dict[str, int], seconds: float) -> None:
        """One engine step, e.g. {"prefill": 300, "decode": 12} tokens in ``seconds``."""
        running = [phase for phase, tokens in phase_tokens.items() if tokens > 0]
        step_kind = running[0] if len(running) == 1 else ("mixed" if running else "idle")
        self.step_seconds.labels(self.model_name, step_kind).observe(seconds)
        self.iteration_tokens.observe(sum(phase_tokens.values()))
        for phase, tokens in phase_tokens.items():
            if tokens:
                self.step_tokens.labels(self.model_name, phase).inc(tokens)

    def block_timer(
        self,
        inner: BlockObserver | None = None,
        *,
        synchronize: bool = False,
        flush_every_forwards: int = FLUSH_EVERY_FORWARDS,
    ) -> BlockTimer:
        """A BlockObserver feeding ``hybridlm:block_seconds`` and the expert counts: set it as
        ``model.block_observer``. ``inner`` sees every call too; for the trace recorder,
        ``tracer.attach(model)`` first, then ``model.block_observer = metrics.block_timer(inner=tracer)``."""
        timer = BlockTimer(
            self.block_seconds,
            self.expert_tokens,
            inner,
            synchronize=synchronize,
            flush_every_forwards=flush_every_forwards,
        )
        with self._timers_lock:
            self._timers.append(timer)
        return timer

    def render(self) -> tuple[bytes, str]:
        """(body, content type) for GET /metrics, in the Prometheus text format."""
        return generate_latest(self.registry), TEXT_CONTENT_TYPE

    def flush_timers(self) -> None:
        with self._timers_lock:
            timers = list(self._timers)
        for timer in timers:
            timer.flush()


class _LayerCollector:
    """Block time and expert load, computed at scrape time from what the timers gathered."""

    def __init__(self, metrics: EngineMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return []  # families vary with what ran; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        m.flush_timers()
        yield m.block_seconds.family(
            PREFIX + "block_seconds",
            "Time of one block call, by layer type and phase (host clock: on CUDA the launch time unless the "
            "timer synchronises).",
            m.model_name,
        )
        yield from self._expert_families()

    def _expert_families(self) -> Iterator[Metric]:
        m = self.metrics
        experts = m.expert_tokens
        if not experts.moe_block_indices:
            return
        tokens = experts.read()
        labels = ["model_name", "layer"]
        imbalance = GaugeMetricFamily(
            PREFIX + "expert_load_imbalance",
            "Tokens routed to the busiest expert / the "
            "mean per expert, per MoE block (layer = block index), since start; 1.0 = "
            "balanced; absent before the block routes a token.",
            labels=labels,
        )
        for block_index, row in zip(experts.moe_block_indices, tokens, strict=True):
            if sum(row):
                imbalance.add_metric([m.model_name, str(block_index)], max(row) * len(row) / sum(row))
        yield imbalance
        if m.is_expert_series_bounded:
            busiest = GaugeMetricFamily(
                PREFIX + "expert_routed_tokens_max",
                "Tokens routed to the busiest expert "
                "of each MoE block since start; exported instead of the per-expert "
                "expert_routed_tokens_total when moe blocks x experts > "
                "max_expert_series.",
                labels=labels,
            )
            for block_index, row in zip(experts.moe_block_indices, tokens, strict=True):
                busiest.add_metric([m.model_name, str(block_index)], max(row))
            yield busiest
            return
        routed = CounterMetricFamily(
            PREFIX + "expert_routed_tokens",
            "(token, expert) pairs routed to each expert "
            "of each MoE block (layer = block index) since start: top_k per token.",
            labels=[*labels, "expert"],
        )
        for block_index, row in zip(experts.moe_block_indices, tokens, strict=True):
            for expert, count in enumerate(row):
                routed.add_metric([m.model_name, str(block_index), str(expert)], count)
        yield routed
