"""Fast ops against their plain twins, and model prefill/decode speed, side by side in one run.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_ops.py [--threads N]

Prints ratios (reference time / fast time): these machines are noisy, ratios travel better than
absolute times.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.common import interleaved_medians, median_time, print_table
from hybridlm import HybridLM, get_preset
from hybridlm.ops.conv import causal_conv1d, causal_conv1d_reference
from hybridlm.ops.gated_deltanet import gated_deltanet_chunked, gated_deltanet_reference
from hybridlm.ops.moe import moe_experts_grouped, moe_experts_reference, route
from hybridlm.ops.ssd import ssd_chunked, ssd_reference


def bench_ops() -> None:
    g = torch.Generator().manual_seed(0)
    rows = []
    with torch.no_grad():
        B, T, H, P, G, N = 1, 1024, 16, 64, 2, 64
        x = torch.randn(B, T, H, P, generator=g)
        dt = F.softplus(torch.randn(B, T, H, generator=g) - 2)
        A = -torch.rand(H, generator=g) - 0.5
        Bm, Cm = torch.randn(B, T, G, N, generator=g), torch.randn(B, T, G, N, generator=g)
        t = interleaved_medians(
            {
                "ref": lambda: ssd_reference(x, dt, A, Bm, Cm),
                "fast": lambda: ssd_chunked(x, dt, A, Bm, Cm, chunk_size=64),
            },
            repeats=3,
        )
        rows.append(["Mamba-2 SSD", f"B{B} T{T} H{H} P{P} N{N}", "sequential loop", "chunked", t["ref"], t["fast"]])

        K = V = 64
        q = F.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
        k = F.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
        v = torch.randn(B, T, H, V, generator=g)
        gd = -F.softplus(torch.randn(B, T, H, generator=g)) * 0.1
        beta = torch.rand(B, T, H, generator=g)
        t = interleaved_medians(
            {
                "ref": lambda: gated_deltanet_reference(q, k, v, gd, beta),
                "fast": lambda: gated_deltanet_chunked(q, k, v, gd, beta, chunk_size=64),
            },
            repeats=3,
        )
        rows.append(
            ["Gated DeltaNet", f"B{B} T{T} H{H} K{K} V{V}", "sequential loop", "chunked WY", t["ref"], t["fast"]]
        )

        C, W = 2048, 4
        xc = torch.randn(4, T, C, generator=g)
        w = torch.randn(C, W, generator=g)
        t = interleaved_medians(
            {"ref": lambda: causal_conv1d_reference(xc, w), "fast": lambda: causal_conv1d(xc, w)}, repeats=5
        )
        rows.append(["causal conv1d", f"B4 T{T} C{C} K{W}", "tap loop", "K shifted adds", t["ref"], t["fast"]])

        Ntok, D, E, I, Kx = 2048, 512, 16, 704, 2
        hidden = torch.randn(Ntok, D, generator=g)
        logits = torch.randn(Ntok, E, generator=g)
        ids, weights, _ = route(logits, Kx)
        up = torch.randn(E, I, D, generator=g) * 0.02
        down = torch.randn(E, D, I, generator=g) * 0.02
        t = interleaved_medians(
            {
                "ref": lambda: moe_experts_reference(hidden, ids, weights, up, down, "relu2"),
                "fast": lambda: moe_experts_grouped(hidden, ids, weights, up, down, "relu2"),
            },
            repeats=5,
        )
        rows.append(
            ["MoE experts", f"N{Ntok} D{D} E{E} I{I} top{Kx}", "per-expert loop", "grouped", t["ref"], t["fast"]]
        )
    print_table(
        ["op", "shape", "reference", "fast", "reference ms", "fast ms", "speed-up"],
        [[*r[:4], f"{r[4] * 1e3:.1f}", f"{r[5] * 1e3:.1f}", f"{r[4] / r[5]:.1f}x"] for r in rows],
    )


def bench_model() -> None:
    torch.manual_seed(0)
    model = HybridLM(get_preset("debug-small")).eval()
    rows = []
    with torch.no_grad():
        for batch, prompt in ((1, 512), (8, 128)):
            ids = torch.randint(0, 256, (batch, prompt))
            prefill = median_time(lambda ids=ids: model(ids, last_logits_only=True), repeats=3)
            cache = model.new_cache(batch, prompt + 64)
            model(ids, cache=cache)
            token = torch.zeros(batch, 1, dtype=torch.long)

            def decode(cache=cache, token=token):
                model(token, cache=cache)

            step = median_time(decode, repeats=20, warmup=2)
            rows.append([f"batch {batch}, prompt {prompt}", f"{batch * prompt / prefill:,.0f}", f"{step * 1e3:.1f}",
                         f"{batch / step:,.0f}"])  # fmt: skip
    print("\ndebug-small (101.8M params, 31.1M active), fp32:")
    print_table(["workload", "prefill tokens/s", "decode step ms", "decode tokens/s"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench_ops()
    bench_model()


if __name__ == "__main__":
    main()
