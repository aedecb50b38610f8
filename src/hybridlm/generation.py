"""Generation: prefill, one-token decode steps, sampling, streaming (gpt-fast's shape).

Prompts of different lengths are left-padded into one batch; the recurrent blocks skip the padding
and attention masks it, so each row generates what it would alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from hybridlm.cache import HybridCache
from hybridlm.model import HybridLM


def pad_prompts(prompts: Sequence[Sequence[int]] | Tensor, pad_id: int = 0) -> tuple[Tensor, Tensor | None]:
    """A batch of token lists -> left-padded ids [B, T] and a mask [B, T] (None when all lengths match)."""
    if isinstance(prompts, Tensor):
        if prompts.dim() == 1:
            prompts = prompts[None]
        return prompts, None
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
        mask[row, longest - len(prompt) :] = 1
    return ids, (None if bool(mask.all()) else mask)


def sample(
    logits: Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """logits [B, V] -> token ids [B]; greedy when temperature is 0."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def prefill(model: HybridLM, input_ids: Tensor, cache: HybridCache, attention_mask: Tensor | None = None) -> Tensor:
    """Run the prompt through the model into ``cache``; logits of the last position [B, V]."""
    return model(input_ids, cache=cache, attention_mask=attention_mask, last_logits_only=True).logits[:, -1]


def decode_one_token(model: HybridLM, token: Tensor, cache: HybridCache) -> Tensor:
    """token [B] -> logits [B, V] for the next position."""
    return model(token[:, None], cache=cache).logits[:, -1]


def stream_generate(
    model: HybridLM,
    input_ids: Tensor | Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_token_id: int | None = None,
    attention_mask: Tensor | None = None,
) -> Iterator[Tensor]:
    """Yield the next token of every sequence, [B], one step at a time.

    A sequence that produced ``eos_token_id`` keeps yielding it; the iterator stops once all have.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    ids, padded_mask = pad_prompts(input_ids)
    mask = attention_mask if attention_mask is not None else padded_mask
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
            if max_new_tokens == 0:
                return
            logits = prefill(model, ids, cache, mask)
            finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
            for step in range(max_new_tokens):
                token = sample(logits, temperature, top_k, top_p, generator)
                if eos_token_id is not None:
                    token = token.masked_fill(finished, eos_token_id)
                    finished |= token == eos_token_id
                yield token
                if step + 1 == max_new_tokens or bool(finished.all()):
                    return
                logits = decode_one_token(model, token, cache)
    finally:
        model.train(was_training)


def generate(
    model: HybridLM,
    input_ids: Tensor | Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_token_id: int | None = None,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Prompt ids (a [B, T] tensor or a list of token lists) -> [B, T + new] ids (left-padded rows
    keep their padding). Greedy (temperature 0) is deterministic; sampling is with ``seed``."""
    ids, padded_mask = pad_prompts(input_ids)
    mask = attention_mask if attention_mask is not None else padded_mask
    tokens = list(stream_generate(model, ids, max_new_tokens, temperature, top_k, top_p, seed, eos_token_id, mask))
    if not tokens:
        return ids
    return torch.cat([ids.to(tokens[0].device), torch.stack(tokens, dim=1)], dim=1)
