"""The engine's step: continuous batching over a fixed pool of cache slots, with chunked prefill.

The pool is one ``HybridCache`` of ``num_slots`` rows allocated once. Slots are kept in order:
the decoding sequences in rows ``0 .. d-1``, then the prefilling ones, then the free rows. So the
decode step is one ``model.decode_step`` over the view ``cache.narrow(0, d)`` (no gather, no
padding, no idle rows), and a prompt piece is a forward over its own row's view. When a sequence
finishes, or a prefill completes, rows are swapped to restore the order (one slot copy each).

One step, under a budget of ``step_token_budget`` tokens (vLLM's ``max_num_batched_tokens``):

1. sequences aborted since the last step leave (their slots are free at once);
2. waiting requests take free slots, oldest first; each slot is reset, or restored from the longest
   prefix snapshot (``PrefixCache``), so nothing of a previous owner remains;
3. every decoding sequence gets one token (counted first against the budget, so a long prompt
   never stalls the streams: chunked prefill);
4. the rest of the budget goes to prompt pieces, oldest first. A piece ends at the budget, at a
   snapshot boundary or at the prompt's end; a prefix snapshot is taken where it ends on a boundary.
   A finished prompt samples its first token from its last logits and joins the decoders.

Greedy output is the same as generating each request alone: slots never mix (every block reads
only its own row of the state), and a prompt split into pieces gives the same state as in one call.
"""

from __future__ import annotations

import time
from collections import deque
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

import torch

from hybridlm.engine.prefix_cache import PrefixCache
from hybridlm.engine.sequence import Sequence, Status
from hybridlm.engine.worker import SlotWorker

if TYPE_CHECKING:
    from hybridlm.engine.metrics import BlockTimer, EngineMetrics
    from hybridlm.trace.recorder import Tracer

# However many sequences decode, a prefilling prompt advances by at least this many tokens a step
MIN_PREFILL_TOKENS = 16


