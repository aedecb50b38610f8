"""Pure tensor functions. Each fast op sits next to its plain reference (the spec) and is tested against it.

- ssd: Mamba-2 state-space duality scan (reference loop, chunked, one decode step)
- conv: causal depthwise conv1d (reference, fast, one decode step with a rolling state)
- gated_deltanet: Gated DeltaNet (reference loop, chunked WY/UT form, one decode step)
- selective_scan: Mamba-1 selective scan (reference loop, chunked, one decode step)
- moe: routing and expert dispatch (per-expert loop reference, grouped)
"""
