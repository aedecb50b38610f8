"""What this machine can do at best, and what a model's decode step and prefill must do, for bench_decode.

Machine (measured with torch on the threads this process uses, best of several runs):
- copy bandwidth: a tensor copied, bytes read + written per second;
- read bandwidth: a tensor summed;
- fp32 GEMV bandwidth: the best of torch's built-in matrix-vector products (``F.linear`` on one row,
  ``torch.mv``) over decode-shaped matrices, one pass over each;
- SGEMM rate: GFLOP/s of prefill-shaped matmuls.
The bandwidths are measured on ``uncached_bytes()`` of data, so that no cache holds it: 256 MiB, or twice
the last-level cache where that is larger (a 2-core VM here had a 480 MiB L3, which held 256 MiB: its
"GEMV bandwidth" read 29-33 GB/s from cache against 18-19 from memory). A decode benchmark that runs two
copies of a model in turn reads its weights from memory; ``gemv_cached_bytes_per_s`` keeps the cached
figure for comparison.

Model (from a built ``HybridLM``, counting its parameter tensors, not its config formulas):
- decode: bytes of weights one step reads = every weight except the input embedding (whose few rows
  read are negligible) and the routed experts, plus the routed experts the step touches;
- prefill: FLOPs = 2 x weights used per token x tokens (every weight tensor of 2+ dims is a
  multiply-add per token; norms, biases and per-head scalars are elementwise work and left out), the
  LM head on the last position only, causal attention QK^T and PV, and the chunked Mamba-2 SSD /
  Gated DeltaNet / selective-scan work.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hybridlm.config import HybridConfig

MIB = 2**20
# Decode-like GEMV shapes (an LM head and a wide projection), repeated up to the measured size.
GEMV_SHAPES = ((32000, 512), (4096, 4096))
CACHE_DIR = Path("/sys/devices/system/cpu/cpu0/cache")


def last_level_cache_bytes() -> int:
    """The largest CPU cache of this machine as sysfs reports it ("491520K"); 0 where it does not."""
    sizes = []
    for entry in CACHE_DIR.glob("index*/size"):
        text = entry.read_text().strip()
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        if text[:-1].isdigit() and text[-1] in units:
            sizes.append(int(text[:-1]) * units[text[-1]])
    return max(sizes, default=0)


def uncached_bytes() -> int:
    """A working set no cache holds: 256 MiB, or twice the last-level cache where that is larger."""
    return max(256 * MIB, 2 * last_level_cache_bytes())


# Prefill-like SGEMM shapes (M, K, N): 512 tokens through a 2048-wide layer, and a 512-wide one.
SGEMM_SHAPES = ((512, 2048, 2048), (2048, 512, 2048))


def best_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Fastest wall seconds of ``fn()`` over ``repeats`` calls after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def copy_bandwidth(num_bytes: int, repeats: int = 5) -> float:
    """Bytes read + written per second copying one fp32 tensor of ``num_bytes`` into another."""
    source = torch.rand(num_bytes // 4)
    destination = torch.empty_like(source)
    seconds = best_seconds(lambda: destination.copy_(source), repeats)
    return 2 * num_bytes / seconds


def read_bandwidth(num_bytes: int, repeats: int = 5) -> float:
    """Bytes read per second summing one fp32 tensor of ``num_bytes``."""
    source = torch.rand(num_bytes // 4)
    return num_bytes / best_seconds(source.sum, repeats)


def gemv_bandwidth(
    num_bytes: int, shapes: Sequence[tuple[int, int]] = GEMV_SHAPES, repeats: int = 5
) -> dict[str, float]:
    """Matrix bytes read per second by each built-in fp32 GEMV, one pass over [N, K] matrices of ``shapes``
    (taken in turn) adding up to at least ``num_bytes``."""
    generator = torch.Generator().manual_seed(0)
    matrices: list[Tensor] = []
    while sum(m.numel() * 4 for m in matrices) < num_bytes:
        n, k = shapes[len(matrices) % len(shapes)]
        matrices.append(torch.empty(n, k).uniform_(-1, 1, generator=generator))
    rows = [torch.randn(1, m.shape[1], generator=generator) for m in matrices]  # x [1, K]
    num_bytes = sum(m.numel() * m.element_size() for m in matrices)

    def linear_pass() -> None:
        for m, x in zip(matrices, rows, strict=True):
            F.linear(x, m)  # [1, K] @ [N, K]^T, what nn.Linear runs for one token

    def mv_pass() -> None:
        for m, x in zip(matrices, rows, strict=True):
            torch.mv(m, x[0])

    with torch.inference_mode():
        return {
            "F.linear": num_bytes / best_seconds(linear_pass, repeats),
            "torch.mv": num_bytes / best_seconds(mv_pass, repeats),
        }


def sgemm_rate(shapes: Sequence[tuple[int, int, int]] = SGEMM_SHAPES, repeats: int = 5) -> dict[str, float]:
    """FLOP/s of an fp32 [M, K] x [K, N] matmul, per shape "MxKxN"."""
    generator = torch.Generator().manual_seed(0)
    rates = {}
    with torch.inference_mode():
        for m, k, n in shapes:
            a, b = torch.randn(m, k, generator=generator), torch.randn(k, n, generator=generator)
            rates[f"{m}x{k}x{n}"] = 2 * m * k * n / best_seconds(lambda a=a, b=b: a @ b, repeats)
    return rates


@dataclass
class Machine:
    """Measured ceilings; bandwidths in bytes/s, the SGEMM rate in FLOP/s."""

    threads: int
    measured_bytes: int  # the working set of the bandwidth measurements (uncached_bytes())
    copy_bytes_per_s: float
    read_bytes_per_s: float
    gemv_bytes_per_s: float  # the best of gemv_by_method
    gemv_by_method: dict[str, float]
    gemv_cached_bytes_per_s: float  # the same GEMVs over 64 MiB, which the last-level cache may hold
    sgemm_flops_per_s: float  # the best of sgemm_by_shape
    sgemm_by_shape: dict[str, float]

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"machine ({self.threads} threads; bandwidths over {self.measured_bytes / MIB:,.0f} MiB): "
            f"copy {self.copy_bytes_per_s / 1e9:.1f} GB/s (read+write), "
            f"read {self.read_bytes_per_s / 1e9:.1f} GB/s, fp32 GEMV {self.gemv_bytes_per_s / 1e9:.1f} GB/s "
            f"({', '.join(f'{k} {v / 1e9:.1f}' for k, v in self.gemv_by_method.items())}; "
            f"{self.gemv_cached_bytes_per_s / 1e9:.1f} over 64 MiB), "
            f"SGEMM {self.sgemm_flops_per_s / 1e9:.0f} GFLOP/s "
            f"({', '.join(f'{k} {v / 1e9:.0f}' for k, v in self.sgemm_by_shape.items())})"
        )


def measure_machine(repeats: int = 5) -> Machine:
    size = uncached_bytes()
    gemv = gemv_bandwidth(size, repeats=repeats)
    sgemm = sgemm_rate(repeats=repeats)
    return Machine(
        threads=torch.get_num_threads(),
        measured_bytes=size,
        copy_bytes_per_s=copy_bandwidth(size, repeats=repeats),
        read_bytes_per_s=read_bandwidth(size, repeats=repeats),
        gemv_bytes_per_s=max(gemv.values()),
        gemv_by_method=gemv,
        gemv_cached_bytes_per_s=max(gemv_bandwidth(64 * MIB, repeats=repeats).values()),
        sgemm_flops_per_s=max(sgemm.values()),
        sgemm_by_shape=sgemm,
    )


def best_of(machines: Sequence[Machine]) -> Machine:
    """Each ceiling at the best any measurement saw (a busy moment only ever lowers a measurement)."""

    def best_by_key(dicts: list[dict[str, float]]) -> dict[str, float]:
        return {key: max(d[key] for d in dicts) for key in dicts[0]}

    gemv = best_by_key([m.gemv_by_method for m in machines])
    sgemm = best_by_key([m.sgemm_by_shape for m in machines])
    return Machine(
        threads=machines[0].threads,
        measured_bytes=machines[0].measured_bytes,
        copy_bytes_per_s=max(m.copy_bytes_per_s for m in machines),
        read_bytes_per_s=max(m.read_bytes_per_s for m in machines),
        gemv_bytes_per_s=max(gemv.values()),
        gemv_by_method=gemv,
        gemv_cached_bytes_per_s=max(m.gemv_cached_bytes_per_s for m in machines),
        sgemm_flops_per_s=max(sgemm.values()),
        sgemm_by_shape=sgemm,
    )


# ----------------------------------------------------------------------------------------------
# What the model must read (decode) and compute (prefill)


@dataclass
class WeightCounts:
    """A model's weights as the roofline sees them (element counts, and bytes per element).

    ``dense`` is every weight a token always uses: all parameters except the input embedding and the
    routed experts (the LM head is in, even when tied to the embedding). ``dense_matmul`` is the part
    of it that is a multiply-add per token (tensors of 2+ dims) without the LM head. ``per_expert``
    holds, for each MoE block in order, the elements of one routed expert.
    """

    dense: int
    dense_matmul: int
    lm_head: int
    per_expert: list[int]
    num_experts: int
    experts_per_token: int
    bytes_per_element: int

    def decode_bytes(self, experts_touched: Sequence[float] | float) -> float:
        """Bytes of weights one decode step reads when each MoE block touches ``experts_touched`` experts
        (one number for all blocks, or one per block)."""
        touched = _per_block(experts_touched, len(self.per_expert))
        expert_elements = sum(size * n for size, n in zip(self.per_expert, touched, strict=True))
        return (self.dense + expert_elements) * self.bytes_per_element

    def to_dict(self) -> dict:
        return asdict(self)


def _per_block(value: Sequence[float] | float, num_blocks: int) -> list[float]:
    if isinstance(value, int | float):
        return [float(value)] * num_blocks
    if len(value) != num_blocks:
        raise ValueError(f"expected {num_blocks} per-block expert counts, got {len(value)}")
    return [float(v) for v in value]


def weight_counts(model: nn.Module) -> WeightCounts:
    """Count a ``HybridLM``'s weights: routed experts are the [E, ...] tensors of its expert-routing blocks."""
    config: HybridConfig = model.config
    embedding = model.embeddings.weight
    lm_head = model.lm_head.weight
    is_tied = lm_head is embedding
    moe = config.moe
    num_experts = moe.num_experts if moe is not None else 0
    routed_ids: set[int] = set()
    per_expert: list[int] = []
    for block in model.layers:
        if not block.routes_experts:
            continue
        routed = [p for p in block.parameters() if p.dim() == 3 and p.shape[0] == num_experts]
        if not routed:
            raise ValueError(f"block {block.index} routes experts but holds no [{num_experts}, ...] tensors")
        routed_ids.update(id(p) for p in routed)
        per_expert.append(sum(p.numel() for p in routed) // num_experts)

    dense = dense_matmul = 0
    for p in {id(p): p for p in model.parameters()}.values():
        if id(p) in routed_ids or (p is embedding and not is_tied):
            continue
        dense += p.numel()
        if p.dim() >= 2 and p is not lm_head:
            dense_matmul += p.numel()
    return WeightCounts(
        dense=dense,
        dense_matmul=dense_matmul,
        lm_head=lm_head.numel(),
        per_expert=per_expert,
        num_experts=num_experts,
        experts_per_token=moe.num_experts_per_tok if moe is not None else 0,
        bytes_per_element=embedding.element_size(),
    )


def expected_distinct_experts(num_experts: int, experts_per_token: int, num_tokens: int) -> float:
    """Distinct experts ``num_tokens`` tokens touch when each picks ``experts_per_token`` uniformly:
    E * (1 - (1 - k/E)^N). Exact at N = 1 (k); an estimate otherwise (real routers are not uniform)."""
    if num_experts == 0:
        return 0.0
    return num_experts * (1 - (1 - experts_per_token / num_experts) ** num_tokens)


@dataclass
class PrefillFlops:
    """FLOPs of one prefill of ``batch_size`` x ``num_tokens``, by kind."""

    weights: int  # 2 x weights used per token x tokens, the LM head excluded
    lm_head: int  # the last position of each sequence only
    attention: int  # causal QK^T and PV
    scan: int  # Mamba-2 SSD, Gated DeltaNet, Mamba-1 selective scan

    @property
    def total(self) -> int:
        return self.weights + self.lm_head + self.attention + self.scan

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def prefill_flops(model: nn.Module, num_tokens: int, batch_size: int = 1) -> PrefillFlops:
    """FLOPs a prefill must do, its logits for the last position only (as both benchmarks ask)."""
    counts = weight_counts(model)
    config: HybridConfig = model.config
    routed = counts.experts_per_token * sum(counts.per_expert)
    tokens = batch_size * num_tokens
    attention = scan = 0
    for char in config.pattern:
        if char in "*P":
            attention += causal_attention_flops(config, num_tokens)
        if char in "MP":
            scan += ssd_flops(config, num_tokens)
        if char == "G":
            scan += gated_deltanet_flops(config, num_tokens)
        if char == "m":
            scan += selective_scan_flops(config, num_tokens)
    return PrefillFlops(
        weights=2 * tokens * (counts.dense_matmul + routed),
        lm_head=2 * batch_size * counts.lm_head,
        attention=batch_size * attention,
        scan=batch_size * scan,
    )


def causal_attention_flops(config: HybridConfig, num_tokens: int) -> int:
    """QK^T and PV of one sequence over the T(T+1)/2 causal query-key pairs, every query head."""
    a = config.attention
    pairs = num_tokens * (num_tokens + 1) // 2
    return 4 * a.num_heads * a.head_dim * pairs


def ssd_flops(config: HybridConfig, num_tokens: int) -> int:
    """Chunked Mamba-2 SSD (Dao & Gu 2024, sec. 6; mamba ``ssd_minimal``) of one sequence, chunk Q.

    Per token: C B^T within its chunk (2 Q N per group), those scores times x (2 Q P per head), its
    contribution to the chunk state (2 N P per head), the state read back into the output (2 N P per
    head); per chunk, the state passed on (2 N P per head). Chunks are counted as full Q x Q blocks,
    as the chunked algorithm computes them.
    """
    c = config.mamba2
    Q = min(c.chunk_size, num_tokens)
    H, P, N, G = c.num_heads, c.head_dim, c.state_size, c.num_groups
    num_chunks = -(-num_tokens // Q)
    per_token = 2 * Q * N * G + 2 * Q * P * H + 4 * N * P * H
    return num_tokens * per_token + num_chunks * 2 * N * P * H


def gated_deltanet_flops(config: HybridConfig, num_tokens: int) -> int:
    """Chunked Gated DeltaNet (Yang et al. 2024, the WY form of fla's ``chunk_gated_delta_rule``), chunk C.

    Per token and value head: K K^T within the chunk (2 C K), the triangular inverse (C^2/3 per
    token, C^3/3 per chunk), w = T(beta k) and u = T(beta v) (2 C K + 2 C V), v_new = u - w S
    (2 K V), q S (2 K V), q k^T within the chunk (2 C K) times v_new (2 C V), the state update
    k^T v_new (2 K V).
    """
    c = config.gdn
    C = min(c.chunk_size, num_tokens)
    K, V = c.key_head_dim, c.value_head_dim
    per_token_head = 6 * C * K + 4 * C * V + C * C // 3 + 6 * K * V
    return num_tokens * c.num_value_heads * per_token_head


def selective_scan_flops(config: HybridConfig, num_tokens: int) -> int:
    """Mamba-1 selective scan: per token, channel and state, exp(dt A), dt B x, h = a h + b, y += C h."""
    c = config.mamba
    return num_tokens * 8 * c.intermediate_size * c.state_size


def state_bytes_per_step(model: nn.Module, batch_size: int) -> int:
    """Recurrent + conv state bytes a decode step reads and writes back (KV reads, small here, left out)."""
    from hybridlm.accounting import cache_bytes

    cache = cache_bytes(model.config, batch_size, 1, model.embeddings.weight.dtype)
    return 2 * (cache.conv + cache.recurrent)


def decode_roofline_tokens_per_s(weight_bytes: float, batch_size: int, gemv_bytes_per_s: float) -> float:
    return batch_size * gemv_bytes_per_s / weight_bytes


def prefill_roofline_tokens_per_s(flops: PrefillFlops, num_tokens: int, sgemm_flops_per_s: float) -> float:
    return num_tokens * sgemm_flops_per_s / flops.total


def generate_roofline_seconds(
    model: nn.Module, machine: Machine, prompt_len: int, new_tokens: int, batch_size: int = 1
) -> float:
    """Best-case wall seconds of prompt + ``new_tokens`` greedy tokens: the prefill at the slower of its
    SGEMM time and its weight-read time (a short prompt is bandwidth-bound; its experts touched taken
    as uniform), then ``new_tokens - 1`` decode steps at the GEMV bandwidth."""
    counts = weight_counts(model)
    prefill_experts = expected_distinct_experts(counts.num_experts, counts.experts_per_token, batch_size * prompt_len)
    prefill = max(
        prefill_flops(model, prompt_len, batch_size).total / machine.sgemm_flops_per_s,
        counts.decode_bytes(prefill_experts) / machine.gemv_bytes_per_s,
    )
    step_experts = expected_distinct_experts(counts.num_experts, counts.experts_per_token, batch_size)
    step = counts.decode_bytes(step_experts) / machine.gemv_bytes_per_s
    return prefill + (new_tokens - 1) * step
