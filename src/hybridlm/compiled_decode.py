"""The decode step's blocks and LM head through ``torch.compile``, checked against eager before use.

``HybridLM.compile_decode(mode)`` turns it on. The host bookkeeping of a step (``cache.begin`` and
``advance``: Python ints, the room check) stays eager; the blocks and the LM head are one graph
(``fullgraph=True``: the torch forms of every mixer and of the MoE experts run without a host
synchronisation, so nothing splits it), traced with dynamic shapes so one graph serves many batch
sizes and every context length (torch compiles a batch of one apart, and measured here 2-3 and 4 or more
apart too).

Attention reads the cache up to the longest slot rounded up to ``KV_BUCKET`` columns, masking each
slot's columns past its own length, so the graph's shapes change once every ``KV_BUCKET`` tokens,
not every step: what a CUDA graph (``mode="reduce-overhead"``) needs to be replayed; in those modes the
cache's tensors are marked as fixed addresses (``torch._dynamo.mark_static_address``), as a KV cache held in
module buffers is, since the graph updates them in place. The CUDA modes have not run on a GPU here.

Before the compiled step serves a batch size for the first time, it decodes a few steps of random
tokens from a short random prompt in scratch caches beside the eager step, each step from the eager
step's state, comparing logits and states per slot (``CHECK_LIMITS``); a difference beyond round-off,
or any error, is warned once and decoding stays eager. A compile error later (a new shape
class) is warned the same way and that step runs eagerly: dynamo compiles a frame before running it,
so the cache is untouched. On CPU in fp32 the eager step runs hybridlm's C kernels, which ``torch.compile``
cannot see into; measured on the bench models the compiled torch forms are slower there than those
kernels (``benchmarks/bench_decode.py --compile``), so compiling pays where the kernels do not apply:
bf16 weights, and GPUs.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.fx.experimental._config as fx_config
from torch import Tensor

if TYPE_CHECKING:
    from hybridlm.cache import ForwardContext, HybridCache
    from hybridlm.model import HybridLM

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
KV_BUCKET = 256
CHECK_PROMPT_TOKENS = 6
CHECK_STEPS = 3
# Each checked step starts the compiled cache from the eager cache's state, so a difference is one step's,
# measured per slot: |compiled - eager| relative to the slot's largest eager value, for the logits and for
# every state tensor. On the bench models (512-wide nemotron_h / qwen3_next, random weights): fp32 at most
# 1e-6, so 1e-5 bounds every one. bf16 mostly 1.4-2.3e-2 (inductor keeps fused intermediates in fp32 where
# eager rounds each op), but a router's near-tie rounds the other way now and then and the token takes
# another expert: qwen3_next at one slot, 2 of 6 checks at 0.30, the compiled step as close to the fp32
# model as the eager one (0.06 against 0.32 at the worst step). So with 16-bit weights at most half the
# checks may exceed 5e-2; a wrong mask, position or state update is off in most of them.
CHECK_LIMITS = {torch.float32: (1e-5, 0.0), torch.float64: (1e-5, 0.0)}  # (tolerance, share allowed beyond)
HALF_LIMITS = (5e-2, 0.5)


def check_mode(mode: object) -> str:
    if mode not in MODES:
        raise ValueError(f"compile mode must be one of {', '.join(MODES)}, got {mode!r}")
    return str(mode)


class CompiledDecode:
    """``model``'s decode blocks compiled with ``mode`` (see the module docstring)."""

    def __init__(self, model: HybridLM, mode: str = "default") -> None:
        self.mode = check_mode(mode)
        self._model = model
        self._graph = torch.compile(model.decode_blocks, mode=mode, dynamic=True, fullgraph=True)
        self._checked: set[int] = set()  # batch sizes found equal to eager
        self.failure: str | None = None  # why decoding went back to eager, once it has

    def __call__(self, hidden: Tensor, context: ForwardContext, cache: HybridCache) -> Tensor | None:
        """Logits [B, vocab] of one step, or None where the eager step must run (a gradient being
        recorded, a failed check or compile)."""
        if self.failure is not None or torch.is_grad_enabled():
            return None
        if cache.batch_size not in self._checked:
            self._check(cache)
            if self.failure is not None:
                return None
            self._checked.add(cache.batch_size)
        if self.mode in CUDA_GRAPH_MODES and hidden.device.type == "cuda":
            # CUDA graphs hold addresses: the cache's tensors, updated in place, must be known as fixed
            # (as parameters are), else torch skips the graph for an input it would have to copy.
            for tensor in cache.state_tensors():
                torch._dynamo.mark_static_address(tensor)
        try:
            return self._compiled(hidden, bucketed(context, cache.max_seq_len), cache)
        except torch._dynamo.exc.TorchDynamoException as error:  # raised compiling, before running
            self._fail(f"compiling failed: {_summary(error)}")
            return None

    def _compiled(self, hidden: Tensor, context: ForwardContext, cache: HybridCache) -> Tensor:
        # Without duck shaping: a cache length equal to a weight's dimension (a head of 16 values, a cache
        # of 16 tokens) would otherwise share its symbol and be specialised to that constant.
        with fx_config.patch(use_duck_shape=False):
            return self._graph(hidden, context, cache)

    def _check(self, cache: HybridCache) -> None:
        """Decode a few random steps in scratch caches like ``cache`` (its batch size, and inference tensors
        or not, as dynamo guards on both), eager beside compiled, twice: attention reading up to the cache's
        end and short of it (torch compiles the two apart: only the first view is contiguous)."""
        model, batch_size = self._model, cache.batch_size
        generator = torch.Generator().manual_seed(0)
        prompt = torch.randint(model.config.vocab_size, (batch_size, CHECK_PROMPT_TOKENS), generator=generator)
        mask = torch.ones_like(prompt)
        for slot in range(1, batch_size):  # slots of different lengths: the per-slot masks are exercised
            mask[slot, : slot % CHECK_PROMPT_TOKENS] = 0
        prompt, mask = prompt.to(model.device), mask.to(model.device)
        used = CHECK_PROMPT_TOKENS + CHECK_STEPS
        slot_differences: list[float] = []
        state_differences: list[float] = []
        try:
            for length in (used, (1 - used // -KV_BUCKET) * KV_BUCKET):  # read to the end; a bucket short of it
                with torch.inference_mode(cache.lengths.is_inference()):
                    eager_cache, compiled_cache = (model.new_cache(batch_size, length) for _ in range(2))
                model(prompt, cache=eager_cache, attention_mask=mask, last_logits_only=True)
                for _ in range(CHECK_STEPS):
                    compiled_cache.copy_from(eager_cache)
                    tokens = torch.randint(model.config.vocab_size, (batch_size,), generator=generator)
                    tokens = tokens.to(model.device)
                    expected = _step(model.decode_blocks, model, tokens, eager_cache, bucket=False)
                    actual = _step(self._compiled, model, tokens, compiled_cache, bucket=True)
                    slot_differences += _relative_differences(actual, expected)
                    state_differences += _state_differences(compiled_cache, eager_cache)
        except Exception as error:  # any failure of the compiled step means: stay eager
            self._fail(f"checking it failed: {type(error).__name__}: {_summary(error)}")
            return
        tolerance, outliers = CHECK_LIMITS.get(model.dtype, HALF_LIMITS)
        for what, differences in (("logits", slot_differences), ("states", state_differences)):
            beyond = sorted(d for d in differences if d > tolerance)
            if len(beyond) > outliers * len(differences):
                self._fail(
                    f"its {what} differ from the eager step's by up to {beyond[-1]:.2e} of their largest in "
                    f"{len(beyond)} of {len(differences)} checks (limit {tolerance:g})"
                )
                return

    def _fail(self, reason: str) -> None:
        self.failure = reason
        warnings.warn(f"hybridlm: torch.compile of the decode step: {reason}; decoding eagerly", stacklevel=3)


def _step(blocks: Callable[..., Tensor], model: HybridLM, tokens: Tensor, cache: HybridCache, bucket: bool) -> Tensor:
    context = cache.begin(1, None)
    if bucket:
        context = bucketed(context, cache.max_seq_len)
    logits = blocks(model._embed(tokens), context, cache)
    cache.advance(1, None)
    return logits


def _relative_differences(actual: Tensor, expected: Tensor) -> list[float]:
    """Per row: max |actual - expected| / max |expected| (NaN counts as infinitely different)."""
    scale = expected.float().abs().amax(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
    difference = ((actual.float() - expected.float()).abs().amax(dim=-1) / scale).nan_to_num(math.inf)
    return difference.tolist()


def _state_differences(actual: HybridCache, expected: HybridCache) -> list[float]:
    """Per slot: the largest relative difference of any of its state tensors (keys, values, conv, recurrent)."""
    per_tensor = [
        _relative_differences(a.flatten(1), e.flatten(1))
        for a, e in zip(actual.state_tensors(), expected.state_tensors(), strict=True)
    ]
    return [max(slot) for slot in zip(*per_tensor, strict=True)] if per_tensor else []


def bucketed(context: ForwardContext, max_seq_len: int) -> ForwardContext:
    """The context with attention's read width rounded up to ``KV_BUCKET`` columns (at most the cache's),
    every slot's keys masked by its own position (``past_length`` None)."""
    width = min(max_seq_len, -(-context.max_length // KV_BUCKET) * KV_BUCKET)
    return dataclasses.replace(context, past_length=None, max_length=width)


def _summary(error: BaseException) -> str:
    """The error's first line, and the innermost line of user code dynamo names, where it names one."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    files = [line.strip() for line in lines if line.strip().startswith("File ")]
    return f"{lines[0]} ({files[-1]})" if files else lines[0]
