"""Generation: prefill, one-token decode steps, sampling, streaming (gpt-fast's shape).

Prompts of different lengths are left-padded into one batch; the recurrent blocks skip the padding
and attention masks it, so each row generates what it would alone.

Every argument is checked when ``generate`` / ``stream_generate`` is called, before a cache is
allocated: a bad one is a ValueError naming it. As vLLM does (it answers 400 when prompt +
max_tokens > max_model_len), a request that does not fit the model's context
(``config.max_position_embeddings``) is refused with both numbers rather than silently cut short;
``allow_longer_than_context=True`` runs it anyway, still refused when its cache would not fit in
the device's free memory.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from hybridlm.accounting import cache_bytes
from hybridlm.cache import HybridCache
from hybridlm.memory import free_memory_bytes  # also public here, where it was first
from hybridlm.model import HybridLM, check_attention_mask

# torch.Generator.manual_seed takes any integer in this range
_SEED_RANGE = (-(2**63), 2**64 - 1)
# a torch.long holds these; a token id outside them cannot even be put in a tensor to be checked
_INT64_RANGE = (-(2**63), 2**63 - 1)


def pad_prompts(prompts: Sequence[Sequence[int]] | Tensor, pad_id: int = 0) -> tuple[Tensor, Tensor | None]:
    """A batch of token lists -> left-padded ids [B, T] and a mask [B, T] (None when all lengths match)."""
    if isinstance(prompts, Tensor):
        if prompts.dim() == 1:
            prompts = prompts[None]
        if prompts.dim() != 2 or prompts.is_floating_point() or prompts.is_complex() or prompts.dtype == torch.bool:
            raise ValueError(
                f"input_ids must be integer token ids [batch, seq_len], got {tuple(prompts.shape)} {prompts.dtype}"
            )
        if prompts.shape[0] == 0 or prompts.shape[1] == 0:
            raise ValueError(f"input_ids is empty ({tuple(prompts.shape)}): give at least one token per sequence")
        return prompts.long(), None
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise ValueError(
            f"input_ids must be a [batch, seq_len] tensor or a list of token-id lists, got {type(prompts).__name__}"
        )
    if not prompts or any(isinstance(p, (str, bytes)) or not isinstance(p, Sequence) or len(p) == 0 for p in prompts):
        raise ValueError("input_ids: every prompt must be a non-empty list of token ids")
    rows = [[_token_id(token, row, column) for column, token in enumerate(p)] for row, p in enumerate(prompts)]
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for row, prompt in enumerate(rows):
        ids[row, longest - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, longest - len(prompt) :] = 1
    return ids, (None if bool(mask.all()) else mask)


def _token_id(token: object, row: int, column: int) -> int:
    if isinstance(token, bool):
        raise ValueError(f"input_ids[{row}][{column}] = {token!r} is not a token id (an integer)")
    try:
        value = operator.index(token)  # int, numpy and 0-d integer tensors; never a silently truncated float
    except TypeError:
        raise ValueError(f"input_ids[{row}][{column}] = {token!r} is not a token id (an integer)") from None
    if not _INT64_RANGE[0] <= value <= _INT64_RANGE[1]:
        raise ValueError(f"input_ids[{row}][{column}] = {value} is out of range: a token id is in 0..vocab_size - 1")
    return value


def as_attention_mask(attention_mask: Tensor | Sequence[Sequence[int]] | None) -> Tensor | None:
    """A mask given as a tensor or as nested lists of 0/1 (or bools) -> a tensor; its values are checked
    against the prompt by ``check_attention_mask``."""
    if attention_mask is None or isinstance(attention_mask, Tensor):
        return attention_mask
    if isinstance(attention_mask, (str, bytes)) or not isinstance(attention_mask, Sequence):
        raise ValueError(
            "attention_mask must be a [batch, seq_len] tensor or a list of 0/1 lists, "
            f"got {type(attention_mask).__name__}"
        )
    try:
        return torch.tensor(attention_mask)
    except (TypeError, ValueError, RuntimeError, OverflowError) as error:  # ragged rows, strings, huge ints
        raise ValueError(f"attention_mask is not a rectangular list of 0/1 lists ({error})") from None


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """A ValueError naming the first bad sampling argument (temperature 0 is greedy and ignores the others)."""
    if not _is_real(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 (or None for no limit), got {top_k!r}")
    if top_p is not None and (not _is_real(top_p) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be a number in (0, 1] (or None for no limit), got {top_p!r}")


def _is_int(value: object) -> bool:
    # numbers.Integral takes numpy's integers too, as transformers' generate does; a bool is not a count
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _plain_sampling(
    temperature: float, top_k: int | None, top_p: float | None
) -> tuple[float, int | None, float | None]:
    """Checked sampling arguments as Python numbers (numpy scalars are not what torch.topk takes)."""
    return float(temperature), None if top_k is None else int(top_k), None if top_p is None else float(top_p)


def sample(
    logits: Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """logits [B, V] -> token ids [B]; greedy when temperature is 0."""
    check_sampling(temperature, top_k, top_p)
    return _sample(logits, *_plain_sampling(temperature, top_k, top_p), generator)


def _sample(
    logits: Tensor, temperature: float, top_k: int | None, top_p: float | None, generator: torch.Generator | None
) -> Tensor:
    """``sample`` on arguments already checked (the decode loop checks them once, not every step)."""
    # A temperature below float32's reciprocal range (1e-320) is 0 once cast: that limit is greedy.
    if temperature < 1.0 / torch.finfo(torch.float32).max:
        return logits.argmax(dim=-1)
    # Shift by the maximum before dividing, so a tiny temperature gives -inf and 0, never inf - inf.
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the smallest set reaching top_p
        drop[:, 0] = False  # and always the most likely token (a top_p that rounds to 0 in fp32 drops none)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def prefill(model: HybridLM, input_ids: Tensor, cache: HybridCache, attention_mask: Tensor | None = None) -> Tensor:
    """Run the prompt through the model into ``cache``; logits of the last position [B, V]."""
    return model(input_ids, cache=cache, attention_mask=attention_mask, last_logits_only=True).logits[:, -1]


def decode_one_token(model: HybridLM, token: Tensor, cache: HybridCache) -> Tensor:
    """token [B] -> logits [B, V] for the next position (the model's per-slot decode step)."""
    return model.decode_step(token, cache)


def stream_generate(
    model: HybridLM,
    input_ids: Tensor | Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_token_id: int | None = None,
    attention_mask: Tensor | Sequence[Sequence[int]] | None = None,
    allow_longer_than_context: bool = False,
) -> Iterator[Tensor]:
    """Yield the next token of every sequence, [B], one step at a time.

    The arguments are checked here, when called, not at the first ``next``. A sequence that
    produced ``eos_token_id`` keeps yielding it; the iterator stops once all have.
    """
    ids, padded_mask = pad_prompts(input_ids)
    attention_mask = as_attention_mask(attention_mask)
    mask = attention_mask if attention_mask is not None else padded_mask
    _check_request(model, ids, mask, max_new_tokens, seed, eos_token_id, allow_longer_than_context)
    check_sampling(temperature, top_k, top_p)
    temperature, top_k, top_p = _plain_sampling(temperature, top_k, top_p)
    max_new_tokens = int(max_new_tokens)
    seed = None if seed is None else int(seed)
    eos_token_id = None if eos_token_id is None else int(eos_token_id)
    return _stream(model, ids, mask, max_new_tokens, temperature, top_k, top_p, seed, eos_token_id)


def _stream(
    model: HybridLM,
    ids: Tensor,
    mask: Tensor | None,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int | None,
    eos_token_id: int | None,
) -> Iterator[Tensor]:
    ids = ids.to(model.device)
    mask = None if mask is None else mask.to(model.device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            cache = model.new_cache(ids.shape[0], ids.shape[1] + max_new_tokens)
            logits = prefill(model, ids, cache, mask)
            finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
            for step in range(max_new_tokens):
                token = _sample(logits, temperature, top_k, top_p, generator)
                if eos_token_id is not None:
                    token = token.masked_fill(finished, eos_token_id)
                    finished |= token == eos_token_id
                yield token
                if step + 1 == max_new_tokens or bool(finished.all()):
                    return
                logits = decode_one_token(model, token, cache)
    finally:
        model.train(was_training)


def _check_request(
    model: HybridLM,
    ids: Tensor,
    mask: Tensor | None,
    max_new_tokens: int,
    seed: int | None,
    eos_token_id: int | None,
    allow_longer_than_context: bool,
) -> None:
    vocab = model.config.vocab_size
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if seed is not None and (not _is_int(seed) or not _SEED_RANGE[0] <= seed <= _SEED_RANGE[1]):
        raise ValueError(f"seed must be an integer in [-2**63, 2**64 - 1] (or None), got {seed!r}")
    if eos_token_id is not None and (not _is_int(eos_token_id) or not 0 <= eos_token_id < vocab):
        raise ValueError(f"eos_token_id must be a token id in 0..{vocab - 1} (or None), got {eos_token_id!r}")
    if not isinstance(allow_longer_than_context, bool):
        raise ValueError(f"allow_longer_than_context must be True or False, got {allow_longer_than_context!r}")
    bad = (ids < 0) | (ids >= vocab)
    if bool(bad.any()):
        row, column = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"input_ids[{row}, {column}] = {int(ids[row, column])} is out of range for vocab_size {vocab}")
    if mask is not None:
        check_attention_mask(mask, tuple(ids.shape))

    batch, prompt_len = ids.shape
    total = prompt_len + max_new_tokens
    context = model.config.max_position_embeddings
    if not allow_longer_than_context:
        if prompt_len > context:
            raise ValueError(
                f"the prompt has {prompt_len} tokens, more than the model's context of {context} "
                f"(max_position_embeddings); pass allow_longer_than_context=True to run it anyway"
            )
        if total > context:
            raise ValueError(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) = {total} tokens is more than "
                f"the model's context of {context} (max_position_embeddings); ask for at most "
                f"{context - prompt_len} new tokens, or pass allow_longer_than_context=True"
            )
    needed = cache_bytes(model.config, batch, total, model.dtype).total
    free = free_memory_bytes(model.device)
    if free is not None and needed > free:
        raise ValueError(
            f"the generation cache for {batch} sequence(s) of {prompt_len} + {max_new_tokens} tokens needs "
            f"{needed:,} bytes ({needed / 2**30:.1f} GiB), more than the {free:,} bytes free on {model.device}; "
            f"ask for fewer new tokens or a smaller batch"
        )


def generate(
    model: HybridLM,
    input_ids: Tensor | Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_token_id: int | None = None,
    attention_mask: Tensor | Sequence[Sequence[int]] | None = None,
    allow_longer_than_context: bool = False,
) -> Tensor:
    """Prompt ids (a [B, T] tensor or a list of token lists) -> [B, T + new] ids (left-padded rows
    keep their padding). Greedy (temperature 0) is deterministic; sampling is with ``seed``."""
    ids, padded_mask = pad_prompts(input_ids)
    attention_mask = as_attention_mask(attention_mask)
    mask = attention_mask if attention_mask is not None else padded_mask
    stream = stream_generate(
        model, ids, max_new_tokens, temperature, top_k, top_p, seed, eos_token_id, mask, allow_longer_than_context
    )
    tokens = list(stream)
    return torch.cat([ids.to(tokens[0].device), torch.stack(tokens, dim=1)], dim=1)
