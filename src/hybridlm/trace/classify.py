"""Which layer type a kernel or operator belongs to, and which rule said so.

An imported event's layer type comes from the first of these rules that says anything (the rule
is stored in `events.layer_rule`, and reports show how much time each rule labelled):

1. 'block range': the event ran inside one of hybridlm's own block ranges (`L12.moe`, see
   `parse_block_range`), or for a GPU kernel, the CPU call that launched it did: that block's
   layer index and type, whatever the kernel's name.
2. 'enclosing range name': the innermost user range (record_function / NVTX) around the event or
   around its launch names a layer type (`nccl:all_reduce` -> comm). The range that launched a
   kernel knows more than the kernel's name: a generic SendRecv kernel is the collective its range
   says. A collective launched inside a range that names MoE is MoE all-to-all traffic.
3. 'own name': the kernel or operator's own name (`classify_kernel`), only a layer type, never a
   layer index.

`classify_kernel` tries its name rules in order, case-insensitively; the first match wins:

- moe_a2a: DeepEP (deep_ep / deepep, whose dispatch and combine exist only for MoE), or an
  all-to-all whose name also says MoE (moe, expert: Megatron's MoEAlltoAllTokenDispatcher)
- comm: any other collective: nccl kernels, all_to_all / alltoall / all2all / a2a (as a word),
  all_reduce, all_gather, reduce_scatter
- gdn: chunk_gated_delta, gated_delta, fused_recurrent, delta_rule, deltanet, fla (as a word),
  chunk_scaled_dot_kkt, chunk_local_cumsum, solve_tril
- mamba2: ssd (at a word start), selective_scan, selective_state, causal_conv1d, conv1d, mamba,
  chunk_scan, chunk_state, state_passing, bmm_chunk, chunk_cumsum
- attention: flash, fmha, sdpa, scaled_dot_product, attention, attn, masked_softmax
- moe: fused_moe, moe, topk, grouped_gemm, grouped_mm, expert, router

Choices worth knowing:
- An all-to-all is not MoE traffic by itself: recommenders shuffle embeddings with it (TorchRec's
  KeyedJaggedTensor all-to-all, `## all2all_data:kjt splits ##`, in the Kineto fixture), sequence
  parallelism (Ulysses) shuffles heads with it. Only an all-to-all with MoE evidence (its own name,
  its enclosing range, or an `L{i}.moe` block range) is 'moe_a2a'; any other collective is 'comm'.
  NCCL runs all-to-all as grouped send/recv (`ncclKernel_SendRecv_*`), so the kernel name alone
  never tells which collective it is: the enclosing range does.
- `selective_scan` stays 'mamba2' rather than Mamba-1's 'mamba': Mamba-2's decode step runs
  mamba_ssm's `_selective_scan_update_kernel` (selective_state_update.py), so the name does not
  tell the two apart, and hybridlm's `M` block is Mamba-2. A Mamba-1 model is attributed by its
  `L{i}.mamba` ranges instead.
- `causal_conv1d` / `conv1d` say 'mamba2' although Gated DeltaNet runs the same short convolution
  kernel; inside an `L{i}.gdn` range the range wins.
- `fla` must be a word of its own (`fla::`, `fla_`): as a substring it would match every flash
  kernel. Generic GDN-adjacent kernels (l2norm, cumsum, solve_tril) are only matched with their
  fla names.
- Plain softmax is not attention (routers and samplers run it too); only the fused masked softmax
  kernels of eager attention (Megatron's scaled_masked_softmax) are. GEMMs, norms and activations
  (silu_and_mul runs in MLPs and MoE experts alike) stay unclassified: None.
- topk also runs in samplers; in a model trace the router's topk dominates.
"""

from __future__ import annotations

import functools
import re

