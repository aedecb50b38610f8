"""HybridLM: embedding -> one pre-norm residual block per pattern character -> norm -> LM head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from hybridlm.accounting import count_params
from hybridlm.blocks import block_spec
from hybridlm.cache import ForwardContext, HybridCache
from hybridlm.compiled_decode import CompiledDecode
from hybridlm.config import HybridConfig
from hybridlm.layers.linear import Linear
from hybridlm.layers.moe import Experts
from hybridlm.layers.norm import RMSNorm
from hybridlm.memory import free_memory_bytes
from hybridlm.ops import native

# A prompt longer than this goes through a cache in pieces of this many tokens (as vLLM's chunked
# prefill): large enough for matmuls at full speed, small enough that no activation of a piece
# exceeds glibc's mmap threshold by much (past it every temporary is page-faulted in afresh, and
# prefill of 16K tokens in one piece took 14x the time of 2K instead of 8x).
PREFILL_CHUNK_TOKENS = 2048

_OBSERVED_AND_COMPILED = (
    "a block observer (a tracer, the serving engine's metrics) times every block of a decode step, and a "
    "compiled decode step is one graph: call model.compile_decode(None) first, or detach the observer"
)

# Refused even where free memory cannot be asked (meta, mps): 4.4e12 parameters is far beyond any
# model one process holds (17 TB in fp32) and far below the sizes where torch's int64 size arithmetic
# overflows ("Storage size calculation overflowed", "Overflow when unpacking long long").
MAX_PARAMETERS = 2**42


class BlockObserver(Protocol):
    """Watches every block call from outside the model (the tracer attaches here).

    ``routing_counts`` is the MoE block's tokens per expert [E] (a tensor on the model's device,
    not synchronised), None for other blocks.
    """

    def before_block(self, index: int, layer_type: str, hidden: Tensor) -> None: ...

    def after_block(self, index: int, layer_type: str, hidden: Tensor, routing_counts: Tensor | None) -> None: ...


class Block(nn.Module):
    """x + residual_multiplier * mixer(norm(x))."""

    def __init__(self, index: int, char: str, config: HybridConfig) -> None:
        super().__init__()
        spec = block_spec(char)
        self.index = index
        self.char = char
        self.layer_type = spec.layer_type
        self.is_sequence_mixer = spec.mixes_sequence
        self.routes_experts = spec.routes_experts
        self.residual_multiplier = config.residual_multiplier
        self.norm = RMSNorm(config.hidden_size, config.norm_eps, config.is_norm_zero_centered)
        self.mixer = spec.module.from_config(config)

    def step(self, x: Tensor, context: ForwardContext, cache: HybridCache) -> Tensor:
        """One decoding token per slot: x [B, hidden] -> [B, hidden]."""
        h = self.norm(x)
        h = self.mixer.step(h, context, cache[self.index]) if self.is_sequence_mixer else self.mixer(h)
        if self.residual_multiplier != 1.0:
            h = h * self.residual_multiplier
        return x + h

    def forward(self, x: Tensor, context: ForwardContext, cache: HybridCache | None) -> Tensor:
        h = self.norm(x)
        if self.is_sequence_mixer:
            h = self.mixer(h, context, None if cache is None else cache[self.index])
        else:
            h = self.mixer(h)
        if self.residual_multiplier != 1.0:
            h = h * self.residual_multiplier
        return x + h


@dataclass
class HybridOutput:
    logits: Tensor  # [B, T, vocab] (only the last position when asked)
    aux_loss: Tensor | None = None  # sum of the MoE blocks' balancing + z losses (training only)


class HybridLM(nn.Module):
    def __init__(self, config: HybridConfig) -> None:
        super().__init__()
        if not isinstance(config, HybridConfig):
            raise ValueError(
                f"HybridLM takes a HybridConfig, got {type(config).__name__}; "
                f"build one with HybridConfig.from_dict(...) or hybridlm.presets.get_preset(name)"
            )
        config.validate()
        check_fits_in_memory(config)
        self.config = config
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(i, c, config) for i, c in enumerate(config.pattern))
        self.norm_f = RMSNorm(config.hidden_size, config.norm_eps, config.is_norm_zero_centered)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.compiled_decode: CompiledDecode | None = None
        self.block_observer = None
        self.apply(self._init_weights)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embeddings.weight

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, Experts):
            for param in module.parameters():
                nn.init.normal_(param, std=std)

    @property
    def block_observer(self) -> BlockObserver | None:
        """What watches every block call (the tracer, the engine's block timer), or None."""
        return self._block_observer

    @block_observer.setter
    def block_observer(self, observer: BlockObserver | None) -> None:
        if observer is not None and self.compiled_decode is not None:
            raise ValueError(_OBSERVED_AND_COMPILED)
        self._block_observer = observer

    @property
    def device(self) -> torch.device:
        return self.embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.weight.dtype

    def new_cache(self, batch_size: int, max_seq_len: int, dtype: torch.dtype | None = None) -> HybridCache:
        """Preallocate generation state for ``batch_size`` sequences of up to ``max_seq_len`` tokens."""
        if batch_size <= 0 or max_seq_len <= 0:
            raise ValueError(f"batch_size and max_seq_len must be positive, got {batch_size}, {max_seq_len}")
        dtype = dtype or self.dtype
        if dtype != self.dtype:
            raise ValueError(
                f"new_cache: dtype {dtype} is not the model's {self.dtype}; a cache in another dtype than the "
                f"weights is not implemented (attention reads its keys in the queries' dtype): convert the model"
            )
        states = [
            block.mixer.new_state(batch_size, max_seq_len, self.device, dtype) if block.is_sequence_mixer else None
            for block in self.layers
        ]
        return HybridCache(self.config.pattern, states, batch_size, max_seq_len, self.device)

    def forward(
        self,
        input_ids: Tensor,
        cache: HybridCache | None = None,
        attention_mask: Tensor | None = None,
        last_logits_only: bool = False,
    ) -> HybridOutput:
        """input_ids: [B, T] -> logits [B, T, vocab].

        With ``cache`` the call continues the cached sequences (prefill of a first or later chunk,
        or a one-token decode) and appends to it. ``attention_mask`` [B, T] (1 = token, 0 = padding)
        supports left-padded batches of prompts.
        """
        self._check_inputs(input_ids, cache, attention_mask)
        if input_ids.device.type != "cpu":
            return self._forward(input_ids, cache, attention_mask, last_logits_only)
        with native.subnormals_flushed():  # decays underflow; x86 is ~100x slower on every subnormal
            return self._forward(input_ids, cache, attention_mask, last_logits_only)

    def _forward(
        self, input_ids: Tensor, cache: HybridCache | None, attention_mask: Tensor | None, last_logits_only: bool
    ) -> HybridOutput:
        token_mask = None if attention_mask is None else attention_mask.bool()
        B, T = input_ids.shape
        if token_mask is not None and bool(token_mask.all()):
            token_mask = None  # no padding after all: the fast paths apply
        if cache is not None and token_mask is None and T > PREFILL_CHUNK_TOKENS:
            return self._prefill_in_pieces(input_ids, cache, last_logits_only)
        if cache is not None:
            context = cache.begin(T, token_mask)
        else:
            context = ForwardContext.without_cache(token_mask, B, T, input_ids.device)

        hidden = self._embed(input_ids)
        observer = self.block_observer
        aux_losses = []
        for block in self.layers:
            if observer is not None:
                observer.before_block(block.index, block.layer_type, hidden)
            hidden = block(hidden, context, cache)
            if observer is not None:
                counts = block.mixer.last_tokens_per_expert if block.routes_experts else None
                observer.after_block(block.index, block.layer_type, hidden, counts)
            if block.routes_experts and self.training:
                aux_losses.append(block.mixer.last_aux_loss)
        if cache is not None:
            cache.advance(T, token_mask)

        if last_logits_only:
            hidden = hidden[:, -1:]
        aux_loss = torch.stack(aux_losses).sum() if aux_losses else None
        return HybridOutput(logits=self._logits(hidden), aux_loss=aux_loss)

    def _embed(self, input_ids: Tensor) -> Tensor:
        hidden = self.embeddings(input_ids)
        return hidden * self.config.embedding_multiplier if self.config.embedding_multiplier != 1.0 else hidden

    def _logits(self, hidden: Tensor) -> Tensor:
        logits = self.lm_head(self.norm_f(hidden))
        return logits / self.config.logits_scaling if self.config.logits_scaling != 1.0 else logits

    def _prefill_in_pieces(self, input_ids: Tensor, cache: HybridCache, last_logits_only: bool) -> HybridOutput:
        """A long prompt through the cache PREFILL_CHUNK_TOKENS at a time: the same logits (the chunked
        forms are exact), with activations bounded by one piece, so time grows linearly with length."""
        pieces = [
            self(input_ids[:, start : start + PREFILL_CHUNK_TOKENS], cache, None, last_logits_only).logits
            for start in range(0, input_ids.shape[1], PREFILL_CHUNK_TOKENS)
        ]
        return HybridOutput(logits=pieces[-1] if last_logits_only else torch.cat(pieces, dim=1))

    def decode_step(self, token_ids: Tensor, cache: HybridCache) -> Tensor:
        """One token for every slot of ``cache``: token_ids [B] -> next-token logits [B, vocab].

        Each slot continues at its own position (``cache.lengths``); nothing here waits for the
        device (no ``.item()``, no data-dependent branch), so an engine can call it every step and a
        CUDA graph can capture it. The ids are trusted to be in range (they come from sampling); an
        out-of-range id is reported as a ValueError where the device reports it at all. After
        ``compile_decode`` the blocks run compiled.
        """
        if token_ids.dim() != 1 or token_ids.shape[0] != cache.batch_size or token_ids.is_floating_point():
            raise ValueError(
                f"token_ids must be integer ids [batch={cache.batch_size}], "
                f"got {tuple(token_ids.shape)} {token_ids.dtype}"
            )
        context = cache.begin(1, None)
        try:
            hidden = self._embed(token_ids)
        except IndexError:
            self._check_inputs(token_ids[:, None], cache, None)  # names the bad id
            raise
        logits = None
        if self.compiled_decode is not None:  # never with an observer (refused when either is set)
            logits = self.compiled_decode(hidden, context, cache)
        if logits is None:
            logits = self.decode_blocks(hidden, context, cache)
        cache.advance(1, None)
        return logits

    def decode_blocks(self, hidden: Tensor, context: ForwardContext, cache: HybridCache) -> Tensor:
        """This step's embedded tokens [B, hidden] through every block's step and the LM head -> [B, vocab]
        (the part of ``decode_step`` that ``compile_decode`` compiles; the cache is not advanced)."""
        observer = self.block_observer
        for block in self.layers:
            if observer is not None:  # observers see [B, T, hidden], as from forward
                observer.before_block(block.index, block.layer_type, hidden[:, None])
            hidden = block.step(hidden, context, cache)
            if observer is not None:
                counts = block.mixer.last_tokens_per_expert if block.routes_experts else None
                observer.after_block(block.index, block.layer_type, hidden[:, None], counts)
        return self._logits(hidden)

    def compile_decode(self, mode: str | None = "default") -> None:
        """Run later decode steps' blocks through ``torch.compile`` with ``mode`` ("default",
        "reduce-overhead" for CUDA graphs, "max-autotune", "max-autotune-no-cudagraphs"), each graph
        checked against the eager step first, eager on any failure (``hybridlm.compiled_decode``);
        None: eager again."""
        if mode is not None and self.block_observer is not None:
            raise ValueError(_OBSERVED_AND_COMPILED)
        self.compiled_decode = None if mode is None else CompiledDecode(self, mode)

    def _check_inputs(self, input_ids: Tensor, cache: HybridCache | None, attention_mask: Tensor | None) -> None:
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(
                f"input_ids must be an integer tensor [batch, seq_len], got {tuple(input_ids.shape)} {input_ids.dtype}"
            )
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids is empty: give at least one token per sequence")
        bad = (input_ids < 0) | (input_ids >= self.config.vocab_size)
        if bool(bad.any()):
            b, t = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"input_ids[{b}, {t}] = {int(input_ids[b, t])} is out of range for vocab_size {self.config.vocab_size}"
            )
        if cache is not None and cache.batch_size != input_ids.shape[0]:
            raise ValueError(f"input_ids has batch {input_ids.shape[0]} but the cache holds {cache.batch_size}")
        if attention_mask is not None:
            check_attention_mask(attention_mask, tuple(input_ids.shape))
            if cache is not None and max(cache.host_lengths) > 0 and not bool(attention_mask.bool().all()):
                raise ValueError("attention_mask may hold padding only in the first chunk of a cached sequence")

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def check_attention_mask(attention_mask: object, shape: tuple[int, ...]) -> None:
    """A ValueError naming the first problem of a padding mask for input_ids of ``shape``: it must be a
    tensor of that shape holding only 0 (padding) and 1 (token), or bools, left-padded, with at least one
    token per row. A 0.5 or a 2 is not a weight this model could apply, so it is refused, not rounded."""
    if not isinstance(attention_mask, Tensor):
        raise ValueError(
            f"attention_mask must be a tensor [batch, seq_len] of 0/1, got {type(attention_mask).__name__}"
        )
    if tuple(attention_mask.shape) != shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {shape}")
    if attention_mask.dtype != torch.bool:
        is_binary = (attention_mask == 0) | (attention_mask == 1)  # NaN is neither
        if not bool(is_binary.all()):
            row, column = (int(i) for i in (~is_binary).nonzero()[0])
            raise ValueError(
                f"attention_mask[{row}, {column}] = {attention_mask[row, column].item()!r} in row {row}: "
                f"a mask holds only 0 (padding) and 1 (token)"
            )
    mask = attention_mask.bool()
    empty_rows = (~mask.any(dim=1)).nonzero()
    if len(empty_rows):
        row = int(empty_rows[0])
        raise ValueError(f"attention_mask row {row} is all zeros: every row needs at least one real token")
    # Recurrent blocks can only skip padding that comes before every real token.
    if bool((mask[:, :-1] & ~mask[:, 1:]).any()):
        row = int((mask[:, :-1] & ~mask[:, 1:]).nonzero()[0, 0])
        raise ValueError(
            f"attention_mask row {row} is not left-padded: zeros may only come before the first real token"
        )


