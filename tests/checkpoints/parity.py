"""Checks shared by the per-family parity tests: hybridlm against transformers on one tiny model.

Every check runs in fp32 on a batch of two prompts; tolerances are absolute on the logits.
"""

from __future__ import annotations

from pathlib import Path

import torch

import hybridlm
from hybridlm.checkpoints import save_pretrained
from hybridlm.model import HybridLM

LOGIT_ATOL = 1e-4  # hybridlm vs transformers (different kernels: chunked scans, grouped experts)
# A prefill in pieces plus decode steps against transformers' full forward: two fp32 computations of 86
# tokens whose rounding the tiny random models amplify (qwen3_next: per-layer errors of ~1e-6 reach the
# logits at ~1e-4). Measured against float64 (2026-12-01): hybridlm's token-by-token Gated DeltaNet scan
# 1.16e-4, transformers' chunked form 4.2e-5, 1.58e-4 apart; with the same fp32 input each of our Gated
# DeltaNet layers is nearer float64 than the chunked form (0.9-2.1e-6 vs 1.2-3.6e-6).
STEPPED_VS_TRANSFORMERS_ATOL = 2e-4
ROUND_TRIP_ATOL = 1e-5  # transformers vs transformers after a hybridlm save
NEW_TOKENS = 16


def prompts(length: int = 20, batch: int = 2, seed: int = 0, vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@torch.no_grad()
def hf_logits(hf_model, ids: torch.Tensor) -> torch.Tensor:
    return hf_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()


@torch.no_grad()
def ours_logits(model: HybridLM, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits.float()


def check_logits(hf_model, model: HybridLM, ids: torch.Tensor) -> float:
    diff = max_diff(hf_logits(hf_model, ids), ours_logits(model, ids))
    assert diff < LOGIT_ATOL, f"max |logit difference| {diff:.2e} >= {LOGIT_ATOL}"
    return diff


@torch.no_grad()
def hf_greedy(hf_model, ids: torch.Tensor, new_tokens: int = NEW_TOKENS) -> torch.Tensor:
    hf_model.generation_config.eos_token_id = None  # generate exactly new_tokens, as hybridlm does without eos
    return hf_model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )


@torch.no_grad()
def greedy_without_cache(model: HybridLM, ids: torch.Tensor, new_tokens: int = NEW_TOKENS) -> torch.Tensor:
    """The spec for cached generation: a full forward per new token."""
    for _ in range(new_tokens):
        next_token = model(ids).logits[:, -1].argmax(-1)
        ids = torch.cat([ids, next_token[:, None]], dim=1)
    return ids


def check_greedy(hf_model, model: HybridLM, ids: torch.Tensor) -> None:
    ours = hybridlm.generate(model, ids, NEW_TOKENS)
    assert torch.equal(ours, hf_greedy(hf_model, ids)), "greedy tokens differ from transformers' generate"
    assert torch.equal(ours, greedy_without_cache(model, ids)), "cached generation differs from full forwards"


@torch.no_grad()
def check_chunked_decode(
    hf_model, model: HybridLM, ids: torch.Tensor, split: int | None = None, decode_steps: int = 6
) -> float:
    """Prefill in two chunks (the first ``split`` tokens, then the rest), then decode token by token;
    compare every position's logits with one full forward of the whole sequence, ours and
    transformers' (transformers' own cached continuation is not the reference: nemotron_h's skips the
    dt clamp, jamba's multi-token one ignores the cached state)."""
    full_ids = torch.cat([ids, prompts(decode_steps, ids.shape[0], seed=99)], dim=1)
    prompt_len = ids.shape[1]
    split = prompt_len // 2 + 1 if split is None else split
    cache = model.new_cache(ids.shape[0], full_ids.shape[1])
    pieces = [model(full_ids[:, :split], cache=cache).logits, model(full_ids[:, split:prompt_len], cache=cache).logits]
    for t in range(prompt_len, full_ids.shape[1]):
        pieces.append(model(full_ids[:, t : t + 1], cache=cache).logits)
    stepped = torch.cat(pieces, dim=1).float()
    ours_diff = max_diff(stepped, ours_logits(model, full_ids))
    hf_diff = max_diff(stepped, hf_logits(hf_model, full_ids))
    assert ours_diff < LOGIT_ATOL, f"chunked prefill + decode vs full forward: {ours_diff:.2e}"
    assert hf_diff < STEPPED_VS_TRANSFORMERS_ATOL, (
        f"chunked prefill + decode vs transformers' full forward: {hf_diff:.2e}"
    )
    return hf_diff


def check_round_trip(hf_model, model: HybridLM, directory: Path, ids: torch.Tensor) -> float:
    """hybridlm writes the HF checkpoint; transformers loads it and reproduces the original logits."""
    import transformers

    save_pretrained(model, directory, format="hf")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(directory).float().eval()
    assert type(reloaded) is type(hf_model)
    diff = max_diff(hf_logits(hf_model, ids), hf_logits(reloaded, ids))
    assert diff < ROUND_TRIP_ATOL, f"transformers after the hybridlm round trip: {diff:.2e}"
    return diff
