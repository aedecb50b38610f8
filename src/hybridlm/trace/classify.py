"""Kernel / operator name -> layer type, for events no `L{index}.{type}` range attributes.

Name rules are the fallback: a kernel launched inside one of hybridlm's own block ranges
(`L12.moe`, see `parse_block_range`) takes that block's layer and type, whatever its name. Only a
kernel outside such ranges (a foreign trace, an unannotated region) is classified by name, and
then only to a layer type, never to a layer index.

Rules are tried in order, case-insensitively; the first match wins:

- moe_a2a: all_to_all, alltoall, all2all, a2a (as a word), deep_ep / deepep (DeepEP dispatch and
  combine)
- comm: any other nccl kernel, all_reduce, all_gather, reduce_scatter
- gdn: chunk_gated_delta, gated_delta, fused_recurrent, delta_rule, deltanet, fla (as a word),
  chunk_scaled_dot_kkt, chunk_local_cumsum, solve_tril
- mamba2: ssd (at a word start), selective_scan, selective_state, causal_conv1d, conv1d, mamba,
  chunk_scan, chunk_state, state_passing, bmm_chunk, chunk_cumsum
- attention: flash, fmha, sdpa, scaled_dot_product, attention, attn, masked_softmax
- moe: fused_moe, moe, topk, grouped_gemm, grouped_mm, expert, router

Choices worth knowing:
- NCCL all-reduce / all-gather are not MoE traffic (tensor or data parallelism), so only all-to-all
  names become 'moe_a2a'; other collectives are 'comm'. NCCL runs all-to-all as grouped send/recv,
  so its kernel is named `ncclKernel_SendRecv_*` / `ncclDevKernel_SendRecv` and classifies as
  'comm'; the importers then look at the enclosing range (`nccl:all_to_all`) to find 'moe_a2a'.
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

_RULES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (layer_type, re.compile(pattern, re.IGNORECASE))
    for layer_type, pattern in (
        ("moe_a2a", r"all_?to_?all|all2all|(?<![a-z0-9])a2a(?![a-z])|deep_?ep"),
        ("comm", r"nccl|all_?reduce|all_?gather|reduce_?scatter"),
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
