"""Where each MoE block's experts live: EPLB-style placement with redundant copies of hot experts.

Legend: E logical experts of a block, W ranks, S physical slots per rank (E / W + R redundant), P = W * S
physical slots, T MoE calls (steps) of a trace.

A placement is ``physical_to_logical``: P expert ids, slot p on rank p // S holding a copy of expert
``physical_to_logical[p]`` (the map vLLM's and SGLang's EPLB call phy2log; ``ShardedExperts`` takes it).
An expert with C copies has its tokens split evenly over them, so a rank's load is the sum over its
slots of load[e] / C[e]. ``eplb_placement`` follows the two steps of DeepSeek's EPLB, as vLLM's
``vllm/distributed/eplb/policy/default.py`` runs them without node hierarchy:

1. replicate: give each of the P - E redundant slots, one at a time, to the expert whose load per copy
   is highest now (here: never more copies than ranks, which could not help);
2. pack: place the P copies, heaviest first, each on the least-loaded rank that has a free slot (here:
   and does not hold that expert yet, when such a rank exists: two copies on one rank balance nothing).

Balancedness (vLLM's metric): mean over ranks / max over ranks of the tokens each rank computes. Here it
is taken per MoE call and summed over calls first, sum(mean) / sum(max): the share of the time the calls
wait for their slowest rank that a perfect split would need (1.0 = even; 1 / W = one rank does all).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def contiguous_placement(num_experts: int) -> list[int]:
    """The default sharding: rank r holds experts [r * E / W, (r + 1) * E / W) (expert p in slot p)."""
    return list(range(num_experts))


def eplb_placement(load_E: Sequence[float], world_size: int, redundant_per_rank: int = 1) -> list[int]:
    """physical_to_logical for ``world_size`` ranks of E / W + ``redundant_per_rank`` slots each, from the
    observed tokens per expert ``load_E`` (module docstring). Deterministic: ties go to the lower id."""
    load_E = np.asarray(load_E, dtype=np.float64)
    num_experts = len(load_E)
    check_placement_size(num_experts, world_size, redundant_per_rank)
    slots_per_rank = num_experts // world_size + redundant_per_rank
    copies_E = replicate_hot_experts(load_E, world_size * slots_per_rank, max_copies=world_size)
    return pack_copies(load_E, copies_E, world_size, slots_per_rank)


def check_placement_size(num_experts: int, world_size: int, redundant_per_rank: int) -> None:
    if world_size < 1 or num_experts % world_size:
        raise ValueError(
            f"{num_experts} experts do not divide over {world_size} ranks: use a world size that divides {num_experts}"
        )
    most = num_experts - num_experts // world_size
    if not 0 <= redundant_per_rank <= most:
        raise ValueError(
            f"--redundant-experts {redundant_per_rank}: give 0 to {most} (a rank holds each of the "
            f"{num_experts} experts at most once)"
        )


def replicate_hot_experts(load_E: np.ndarray, num_physical: int, max_copies: int) -> np.ndarray:
    """[E] copies per expert, summing to ``num_physical``: each extra copy goes to the expert with the
    highest load per copy among those with fewer than ``max_copies``."""
    copies_E = np.ones(len(load_E), dtype=np.int64)
    for _ in range(num_physical - len(load_E)):
        per_copy_E = np.where(copies_E < max_copies, load_E / copies_E, -np.inf)
        copies_E[int(np.argmax(per_copy_E))] += 1
    return copies_E


def pack_copies(load_E: np.ndarray, copies_E: np.ndarray, world_size: int, slots_per_rank: int) -> list[int]:
    """physical_to_logical: every copy (load[e] / copies[e] each), heaviest first, on the least-loaded rank
    with a free slot that does not hold its expert yet (any rank with a free slot if none is left).
    Within a rank the slots are ordered by expert id."""
    per_copy_E = load_E / copies_E
    copies = sorted(((e for e in range(len(load_E)) for _ in range(copies_E[e]))), key=lambda e: -per_copy_E[e])
    rank_load = np.zeros(world_size)
    held: list[list[int]] = [[] for _ in range(world_size)]
    for expert in copies:
        free = [r for r in range(world_size) if len(held[r]) < slots_per_rank]
        fresh = [r for r in free if expert not in held[r]] or free
        rank = min(fresh, key=lambda r: (rank_load[r], r))
        held[rank].append(expert)
        rank_load[rank] += per_copy_E[expert]
    return [expert for rank in range(world_size) for expert in sorted(held[rank])]


def rank_loads(load_TE: np.ndarray, physical_to_logical: Sequence[int], world_size: int) -> np.ndarray:
    """[T, W] tokens each rank computes per call, each expert's tokens split evenly over its copies."""
    load_TE = np.atleast_2d(np.asarray(load_TE, dtype=np.float64))
    slots = np.asarray(physical_to_logical)
    copies_E = np.bincount(slots, minlength=load_TE.shape[1])
    per_slot_TP = load_TE[:, slots] / copies_E[slots]
    return per_slot_TP.reshape(load_TE.shape[0], world_size, -1).sum(axis=2)


def balancedness(rank_load_TW: np.ndarray) -> float:
    """sum over calls of the mean tokens per rank / sum over calls of the max (module docstring); 1.0
    when no call has tokens."""
    rank_load_TW = np.atleast_2d(np.asarray(rank_load_TW, dtype=np.float64))
    most = rank_load_TW.max(axis=1).sum()
    return float(rank_load_TW.mean(axis=1).sum() / most) if most > 0 else 1.0
