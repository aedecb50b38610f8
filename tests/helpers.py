"""Shared test helpers."""

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from hybridlm.config import HybridConfig
from hybridlm.presets import get_preset


def tiny_config(pattern: str = "MEGm*-EM", **overrides) -> HybridConfig:
    """debug-tiny with another pattern: every sub-config present, so any pattern is valid."""
    return get_preset("debug-tiny", pattern=pattern, **overrides)


def run_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, clean_env: bool = False, **kwargs
) -> subprocess.CompletedProcess:
    """The real ``hybridlm`` command (``python -m hybridlm``) in a subprocess, as a user runs it.

    Progress bars off and no inherited HYBRIDLM_DEBUG, so stderr holds exactly what a user's error would.
    ``clean_env`` also drops the caller's OMP_* / GOMP_* settings (for tests of the threading setup).
    """
    base = {k: v for k, v in os.environ.items() if k != "HYBRIDLM_DEBUG"}
    if clean_env:
        base = {k: v for k, v in base.items() if not k.startswith(("OMP_", "GOMP_", "HYBRIDLM_"))}
    command = [sys.executable, "-m", "hybridlm", *args]
    environment = {**base, "HYBRIDLM_PROGRESS": "0", **(env or {})}
    kwargs.setdefault("timeout", 300)
    return subprocess.run(command, capture_output=True, text=True, check=False, cwd=cwd, env=environment, **kwargs)


def gpt2_byte_symbols() -> list[str]:
    """GPT-2's bytes_to_unicode table (byte-level BPE), written out from its definition: byte b is shown as
    symbol [b] in a tokenizer.json's vocab."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = [], 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


# Default relative tolerance by the dtype of the result under test. float32 and float64: about 100 units of
# rounding (eps 1.2e-7 and 2.2e-16); the largest errors measured over tests/ops and tests/layers are 3.5e-6
# (float32, the rotary tables) and 3.5e-16 (float64), so an accidental float32 path in a float64 layer
# (errors ~1e-7) fails. float16 and bfloat16: one rounding step (eps) of the largest entry, for results
# computed in float32 and rounded once.
RTOL = {
    torch.float64: 2e-14,
    torch.float32: 1e-5,
    torch.float16: torch.finfo(torch.float16).eps,
    torch.bfloat16: torch.finfo(torch.bfloat16).eps,
}


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    rtol: float | None = None,
    *,
    name: str = "tensor",
    scale: float | None = None,
) -> None:
    """|actual - expected| <= rtol * (|expected| + scale) everywhere, scale defaulting to max |expected|.

    The ``scale`` term makes the error relative to the reference's magnitude: near-zero entries of a
    sum that cancels are held to the error of its largest entries, not to their own tiny size. Pass
    ``scale`` when a whole family of tensors shares one magnitude (gradients with structural zeros).
    ``rtol`` defaults by ``actual``'s dtype (RTOL). The comparison runs in float64, so a float64 truth
    may check a float32 result; otherwise the dtypes must match. Non-finite entries must be equal
    infinities; a NaN anywhere fails. The message names ``name`` and reports the max abs and rel error.
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    if actual.dtype != expected.dtype and expected.dtype != torch.float64:
        raise AssertionError(f"{name}: dtype {actual.dtype}, expected {expected.dtype}")
    rtol = RTOL[actual.dtype] if rtol is None else rtol
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    if a.isnan().any() or e.isnan().any():
        raise AssertionError(f"{name}: NaN in {'actual' if a.isnan().any() else 'expected'}")
    infinite = a.isinf() | e.isinf()
    if not torch.equal(a[infinite], e[infinite]):
        raise AssertionError(f"{name}: infinities differ at {infinite.nonzero()[:5].tolist()}")
    a, e = a[~infinite], e[~infinite]
    if e.numel() == 0:
        return
    if scale is None:
        scale = e.abs().max().item()
    error = (a - e).abs()
    bound = rtol * (e.abs() + scale)
    failing = error > bound
    if failing.any():
        worst = int(error.argmax())
        relative = (error / (e.abs() + scale)).max().item() if scale > 0 else float("inf")
        raise AssertionError(
            f"{name}: {int(failing.sum())} of {e.numel()} entries off by more than rtol {rtol:.1e} x "
            f"(|expected| + {scale:.3g}); max abs error {error.max().item():.3e} "
            f"(actual {a[worst].item():.6g}, expected {e[worst].item():.6g}), max rel error {relative:.3e}"
        )


def fixtures_dir() -> Path:
    """The real-trace fixtures kept in the repository: tests/fixtures, beside this file."""
    return Path(__file__).resolve().parent / "fixtures"


FIXTURES = fixtures_dir()


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch (and the kernels' pool, which follows it) on ``count`` threads inside the block; the suite
    runs on one (conftest.py), so code shared out over threads is tested inside this."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