_ALL_TO_ALL = r"(?:all_?to_?all|all2all|(?<![a-z0-9])a2a(?![a-z]))"
_RULES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (layer_type, re.compile(pattern, re.IGNORECASE))
    for layer_type, pattern in (
        ("moe_a2a", rf"deep_?ep|(?:moe|expert).*{_ALL_TO_ALL}|{_ALL_TO_ALL}.*(?:moe|expert)"),
        ("comm", rf"nccl|{_ALL_TO_ALL}|all_?reduce|all_?gather|reduce_?scatter"),
        (
            "gdn",
            r"gated_delta|fused_recurrent|delta_?rule|deltanet|(?<![a-z])fla(?![a-z])"
            r"|chunk_scaled_dot_kkt|chunk_local_cumsum|solve_tril",
        ),
        (
            "mamba2",
            r"(?<![a-z])ssd|selective_scan|selective_state|conv1d|mamba|chunk_scan|chunk_state"
            r"|state_passing|bmm_chunk|chunk_cumsum",
        ),
        ("attention", r"flash|fmha|sdpa|scaled_dot_product|attention|attn|masked_softmax"),
        ("moe", r"moe|topk|grouped_gemm|grouped_mm|expert|router"),
    )
)

# hybridlm's block ranges: `L{index}.{layer_type}`, optionally followed by a sub-part
# (`L12.moe.router`). Written by the recorder's record_function / NVTX ranges.
_BLOCK_RANGE = re.compile(r"^L(\d+)\.([A-Za-z][A-Za-z0-9_]*)(?:[.:/\s].*)?$")


# Step ranges: torch.profiler's own `ProfilerStep#N` (schedule steps), and `hybridlm.step{N}.{phase}`,
# which a tracer can open around each step so imported kernels get hybridlm's step and phase.
_STEP_RANGE = re.compile(r"^(?:ProfilerStep#(\d+)|hybridlm\.step(\d+)\.(prefill|decode|train))$")


@functools.lru_cache(maxsize=1 << 16)  # traces repeat a few thousand names millions of times
def classify_kernel(name: str | None) -> str | None:
    """The layer type a kernel or operator name reveals, or None. See the module docstring."""
    if not name:
        return None
    for layer_type, pattern in _RULES:
        if pattern.search(name):
            return layer_type
    return None


# The rules that attribute an imported event to a layer type, in the order they are tried (see the
# module docstring); stored in events.layer_rule.
RULE_BLOCK_RANGE = "block range"
RULE_RANGE_NAME = "enclosing range name"
RULE_OWN_NAME = "own name"
RULES = (RULE_BLOCK_RANGE, RULE_RANGE_NAME, RULE_OWN_NAME)
_COLLECTIVES = ("comm", "moe_a2a")


def attribute_by_name(name: str | None, range_name: str | None) -> tuple[str | None, str | None]:
    """(layer type, rule) for an event outside any block range: the enclosing range's name first
    (rule 2), then the event's own name (rule 3); (None, None) when neither says anything."""
    around = classify_kernel(range_name)
    if around is not None:
        if around == "moe" and classify_kernel(name) in _COLLECTIVES:
            return "moe_a2a", RULE_RANGE_NAME  # a collective that an MoE range launched
        return around, RULE_RANGE_NAME
    own = classify_kernel(name)
    return (own, RULE_OWN_NAME) if own is not None else (None, None)


def parse_block_range(name: str | None) -> tuple[int, str] | None:
    """(layer, layer_type) for a hybridlm block range name like 'L12.moe', else None."""
    if not name:
        return None
    match = _BLOCK_RANGE.match(name)
    if match is None:
        return None
    return int(match.group(1)), match.group(2).lower()


def parse_step_range(name: str | None) -> tuple[int, str | None] | None:
    """(step, phase) for 'hybridlm.step3.decode', (step, None) for 'ProfilerStep#3', else None."""
    if not name:
        return None
    match = _STEP_RANGE.match(name)
    if match is None:
        return None
    if match.group(1) is not None:
        return int(match.group(1)), None
    return int(match.group(2)), match.group(3)