class Scheduler:
    def __init__(
        self,
        worker: SlotWorker,
        prefix_cache: PrefixCache,
        step_token_budget: int,
        metrics: EngineMetrics | None = None,
        block_timer: BlockTimer | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self.worker = worker
        self.prefix_cache = prefix_cache
        prefix_cache.on_evict = worker.forget
        self.step_token_budget = step_token_budget
        self.metrics = metrics
        self.block_timer = block_timer
        self.tracer = tracer
        self.waiting: deque[Sequence] = deque()
        self.rows: list[Sequence | None] = [None] * worker.num_slots  # which sequence holds each slot
        self.steps = 0

    # -- state -------------------------------------------------------------------------------------
    @property
    def running(self) -> list[Sequence]:
        return [seq for seq in self.rows if seq is not None]

    @property
    def free_slots(self) -> int:
        return sum(seq is None for seq in self.rows)

    def has_work(self) -> bool:
        return bool(self.waiting) or any(seq is not None for seq in self.rows)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        if self.metrics is not None:
            self.metrics.on_queued()

    # -- one step ----------------------------------------------------------------------------------
    def step(self) -> None:
        started = time.perf_counter()
        self._drop_aborted()
        self._order_rows()
        self._admit()
        self._order_rows()  # a repeated prompt restored with its logits decodes at once
        decoding = [seq for seq in self.rows if seq is not None and seq.status is Status.DECODING]
        prefill_budget = max(self.step_token_budget - len(decoding), MIN_PREFILL_TOKENS)
        prefilled = self._prefill(prefill_budget)
        if decoding:
            self._decode(decoding)
        self._release_finished()
        self._order_rows()
        self.steps += 1
        if self.metrics is not None:
            self.metrics.on_step({"prefill": prefilled, "decode": len(decoding)}, time.perf_counter() - started)
            self._report_load()

    def abort_all(self, reason: str = "abort") -> None:
        for seq in [*self.waiting, *self.running]:
            seq.finish(reason)
            self._on_finished(seq)
        self.waiting.clear()
        self.rows = [None] * len(self.rows)

    # -- admission ---------------------------------------------------------------------------------
    def _drop_aborted(self) -> None:
        for seq in [s for s in self.waiting if s.abort_requested]:
            self.waiting.remove(seq)
            seq.finish("abort")
            self._on_finished(seq)
        for seq in self.running:
            if seq.abort_requested:
                seq.finish("abort")
        self._release_finished()

    def _admit(self) -> None:
        """Waiting requests into free slots, oldest first. A request whose whole prompt is being
        prefilled for another waits for it (a step or a few), then takes its snapshot and computes
        nothing (SGLang schedules shared prefixes the same way)."""
        in_flight = {self._prompt_key(seq) for seq in self._prefilling()}
        deferred: list[Sequence] = []
        while self.waiting and self.free_slots:
            seq = self.waiting.popleft()
            key = self._prompt_key(seq)
            if key is not None and key in in_flight:
                deferred.append(seq)
                continue
            in_flight.add(key)
            seq.slot = self.rows.index(None)
            self.rows[seq.slot] = seq
            seq.status = Status.PREFILLING
            seq.scheduled_at = time.perf_counter()
            self._fill_from_prefix_cache(seq)
            if self.metrics is not None:
                self.metrics.on_scheduled(seq.scheduled_at - seq.arrived_at)
        self.waiting.extendleft(reversed(deferred))

    def _prompt_key(self, seq: Sequence) -> bytes | None:
        if not self.prefix_cache.enabled:
            return None
        seq.hasher = seq.hasher or self.prefix_cache.hasher(seq.prompt)
        return seq.hasher.key(len(seq.prompt))

    def _fill_from_prefix_cache(self, seq: Sequence) -> None:
        self.worker.reset_slot(seq.slot)
        if not self.prefix_cache.enabled:
            return
        seq.hasher = seq.hasher or self.prefix_cache.hasher(seq.prompt)
        found = self.prefix_cache.lookup(seq.hasher, len(seq.prompt))
        seq.cut_points = sorted({found.branch_point, len(seq.prompt)} - {0})
        if found.snapshot is not None:
            self.worker.restore(seq.slot, found.snapshot)
            seq.computed = seq.cached_tokens = found.snapshot.length
        if self.metrics is not None:
            self.metrics.on_prefix_query(len(seq.prompt), seq.cached_tokens, found.miss_reason)
        if seq.prompt_left == 0:  # the whole prompt was cached with the logits after it
            seq.status = Status.DECODING
            logits = found.snapshot.next_logits
            self._take_token(seq, logits, int(logits.argmax()))

    # -- prefill -----------------------------------------------------------------------------------
    def _prefill(self, budget: int) -> int:
        """Prompt pieces for the prefilling sequences, oldest first, up to ``budget`` tokens in all.

        The first pieces of fresh prompts in consecutive slots go through one left-padded forward
        (a batch of short prompts runs matmuls of more rows: ~1.6x the tokens/s of one at a time
        for three 155-token prompts on debug-small); later pieces go one slot at a time.
        """
        done = 0
        for seq in sorted(self._prefilling(), key=lambda s: s.arrived_at):
            while seq.prompt_left and done < budget:
                group = self._fresh_neighbours(seq)
                done += self._prefill_pieces(group, budget - done)
        return done

    def _prefilling(self) -> list[Sequence]:
        return [seq for seq in self.rows if seq is not None and seq.status is Status.PREFILLING]

    def _fresh_neighbours(self, seq: Sequence) -> list[Sequence]:
        """``seq`` and, when it has computed nothing yet, the sequences in the slots after it that have
        not either (left padding is only allowed before a sequence's first token)."""
        group = [seq]
        if seq.computed:
            return group
        for row in range(seq.slot + 1, len(self.rows)):
            other = self.rows[row]
            if other is None or other.status is not Status.PREFILLING or other.computed:
                break
            group.append(other)
        return group

    def _prefill_pieces(self, group: list[Sequence], budget: int) -> int:
        """One forward over the next piece of each sequence of ``group`` (consecutive slots)."""
        pieces = []
        for seq in group:
            if budget <= 0 or (pieces and len(seq.prompt) > budget):
                break  # a later prompt that does not fit whole waits for the next call
            end = self._piece_end(seq, seq.computed, min(len(seq.prompt), seq.computed + budget))
            pieces.append((seq, seq.computed, end))
            budget -= end - seq.computed
        requests = [(seq.request_id, end - start) for seq, start, end in pieces]
        with self._traced("prefill", requests):
            logits = self.worker.prefill(group[0].slot, [seq.prompt[start:end] for seq, start, end in pieces])
        for (seq, _, end), seq_logits in zip(pieces, logits, strict=True):
            self._after_piece(seq, end, seq_logits)
        return sum(end - start for _, start, end in pieces)

    def _after_piece(self, seq: Sequence, end: int, logits: torch.Tensor) -> None:
        seq.computed = end
        if seq.hasher is not None and self._is_snapshot_point(seq, end) and self.prefix_cache.wants(seq.hasher, end):
            snapshot = self.worker.snapshot(seq.slot)
            if end == len(seq.prompt):  # a repeat of this prompt will need no computation at all
                snapshot.next_logits = logits.clone()
            self.prefix_cache.add(seq.hasher, snapshot)
            self._report_prefix_cache()
        if end == len(seq.prompt):
            seq.status = Status.DECODING
            self._take_token(seq, logits, int(logits.argmax()))

    def _piece_end(self, seq: Sequence, start: int, limit: int) -> int:
        """Where a piece from ``start`` ends: the first cut point before ``limit``; else, when the budget
        cuts the prompt short, the last snapshot boundary before it (so the next piece starts on one)."""
        for cut in seq.cut_points:
            if start < cut < limit:
                return cut
        if limit < len(seq.prompt) and self.prefix_cache.enabled:
            boundaries = self.prefix_cache.boundaries(start, limit)
            if boundaries:
                return boundaries[-1]
        return limit

    def _is_snapshot_point(self, seq: Sequence, length: int) -> bool:
        return length in seq.cut_points or length % self.prefix_cache.interval == 0

    # -- decode ------------------------------------------------------------------------------------
    def _decode(self, decoding: list[Sequence]) -> None:
        """One token for each decoding sequence: they sit in rows 0 .. len(decoding) - 1."""
        assert all(seq.slot == row for row, seq in enumerate(decoding)), "decoding slots must come first"
        with self._traced("decode", [(seq.request_id, 1) for seq in decoding]):
            logits = self.worker.decode([seq.last_token for seq in decoding])
        greedy = logits.argmax(dim=-1).tolist()
        for row, seq in enumerate(decoding):
            if seq.status is Status.DECODING:
                self._take_token(seq, logits[row], greedy[row])

    def _take_token(self, seq: Sequence, logits: torch.Tensor, greedy: int) -> None:
        token = seq.choose(logits, greedy)
        before = seq.last_token_at
        seq.append(token, seq.logprob_of(logits, token))
        if self.metrics is not None:
            if before is None:
                self.metrics.on_first_token(seq.first_token_at - seq.arrived_at)
            else:
                self.metrics.on_token(seq.last_token_at - before)

    # -- slots -------------------------------------------------------------------------------------
    def _release_finished(self) -> None:
        for row, seq in enumerate(self.rows):
            if seq is not None and seq.status is Status.FINISHED:
                self.rows[row] = None
                self._on_finished(seq)

    def _on_finished(self, seq: Sequence) -> None:
        if self.metrics is not None:
            end = time.perf_counter()
            self.metrics.on_finished(end - seq.arrived_at, len(seq.prompt), len(seq.output), seq.finish_reason)

    def _order_rows(self) -> None:
        """Decoding sequences first, then prefilling ones, then free rows (swapping slot contents)."""
        order = [s for s in self.rows if s is not None and s.status is Status.DECODING]
        order += [s for s in self.rows if s is not None and s.status is Status.PREFILLING]
        for row, seq in enumerate(order):
            if seq.slot != row:
                self._swap(row, seq.slot)

    def _swap(self, a: int, b: int) -> None:
        first, second = self.rows[a], self.rows[b]
        if first is None:
            self.worker.copy_slot(b, a)
        elif second is None:
            self.worker.copy_slot(a, b)
        else:
            self.worker.swap_slots(a, b)
        self.rows[a], self.rows[b] = second, first
        for row in (a, b):
            if self.rows[row] is not None:
                self.rows[row].slot = row

    # -- reporting ---------------------------------------------------------------------------------
    def _traced(self, phase: str, requests: list[tuple[str, int]]) -> AbstractContextManager:
        """Around one forward call: the phase for the block timer, and a trace step (with the requests
        it runs and their tokens) when tracing."""
        if self.block_timer is not None:
            self.block_timer.phase = phase
        return self.tracer.step(phase, requests) if self.tracer is not None else nullcontext()

    def _report_load(self) -> None:
        running = len(self.running)
        self.metrics.set_load(running, len(self.waiting), running, len(self.rows))

    def _report_prefix_cache(self) -> None:
        if self.metrics is not None:
            pc = self.prefix_cache
            self.metrics.set_prefix_cache(len(pc), pc.bytes, pc.evictions)
