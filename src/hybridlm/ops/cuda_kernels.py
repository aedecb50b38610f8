"""Other projects' CUDA kernels for the chunked scans, each used only after it has matched the plain
reference on a small input on that device (once per device, at first use), else the torch path.

- ``ssd(device)``: mamba_ssm's Triton SSD (``mamba_chunk_scan_combined``) in place of ``ssd_chunked``;
- ``gated_delta(device)``: flash-linear-attention's ``chunk_gated_delta_rule`` (pip ``fla-core``) in place
  of ``gated_deltanet_chunked``.

Each returns a function with the contract of the torch function it replaces, or None: off CUDA, while
autograd records (their gradients are not checked here), where the package is missing (logged), or where
the kernel did not match the reference (a warning naming the difference). The check runs in fp32. The
torch forms stay the twins; tests/ops/test_cuda_kernels.py holds the selection and the checks to them on
CPU. Not yet run on a GPU: no session so far had one; a broken adapter can only make the check fail,
never a wrong result.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from hybridlm.ops.gated_deltanet import gated_deltanet_reference
from hybridlm.ops.ssd import ssd_reference

logger = logging.getLogger(__name__)

ScanFn = Callable[..., tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class FastKernel:
    name: str
    load: Callable[[], ScanFn]  # imports the package; ImportError where it is missing
    reference: ScanFn  # the plain loop it must match
    example: Callable[[torch.device], tuple[tuple, dict]]  # small inputs (args, kwargs) on a device
    tolerance: float  # max |difference| allowed, relative to the reference's largest |value|, output and state


_verdicts: dict[tuple[str, str], ScanFn | None] = {}
_lock = threading.Lock()


def fast_kernel(kernel: FastKernel, device: torch.device, device_types: tuple[str, ...] = ("cuda",)) -> ScanFn | None:
    """``kernel``'s function where it applies on ``device`` and matched the reference there, else None."""
    if device.type not in device_types or torch.is_grad_enabled():
        return None
    key = (kernel.name, str(device))
    with _lock:
        if key not in _verdicts:
            _verdicts[key] = _verify(kernel, device)
        return _verdicts[key]


def chosen() -> dict[str, bool]:
    """ "KERNEL on DEVICE" -> whether that kernel was checked and is in use there, for every one asked so far."""
    with _lock:
        return {f"{name} on {device}": function is not None for (name, device), function in _verdicts.items()}


def _verify(kernel: FastKernel, device: torch.device) -> ScanFn | None:
    try:
        fn = kernel.load()
    except ImportError as error:
        logger.info("%s not installed (%s): the torch path runs on %s", kernel.name, error, device)
        return None
    try:
        args, kwargs = kernel.example(device)
        got, want = fn(*args, **kwargs), kernel.reference(*args)
        for what, g, w in zip(("output", "final state"), got, want, strict=True):
            if g.shape != w.shape:
                raise ValueError(f"{what} shaped {list(g.shape)}, the reference's {list(w.shape)}")
            scale = w.float().abs().max().item()
            difference = (g.float() - w.float()).abs().max().item() / scale
            if not difference <= kernel.tolerance:  # NaN fails too
                raise ValueError(
                    f"{what} differs from the plain reference by {difference:.2e} of its largest value "
                    f"(allowed {kernel.tolerance:g})"
                )
    except Exception as error:  # any failure of a foreign kernel means: do not use it
        warnings.warn(
            f"hybridlm: {kernel.name} not used on {device} ({type(error).__name__}: {error}); the torch path runs",
            RuntimeWarning,
            stacklevel=4,
        )
        return None
    logger.info("%s matched the plain reference on %s: used", kernel.name, device)
    return fn


# -- the kernels --------------------------------------------------------------------------------------------


def _load_mamba_ssd() -> ScanFn:
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    def ssd(x, dt, A, B, C, D=None, initial_state=None, chunk_size=256):  # ssd_chunked's arguments
        return mamba_chunk_scan_combined(
            x, dt, A, B, C, chunk_size, D=D, initial_states=initial_state, return_final_states=True
        )

    return ssd


def _ssd_example(device: torch.device) -> tuple[tuple, dict]:
    """2 sequences of 100 tokens (not a whole number of chunks), 4 heads of 16 in 2 groups, state 16."""
    g = torch.Generator().manual_seed(0)
    batch, T, H, P, G, N = 2, 100, 4, 16, 2, 16
    x = torch.randn(batch, T, H, P, generator=g)
    dt = F.softplus(torch.randn(batch, T, H, generator=g)) * 0.5
    A = -torch.exp(torch.randn(H, generator=g) * 0.5)
    B, C = torch.randn(batch, T, G, N, generator=g), torch.randn(batch, T, G, N, generator=g)
    D, state = torch.randn(H, generator=g), torch.randn(batch, H, P, N, generator=g)
    args = tuple(t.to(device) for t in (x, dt, A, B, C, D, state))
    return args, {"chunk_size": 32}


def _load_fla_gated_delta() -> ScanFn:
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    def gated_delta(q, k, v, g, beta, initial_state=None, scale=None, chunk_size=64):  # gated_deltanet_chunked's
        return chunk_gated_delta_rule(
            q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=True
        )  # fla's chunk size is its own

    return gated_delta


def _gated_delta_example(device: torch.device) -> tuple[tuple, dict]:
    """2 sequences of 100 tokens, 4 heads, keys 32 wide (L2-normalised), values 16, a carried state."""
    gen = torch.Generator().manual_seed(0)
    batch, T, H, K, V = 2, 100, 4, 32, 16
    q = F.normalize(torch.randn(batch, T, H, K, generator=gen), dim=-1)
    k = F.normalize(torch.randn(batch, T, H, K, generator=gen), dim=-1)
    v = torch.randn(batch, T, H, V, generator=gen)
    g = -F.softplus(torch.randn(batch, T, H, generator=gen))
    beta = torch.sigmoid(torch.randn(batch, T, H, generator=gen))
    state = torch.randn(batch, H, K, V, generator=gen) * 0.1
    return tuple(t.to(device) for t in (q, k, v, g, beta, state)), {"chunk_size": 64}


# fp32 scans of 100 tokens: the torch chunked forms match the loops to <1e-5 of the largest value here
# (tests/ops/test_cuda_kernels.py); 1e-3 leaves room for another summation order or TF32 in a GPU kernel and
# still refuses an output off by 1%. Provisional until measured on a GPU.
SSD = FastKernel("mamba_ssm SSD", _load_mamba_ssd, ssd_reference, _ssd_example, 1e-3)
GATED_DELTA = FastKernel(
    "flash-linear-attention gated delta rule",
    _load_fla_gated_delta,
    gated_deltanet_reference,
    _gated_delta_example,
    1e-3,
)


def ssd(device: torch.device) -> ScanFn | None:
    """mamba_ssm's SSD for inputs on ``device`` where it applies and matched ``ssd_reference`` there."""
    return fast_kernel(SSD, device)


def gated_delta(device: torch.device) -> ScanFn | None:
    """fla's chunked gated delta rule for ``device`` where it applies and matched the reference there."""
    return fast_kernel(GATED_DELTA, device)