def check_fits_in_memory(config: HybridConfig) -> None:
    """A ValueError, before anything is allocated, when the parameters of ``HybridLM(config)`` in
    torch's default dtype would not fit in the free memory of torch's default device (or are absurd)."""
    parameters = count_params(config).total  # exact, from the config alone
    dtype, device = torch.get_default_dtype(), torch.get_default_device()
    needed = parameters * dtype.itemsize
    if parameters > MAX_PARAMETERS:
        raise ValueError(
            f"this config has {_large(parameters)} parameters ({_large(needed)} bytes in {dtype}), more than the "
            f"{MAX_PARAMETERS:,} a HybridLM may have; check vocab_size, hidden_size and the sub-config sizes"
        )
    free = free_memory_bytes(device)
    if free is not None and needed > free:
        raise ValueError(
            f"this config has {parameters:,} parameters: {needed:,} bytes ({needed / 2**30:.1f} GiB) in {dtype}, "
            f"more than the {free:,} bytes ({free / 2**30:.1f} GiB) free on {device}; "
            f"check vocab_size, hidden_size and the sub-config sizes"
        )


def _large(number: int) -> str:
    """1,234,567 for a count a person reads digit by digit; 4.0e+102 past that (and past float's range)."""
    digits = str(number)
    if len(digits) <= 24:
        return f"{number:,}"
    return f"{digits[0]}.{digits[1:3]}e+{len(digits) - 1}"
