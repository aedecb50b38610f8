"""CPU kernels for decoding and prefill (native.c), compiled at first use, with torch as the fallback.

Decoding multiplies 1-16 token rows by weights that stream from memory. On CPU, torch's BLAS
reaches a fraction of the memory bandwidth on these shapes (a [32000, 512] GEMV at ~10 GB/s where
a plain read of the same bytes runs at ~25 GB/s per core, and 2-8 rows slower still), and a
recurrent step written as torch ops reads and writes the whole state several times. So:

- ``linear``, ``linear_many``, ``expert_linear``: few-row products that read each weight once
  (twins: ``F.linear``, ``F.linear`` per weight then ``torch.cat``, ``expert_linear_reference``);
  ``linear_many`` fuses the projections of one input (q/k/v; router, shared-expert gate and up)
  into one call without moving the weights; above ``MAX_ROWS`` rows (prefill) it runs as tiles of
  torch's own MKL ``sgemm_`` on the pool, as ``expert_matmuls`` does (``fuses_projections`` says which);
- ``rms_norm``, ``l2_normalize``: RMSNorm (group-wise, gated or not) and L2 normalisation in one
  call, decoding and prefill (twins: the torch code of ``hybridlm.layers.norm`` and
  ``gated_deltanet.l2_normalize``, which call them for fp32 inputs without autograd);
- ``moe_block``: a whole MoE block's routing, routed experts and the shared expert's addition in one
  call: a few tokens each chosen expert streamed once, a prompt's rows grouped by expert and both
  projections as tiles (twin: ``hybridlm.ops.moe.route`` then ``moe_experts_reference``);
- ``swiglu``, ``combine``: prefill's elementwise passes of the MLP and MoE blocks (twins:
  ``F.silu(gate) * up``, the weighted sum of each token's expert rows);
- ``expert_matmuls``: prefill's routed-expert products with their activation, tiles of one expert's
  rows x 256 columns handed to whichever pool thread is free, each a single-threaded call of torch's
  own MKL ``sgemm_`` with MKL's per-thread count set to 1 (twins: per-expert ``F.linear`` and the
  activation, as ``moe_experts_reference``);
- ``causal_conv_``: the short causal convolution over a step or a prompt, state rolled in place
  (twins: ``causal_conv1d_step``, ``causal_conv1d``);
- ``mamba2_scan_``, ``gated_delta_scan_``: the Mamba-2 (from the mixer's projections) and Gated
  DeltaNet recurrences token by token, the state updated in place and kept in cache: the decode
  step (one token) and prefill (twins: ``ssd_reference`` / ``ssd_step``, ``gated_deltanet_reference`` /
  ``gated_deltanet_step``). In prefill they replace the chunked forms, whose many small batched
  matmuls, concatenations and copies ran at a tenth of their FLOP count's matmul time here.

The kernels share their work out on native.c's own worker pool, not OpenMP's: under
``OMP_WAIT_POLICY=PASSIVE`` OpenMP puts its threads to sleep after every parallel region, and waking
one cost ~100 us on a 2-core KVM guest, more than most decode kernels take (a qwen3_next-shaped batch-1
step: 15.5 -> 10.7 ms). The pool's workers spin between tasks for ``HYBRIDLM_SPIN_US`` (default 1000)
microseconds, yielding their core to any other runnable thread, then sleep (``HYBRIDLM_SPIN_US=0``: sleep
at once). Prefill's kernels claim their work in chunks, so a worker still waking up is not waited for.

Each runs the kernel when it applies (CPU, fp32, contiguous, no autograd, within the size limits)
and its twin otherwise; tests/ops/test_native.py holds every pair to each other.

The library is built once per machine and source version with the system C compiler (``$CC``, else
``cc``) into ``$HYBRIDLM_CACHE_DIR`` (default ``~/.cache/hybridlm``), written beside its final
name and renamed into place. ``HYBRIDLM_NATIVE=0`` turns it off; without a compiler, or when the
build fails (a warning says why), everything runs on torch alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from hybridlm.ops.conv import causal_conv1d, causal_conv1d_step

SOURCE = Path(__file__).with_name("native.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-pthread", "-shared", "-fPIC")
MAX_ROWS = 64  # token rows per call (the kernel's limit; decode batches are far smaller)
MAX_EXPERT_ROWS = 256  # (token, expert) pairs per expert_linear call
MAX_EXPERTS = 1024


def cache_dir() -> Path:
    root = os.environ.get("HYBRIDLM_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hybridlm"


@functools.cache
def _cpuinfo() -> tuple[str, ...]:
    """The lines of /proc/cpuinfo; none where there is no such file."""
    try:
        return tuple(Path("/proc/cpuinfo").read_text().splitlines())
    except OSError:
        return ()


def _cpu_vendor() -> str:
    return next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("vendor_id")), "")


def _tuning_flags() -> tuple[str, ...]:
    """The weight-streaming loop's software prefetch, as measured per CPU vendor (native.c's header).

    AMD EPYC (the source's defaults): non-temporal, 8 KB ahead, from 4 token rows on (+20-25% at 8 rows).
    Intel Xeon (and elsewhere): those halved the 8-row rate (8.7 GB/s on 1 GB of cycled weights); into
    every cache level, 3 KB ahead, at every row count: 16.8 GB/s at 8 rows, 19.8 at 1 (18.6 before).
    """
    if _cpu_vendor() == "AuthenticAMD":
        return ()
    return ("-DPREFETCH_AHEAD=768", "-DPREFETCH_LOCALITY=3", "-DPREFETCH_MIN_TOKENS=1")


def _machine_key() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    lines = {line for line in _cpuinfo() if line.startswith(("model name", "flags", "Features"))}
    return "\n".join(sorted(lines)) if lines else (platform.processor() or platform.machine())


# A build takes seconds (the compiler is stopped after 120 s): a staging file older than this was left
# by a process that was killed mid-build, and is removed by the next build.
STALE_STAGING_SECONDS = 3600


def _build(compiler: str, flags: tuple[str, ...], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    for leftover in target.parent.glob(".native-*.tmp"):
        with contextlib.suppress(OSError):  # another process may remove it first
            if time.time() - leftover.stat().st_mtime > STALE_STAGING_SECONDS:
                leftover.unlink()
    fd, staging = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run(
            [compiler, *flags, str(SOURCE), "-o", staging],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        os.replace(staging, target)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)


def _check_spin_setting() -> None:
    """``HYBRIDLM_SPIN_US`` (read by native.c's pool) must be a whole number of microseconds, 0 or more; any
    other value is dropped with a warning (the C side would read it as 0, silently) and the default runs."""
    spin = os.environ.get("HYBRIDLM_SPIN_US")
    if spin is not None and not spin.strip().isdigit():
        warnings.warn(
            f"hybridlm: HYBRIDLM_SPIN_US={spin!r} is not a whole number of microseconds (0 or more); "
            "the kernels' workers spin for the default 1000 us",
            RuntimeWarning,
            stacklevel=4,
        )
        del os.environ["HYBRIDLM_SPIN_US"]


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("HYBRIDLM_NATIVE", "1") == "0":
        return None
    _check_spin_setting()
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    flags = (*FLAGS, *_tuning_flags())
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), compiler, *flags, platform.machine(), _machine_key()]).encode()
    ).hexdigest()[:16]
    target = cache_dir() / "native" / f"native-{key}.so"
    try:
        if not target.exists():
            _build(compiler, flags, target)
        library = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        warnings.warn(
            f"hybridlm: the decode kernel {SOURCE.name} could not be built with {compiler} "
            f"({detail.strip()[-300:]}); decoding runs on torch alone (slower)",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    library.hybridlm_linear.argtypes = [p, i64, p, i64, i64, p, p, i32]
    library.hybridlm_linear.restype = None
    library.hybridlm_expert_linear.argtypes = [p, p, p, i64, p, i64, i64, i64, p, i32]
    library.hybridlm_expert_linear.restype = None
    library.hybridlm_mamba2_scan.argtypes = [p, i64, p, i64, p, p, p, ctypes.c_float, ctypes.c_float, p, p]
    library.hybridlm_mamba2_scan.argtypes += [i64, i64, i64, i64, i64, i64, i32]
    library.hybridlm_mamba2_scan.restype = None
    library.hybridlm_gated_delta_scan.argtypes = [p, i64, p, i64, p, i64, p, p, p, p, i64, i64, i64, i64, i64, i64]
    library.hybridlm_gated_delta_scan.argtypes += [ctypes.c_float, ctypes.c_float, i32]
    library.hybridlm_gated_delta_scan.restype = None
    library.hybridlm_linear_many.argtypes = [p, i64, p, p, p, i64, i64, p, i32]
    library.hybridlm_linear_many.restype = None
    library.hybridlm_causal_conv.argtypes = [p, i64, p, p, p, p, i64, i64, i64, i64, i32, i32]
    library.hybridlm_causal_conv.restype = i32
    library.hybridlm_rms_norm.argtypes = [p, p, i64, i64, i64, p, ctypes.c_float, i32, i32, i32, p, i32]
    library.hybridlm_rms_norm.restype = None
    f32 = ctypes.c_float
    # x, N, D, logits, logits stride, E, top_k, sigmoid scores, bias, norm_topk, scaling, up, down, I, swiglu,
    # shared, shared gate, its stride, then moe_decode: out, counts, ids, weights, scratch, threads;
    # moe_prefill: the shared expert's input, up and down weights and width, out, counts, ids, weights, order,
    # scratch, threads
    routed = [p, i64, i64, p, i64, i64, i64, i32, p, i32, f32, p, p, i64, i32, p, p, i64]
    library.hybridlm_moe_decode.argtypes = [*routed, p, p, p, p, p, i32]
    library.hybridlm_moe_decode.restype = None
    library.hybridlm_moe_prefill.argtypes = [*routed, p, p, p, i64, p, p, p, p, p, p, i32]
    library.hybridlm_moe_prefill.restype = i32
    library.hybridlm_swiglu.argtypes = [p, i64, p, i64, i64, i64, p, i32]
    library.hybridlm_swiglu.restype = None
    library.hybridlm_combine.argtypes = [p, p, p, i64, i64, i64, p, i32]
    library.hybridlm_combine.restype = None
    library.hybridlm_flush_subnormals.argtypes = [i32]
    library.hybridlm_flush_subnormals.restype = i32
    library.hybridlm_use_blas.argtypes = [p, p]
    library.hybridlm_use_blas.restype = None
    library.hybridlm_expert_matmuls.argtypes = [p, p, p, i64, p, i64, i64, i32, p, i32]
    library.hybridlm_expert_matmuls.restype = i32
    library.hybridlm_linear_tiles.argtypes = [p, i64, i64, p, p, p, i64, p, i32]
    library.hybridlm_linear_tiles.restype = i32
    return library


def _hand_over_blas(library: ctypes.CDLL) -> bool:
    """Give the kernels torch's own single-precision GEMM (MKL's Fortran ``sgemm_``) and MKL's per-thread
    thread count (``MKL_Set_Num_Threads_Local``), where this torch exports both (the x86 Linux wheels do);
    the tiled products need them. Once a process, through ``blas_available``."""
    if "mkl" not in torch.__config__.show().lower():
        return False
    try:
        torch_cpu = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        sgemm, set_local_threads = torch_cpu.sgemm_, torch_cpu.MKL_Set_Num_Threads_Local
    except (OSError, AttributeError):
        return False
    library.hybridlm_use_blas(*(ctypes.cast(f, ctypes.c_void_p).value for f in (sgemm, set_local_threads)))
    return True


@functools.cache
def blas_available() -> bool:
    """Whether ``expert_matmuls`` can run its kernel (the kernels built, and torch's MKL found)."""
    library = _library()
    return library is not None and _hand_over_blas(library)


@contextlib.contextmanager
def subnormals_flushed() -> Iterator[None]:
    """Inside the block, every CPU thread of this process treats subnormal floats (below 1.2e-38 in
    fp32) as zero, as GPU kernels do; the mode is restored after.

    Why: the scans' decays (exp of a cumulated log-decay) underflow, and their products with other small
    numbers land in the subnormal range, where x86 takes a microcode assist for every operation that reads
    or writes one. A random-weight qwen3_next-shaped model's Gated DeltaNet prefill held 25-60% subnormal
    entries and ran 1.8x slower on an Intel Xeon because of it. What is lost is below fp32's resolution of
    any sum these values enter (they are 1e-31 of the terms of order 1 beside them). The kernels' own
    workers run every task in the mode of the thread that called the kernel.

    Only on the main thread: called from another Python thread (the serving engine's scheduler), the
    parallel region that reaches the pool made 2-rank expert-parallel serving abort ("terminate called
    without an active exception", SIGABRT) in 3 runs of 8, so there the mode is left alone. Without the
    native library nothing changes (``torch.set_flush_denormal`` reaches only the calling thread, and torch has
    no way to read the mode back, so a user's own setting could not be restored).
    """
    library = _library()
    if library is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    before = library.hybridlm_flush_subnormals(1)
    try:
        yield
    finally:
        if not before:
            library.hybridlm_flush_subnormals(0)


def available() -> bool:
    """Whether the kernels are built and loaded (they are where a C compiler with OpenMP exists)."""
    return _library() is not None


def _applies(*tensors: Tensor) -> bool:
    """CPU, fp32, no autograd graph to record, the library loaded, and not while ``torch.compile`` traces
    (it cannot see into a ctypes call: each would split the graph) (plain loops: this runs per call)."""
    if torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t.dtype != torch.float32 or t.device.type != "cpu" or (grad and t.requires_grad):
            return False
    return _library() is not None


# Below this many weight values (256 KB) one thread does the work alone: handing a share to a spinning
# worker costs ~1 us, to a sleeping one ~100 us (native.c's pool); 16K and 256K measured the same.
SMALL_WORK = 64 * 1024


def _threads(work: int) -> int:
    return 1 if work < SMALL_WORK else torch.get_num_threads()


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``; x [..., K] with at most ``MAX_ROWS`` rows runs the kernel."""
    K = weight.shape[1]
    rows = x.numel() // K if K else 0
    parts = (x, weight) if bias is None else (x, weight, bias)
    if not 0 < rows <= MAX_ROWS or x.shape[-1] != K or not _applies(*parts) or not weight.is_contiguous():
        return F.linear(x, weight, bias)
    flat = x.dim() == 2 and x.is_contiguous()  # a decode step's rows: no reshape, no view (each ~0.8 us)
    x_MK = x if flat else x.reshape(rows, K).contiguous()
    N = weight.shape[0]
    y_MN = torch.empty(rows, N, dtype=torch.float32)
    _library().hybridlm_linear(
        x_MK.data_ptr(),
        rows,
        weight.data_ptr(),
        N,
        K,
        None if bias is None else bias.contiguous().data_ptr(),
        y_MN.data_ptr(),
        _threads(N * K),
    )
    return y_MN if flat else y_MN.view(*x.shape[:-1], N)


MAX_WEIGHTS = 8  # weights per linear_many call


def fuses_projections(x: Tensor, weights: list[Tensor], biases: list[Tensor | None] | None = None) -> bool:
    """Whether ``linear_many(x, weights, biases)`` runs a kernel (one pass for all weights: the decode
    kernel up to ``MAX_ROWS`` rows, prefill tiles on the pool above), not torch's matmul per weight."""
    K = weights[0].shape[1]
    rows = x.numel() // K if K else 0
    present = [b for b in biases or [] if b is not None]
    fits = rows > 0 and len(weights) <= MAX_WEIGHTS and x.shape[-1] == K
    fits = (
        fits and all(w.shape[1] == K and w.is_contiguous() for w in weights) and all(b.is_contiguous() for b in present)
    )
    if not fits or not _applies(x, *weights, *present):
        return False
    return rows <= MAX_ROWS or (blas_available() and max(rows, K, *(w.shape[0] for w in weights)) < 2**31)


def linear_many(x: Tensor, weights: list[Tensor], biases: list[Tensor | None]) -> Tensor:
    """``torch.cat([F.linear(x, w, b) for w, b in zip(weights, biases)], -1)``, in one kernel call where
    ``fuses_projections`` says one applies."""
    if not fuses_projections(x, weights, biases):
        return torch.cat([F.linear(x, w, b) for w, b in zip(weights, biases, strict=True)], dim=-1)
    return fused_projections(x, weights, biases)


def fused_projections(x: Tensor, weights: list[Tensor], biases: list[Tensor | None]) -> Tensor:
    """``linear_many``'s kernel call without its check, for a caller that has just asked
    ``fuses_projections`` (the check costs ~5 us, a few dozen times a decode step)."""
    K = weights[0].shape[1]
    rows = x.numel() // K
    present = [b for b in biases if b is not None]
    flat = x.dim() == 2 and x.is_contiguous()
    x_MK = x if flat else x.reshape(rows, K).contiguous()
    count = len(weights)
    out_features = [w.shape[0] for w in weights]
    total = sum(out_features)
    y_MN = torch.empty(rows, total, dtype=torch.float32)
    pointer_array = ctypes.c_void_p * count
    bias_pointers = pointer_array(*(None if b is None else b.data_ptr() for b in biases)) if present else None
    weight_pointers, sizes = pointer_array(*[w.data_ptr() for w in weights]), (ctypes.c_int64 * count)(*out_features)
    if rows <= MAX_ROWS:
        _library().hybridlm_linear_many(
            x_MK.data_ptr(), rows, weight_pointers, sizes, bias_pointers, count, K, y_MN.data_ptr(), _threads(total * K)
        )
    elif _library().hybridlm_linear_tiles(
        x_MK.data_ptr(), rows, K, weight_pointers, bias_pointers, sizes, count, y_MN.data_ptr(), torch.get_num_threads()
    ):
        raise MemoryError(f"linear_many: no memory for the tiles of a [{rows}, {K}] x [{K}, {total}] product")
    return y_MN if flat else y_MN.view(*x.shape[:-1], -1)


def causal_conv_applies(x: Tensor, state: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None) -> bool:
    """Whether ``causal_conv_`` runs the kernel: fp32 CPU without autograd, rows with unit column stride,
    whole sequences of rows, a contiguous state, kernel width <= 65, silu or no activation."""
    tensors = (x, state, weight) if bias is None else (x, state, weight, bias)
    fits = x.dim() == 2 and x.stride(1) == 1 and state.is_contiguous() and weight.is_contiguous()
    fits = fits and x.shape[0] % max(state.shape[0], 1) == 0 and weight.shape[1] <= 65
    return fits and activation in ("silu", None) and _applies(*tensors)


def causal_conv_(x: Tensor, state: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None) -> Tensor:
    """The short causal convolution over T tokens per sequence with ``state`` [B, C, W-1] (the previous W-1
    inputs) rolled in place; returns y [B * T, C]. x [B * T, C] (row b * T + t is token t of sequence b)
    may be a column slice of a wider projection. T = 1 is the decode step. Where the kernel does not apply,
    its twins run: ``causal_conv1d`` (``causal_conv1d_step`` for T = 1)."""
    batch, channels = state.shape[0], x.shape[1]
    T = x.shape[0] // max(batch, 1)
    if not causal_conv_applies(x, state, weight, bias, activation):
        if T == 1:
            y, new_state = causal_conv1d_step(x, state, weight, bias, activation)
        else:
            y, new_state = causal_conv1d(x.reshape(batch, T, channels), weight, bias, state, activation)
        state.copy_(new_state)
        return y.reshape(batch * T, channels)
    y = torch.empty(batch * T, channels, dtype=torch.float32)
    failed = _library().hybridlm_causal_conv(
        *_pointers(x), x.stride(0), *_pointers(state, weight, bias, y), batch, T, channels, weight.shape[1],
        int(activation == "silu"), _threads(batch * T * channels * weight.shape[1]),
    )  # fmt: skip
    if failed:
        raise MemoryError(f"causal_conv_: no memory for a [{weight.shape[1]}, {channels}] copy of the conv weight")
    return y


def rms_norm_applies(x: Tensor, weight: Tensor | None = None) -> bool:
    """Whether ``rms_norm`` / ``l2_normalize`` run the kernel: fp32 on CPU without autograd, any number of
    rows (one pass per row where torch's formula makes six over the whole tensor: ~4% of a prefill)."""
    return x.numel() > 0 and (_applies(x) if weight is None else _applies(x, weight))


def rms_norm(
    x: Tensor, weight: Tensor, eps: float, group_size: int, add_one: bool, gate: Tensor | None, gate_first: bool
) -> Tensor:
    """RMSNorm of x [..., dim] over groups of ``group_size`` channels, scaled by ``weight`` (``1 + weight``
    when ``add_one``), gated by silu(``gate``) before (``gate_first``) or after the norm. Only where
    ``rms_norm_applies``; hybridlm.layers.norm holds the torch twin and decides."""
    return _normalize(x, weight, eps, group_size, add_one, gate, gate_first, use_sum=False)


def l2_normalize(x: Tensor, eps: float) -> Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim, where ``rms_norm_applies(x)`` (twin: the torch
    formula in hybridlm.layers.gated_deltanet.l2_normalize, which calls this)."""
    return _normalize(x, None, eps, x.shape[-1], False, None, False, use_sum=True)


def _normalize(
    x: Tensor,
    weight: Tensor | None,
    eps: float,
    group_size: int,
    add_one: bool,
    gate: Tensor | None,
    gate_first: bool,
    use_sum: bool,
) -> Tensor:
    dim = x.shape[-1]
    x = x.contiguous()  # a strided q or k (a split of a projection) is copied once
    gate = None if gate is None else gate.contiguous()
    y = torch.empty_like(x)
    _library().hybridlm_rms_norm(
        *_pointers(x, gate),
        x.numel() // dim,
        dim,
        group_size,
        None if weight is None else weight.data_ptr(),
        eps,
        int(add_one),
        int(gate_first),
        int(use_sum),
        y.data_ptr(),
        _threads(x.numel()),
    )
    return y


def expert_linear_reference(x_XK: Tensor, input_row_R: Tensor, expert_R: Tensor, weight_ENK: Tensor) -> Tensor:
    """The plain twin: y[r] = weight[expert[r]] @ x[input_row[r]], one expert at a time."""
    y_RN = x_XK.new_zeros(input_row_R.shape[0], weight_ENK.shape[1])
    for e in expert_R.unique().tolist():
        (rows,) = torch.where(expert_R == e)
        y_RN[rows] = F.linear(x_XK[input_row_R[rows]], weight_ENK[e])
    return y_RN


def expert_linear_applies(x_XK: Tensor, rows: int, weight_ENK: Tensor) -> bool:
    """Whether ``expert_linear`` runs the kernel for ``rows`` (token, expert) rows of these tensors."""
    fits = 0 < rows <= MAX_EXPERT_ROWS and weight_ENK.shape[0] <= MAX_EXPERTS and weight_ENK.is_contiguous()
    return fits and _applies(x_XK, weight_ENK)


def expert_linear(x_XK: Tensor, input_row_R: Tensor, expert_R: Tensor, weight_ENK: Tensor) -> Tensor:
    """y [R, N]: row r is ``weight_ENK[expert_R[r]] @ x_XK[input_row_R[r]]``.

    Every expert that has rows is read from memory once for all of them (the MoE decode product:
    rows are (token, chosen expert) pairs). Ids are trusted (the router made them): in range.
    """
    R = input_row_R.shape[0]
    E, N, K = weight_ENK.shape
    if not expert_linear_applies(x_XK, R, weight_ENK):
        return expert_linear_reference(x_XK, input_row_R, expert_R, weight_ENK)
    x_XK = x_XK.contiguous()
    input_row_R = input_row_R.to(torch.int64).contiguous()
    expert_R = expert_R.to(torch.int64).contiguous()
    y_RN = torch.empty(R, N, dtype=torch.float32)
    _library().hybridlm_expert_linear(
        x_XK.data_ptr(),
        input_row_R.data_ptr(),
        expert_R.data_ptr(),
        R,
        weight_ENK.data_ptr(),
        E,
        N,
        K,
        y_RN.data_ptr(),
        _threads(R * N * K),
    )
    return y_RN


def _pointers(*tensors: Tensor | None) -> list[int | None]:
    return [None if t is None else t.data_ptr() for t in tensors]


def mamba2_scan_applies(xBC: Tensor, dt_raw: Tensor, state: Tensor, *parameters: Tensor | None) -> bool:
    """Whether ``mamba2_scan_`` runs the kernel (fp32 CPU without autograd, unit column strides, a contiguous
    state, whole sequences of rows)."""
    present = [t for t in parameters if t is not None]
    strided = xBC.dim() == 2 and dt_raw.dim() == 2 and xBC.stride(1) == 1 and dt_raw.stride(1) == 1
    whole = xBC.shape[0] == dt_raw.shape[0] and xBC.shape[0] % max(state.shape[0], 1) == 0
    return strided and whole and state.is_contiguous() and _applies(xBC, dt_raw, state, *present)


def mamba2_scan_(
    xBC: Tensor,
    dt_raw: Tensor,
    dt_bias: Tensor,
    A_log: Tensor,
    D: Tensor | None,
    time_step_limit: tuple[float, float],
    state: Tensor,
) -> Tensor:
    """The Mamba-2 recurrence over T tokens per sequence from the mixer's projections, token by token, where
    ``mamba2_scan_applies``: xBC [batch * T, H*P + 2*G*N] (after the conv; row b * T + t is token t of
    sequence b), dt_raw [batch * T, H] (before softplus and its bias); ``state`` [batch, H, P, N] is updated
    in place; returns y [batch * T, H*P] (before the gated norm). T = 1 is the decode step. Twins:
    ``ssd_reference`` (any T), the mixer's torch step (T = 1)."""
    batch, H, P, N = state.shape
    T = xBC.shape[0] // batch
    G = (xBC.shape[1] - H * P) // (2 * N)
    y = torch.empty(batch * T, H * P, dtype=torch.float32)
    low, high = time_step_limit
    _library().hybridlm_mamba2_scan(
        xBC.data_ptr(), xBC.stride(0), dt_raw.data_ptr(), dt_raw.stride(0),
        *_pointers(dt_bias.contiguous(), A_log.contiguous(), None if D is None else D.contiguous()),
        low, min(high, torch.finfo(torch.float32).max), *_pointers(state, y), batch, T, H, P, G, N,
        _threads(state.numel() * T),
    )  # fmt: skip
    return y


def gated_delta_scan_applies(qkv: Tensor, b: Tensor, a: Tensor, state: Tensor, *parameters: Tensor) -> bool:
    """Whether ``gated_delta_scan_`` runs the kernel: fp32 CPU without autograd, 2-D projections with unit
    column strides and whole sequences of rows, a contiguous state, head dims <= 1024."""
    strided = qkv.dim() == b.dim() == a.dim() == 2 and qkv.stride(1) == b.stride(1) == a.stride(1) == 1
    whole = qkv.shape[0] == b.shape[0] == a.shape[0] and qkv.shape[0] % max(state.shape[0], 1) == 0
    fits = state.dim() == 4 and max(state.shape[2:]) <= 1024 and state.is_contiguous()
    return strided and whole and fits and _applies(qkv, b, a, state, *parameters)


def gated_delta_scan_(
    qkv: Tensor,
    b: Tensor,
    a: Tensor,
    A_log: Tensor,
    dt_bias: Tensor,
    num_key_heads: int,
    state: Tensor,
    eps: float = 1e-6,
) -> Tensor:
    """The Gated DeltaNet recurrence over T tokens per sequence from the mixer's projections, token by token,
    where ``gated_delta_scan_applies``: qkv [batch * T, 2 * Hk * K + H * V] after the conv (row b * T + t is
    token t of sequence b), b and a [batch * T, H] (the write-strength and decay projections, raw);
    ``state`` [batch, H, K, V] is updated in place; returns o [batch * T, H * V] (before the gated norm).
    Per token: q and k L2-normalised (``eps``), beta = sigmoid(b), g = -exp(A_log) * softplus(a + dt_bias),
    value head h reading key head h // (H / Hk), output scale K ** -0.5. T = 1 is the decode step. Twins:
    the mixer's torch lines, then ``gated_deltanet_reference`` (any T) or ``gated_deltanet_step`` (T = 1)."""
    batch, H, K, V = state.shape
    T = qkv.shape[0] // batch
    o = torch.empty(batch * T, H * V, dtype=torch.float32)
    _library().hybridlm_gated_delta_scan(
        qkv.data_ptr(), qkv.stride(0), b.data_ptr(), b.stride(0), a.data_ptr(), a.stride(0),
        *_pointers(A_log.contiguous(), dt_bias.contiguous(), state, o), batch, T, H, num_key_heads, K, V, eps,
        K**-0.5, _threads(state.numel() * T),
    )  # fmt: skip
    return o


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``F.silu(gate) * up`` for gate, up [..., I] (halves of one projection, say) in one pass on the pool
    where the kernel applies (fp32 CPU without autograd, rows with unit column stride), else the twin."""
    if not _applies(gate, up):
        return F.silu(gate) * up
    I = gate.shape[-1]
    rows = gate.numel() // I if I else 0
    fits = rows > 0 and up.shape == gate.shape and gate.stride(-1) == 1 and up.stride(-1) == 1
    gate_rows, up_rows = (t.reshape(rows, I) if fits else t for t in (gate, up))  # views where the layout allows
    if not (fits and gate_rows.data_ptr() == gate.data_ptr() and up_rows.data_ptr() == up.data_ptr()):
        return F.silu(gate) * up
    out = torch.empty(gate.shape, dtype=torch.float32)
    _library().hybridlm_swiglu(
        gate_rows.data_ptr(), gate_rows.stride(0), up_rows.data_ptr(), up_rows.stride(0), rows, I, out.data_ptr(),
        _threads(rows * I),
    )  # fmt: skip
    return out


def combine(y_MD: Tensor, row_NK: Tensor, weights_NK: Tensor) -> Tensor:
    """out [N, D]: ``out[n] = sum_k weights_NK[n, k] * y_MD[row_NK[n, k]]`` in slot order, the MoE block's
    weighted sum of each token's expert outputs, where the kernel applies (fp32 CPU without autograd, row
    ids trusted in range); else the twin, ``(y_MD[row_NK] * weights_NK[..., None]).sum(1)``."""
    N, K = row_NK.shape
    D = y_MD.shape[1]
    if N == 0 or not _applies(y_MD, weights_NK):
        return (y_MD[row_NK] * weights_NK[..., None]).sum(1)
    y_MD, weights_NK = y_MD.contiguous(), weights_NK.contiguous()
    row_NK = row_NK.to(torch.int64).contiguous()
    out_ND = torch.empty(N, D, dtype=torch.float32)
    _library().hybridlm_combine(*_pointers(y_MD, row_NK, weights_NK), N, K, D, out_ND.data_ptr(), _threads(N * K * D))
    return out_ND


EXPERT_ACTIVATIONS = {"none": 0, "relu2": 1, "swiglu": 2}  # the kernel's codes


def expert_matmuls(x_MK: Tensor, counts_E: Tensor, weight_ENK: Tensor, activation: str = "none") -> Tensor | None:
    """The rows of x_MK grouped by expert (counts_E[e] rows for expert e, in expert order) times their
    expert's weight_ENK[e]^T, then ``activation``: "none" or "relu2" give [M, N]; "swiglu" (weight rows:
    the gate's N / 2, then the up's) gives [M, N / 2] = silu(gate) * up. Tiles of one expert's rows x 256
    output columns go to whichever pool thread is free, each a single-threaded call of torch's MKL sgemm.
    None where this does not apply (autograd, not fp32 on CPU, no MKL in this torch): the caller then runs
    torch's grouped matmuls and activation (the twins)."""
    if not (_applies(x_MK, weight_ENK) and weight_ENK.is_contiguous() and blas_available()):
        return None
    E, N, K = weight_ENK.shape
    if x_MK.shape[1] != K or max(x_MK.shape[0], N, K) >= 2**31 or (activation == "swiglu" and N % 2):
        return None  # the BLAS takes 32-bit sizes
    x_MK = x_MK.contiguous()
    counts_E = counts_E.to(torch.int64)
    start = torch.zeros(E + 1, dtype=torch.int64)
    torch.cumsum(counts_E, 0, out=start[1:])
    by_rows = torch.argsort(counts_E, descending=True, stable=True)
    columns = N // 2 if activation == "swiglu" else N
    y_MN = torch.empty(x_MK.shape[0], columns, dtype=torch.float32)
    failed = _library().hybridlm_expert_matmuls(
        *_pointers(x_MK, start, by_rows), E, weight_ENK.data_ptr(), N, K, EXPERT_ACTIVATIONS[activation],
        y_MN.data_ptr(), _threads(x_MK.shape[0] * N * K),
    )  # fmt: skip
    return None if failed else y_MN


def moe_decode_applies(x_ND: Tensor, top_k: int, up_proj_EFD: Tensor, down_proj_EDI: Tensor, num_groups: int) -> bool:
    """Whether ``moe_block`` runs the decode kernel: a few tokens, ungrouped routing, fp32, contiguous experts."""
    fits = 0 < x_ND.shape[0] * top_k <= MAX_EXPERT_ROWS and up_proj_EFD.shape[0] <= MAX_EXPERTS and num_groups == 1
    fits = fits and up_proj_EFD.is_contiguous() and down_proj_EDI.is_contiguous() and x_ND.dim() == 2
    return fits and _applies(x_ND, up_proj_EFD, down_proj_EDI)


def moe_prefill_applies(
    x_ND: Tensor,
    top_k: int,
    up_proj_EFD: Tensor,
    down_proj_EDI: Tensor,
    num_groups: int,
    shared_projections: Sequence[Tensor] = (),
) -> bool:
    """Whether ``moe_block`` runs the prefill kernel: more (token, expert) pairs than the decode kernel takes,
    ungrouped routing, fp32, contiguous experts (and shared-expert weights), torch's MKL handed over, sizes
    within the BLAS's 32 bits."""
    E, F, D = up_proj_EFD.shape
    fits = x_ND.shape[0] * top_k > MAX_EXPERT_ROWS and E <= MAX_EXPERTS and num_groups == 1 and x_ND.dim() == 2
    fits = fits and all(w.is_contiguous() for w in (up_proj_EFD, down_proj_EDI, *shared_projections))
    sizes = [x_ND.shape[0] * top_k, F, D, down_proj_EDI.shape[2], *(max(w.shape) for w in shared_projections)]
    fits = fits and max(sizes) < 2**31
    return fits and _applies(x_ND, up_proj_EFD, down_proj_EDI, *shared_projections) and blas_available()


def _check_shared(
    N: int,
    D: int,
    activation: str,
    shared_ND: Tensor | None,
    shared_gate_N1: Tensor | None,
    shared_projections: Sequence[Tensor],
) -> None:
    """A ValueError naming the shared-expert tensor whose shape the kernel would read past."""
    if shared_ND is not None and tuple(shared_ND.shape) != (N, D):
        raise ValueError(f"moe_block: shared_ND must be [{N}, {D}], got {list(shared_ND.shape)}")
    if shared_gate_N1 is not None and (shared_gate_N1.numel() != N or shared_gate_N1.shape[0] != N):
        shape = list(shared_gate_N1.shape)
        raise ValueError(f"moe_block: shared_gate_N1 must be [{N}, 1] or [{N}] (one a token), got {shape}")
    if shared_projections:
        S = shared_projections[-1].shape[-1]
        wanted = [[S, D]] * (2 if activation == "swiglu" else 1) + [[D, S]]
        if [list(w.shape) for w in shared_projections] != wanted:
            raise ValueError(
                f"moe_block: shared_projections for {activation} must be shaped {wanted}, "
                f"got {[list(w.shape) for w in shared_projections]}"
            )


def moe_block(
    x_ND: Tensor,
    logits_NE: Tensor,
    top_k: int,
    scoring: str,
    expert_bias_E: Tensor | None,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
    up_proj_EFD: Tensor,
    down_proj_EDI: Tensor,
    activation: str,
    shared_ND: Tensor | None = None,
    shared_gate_N1: Tensor | None = None,
    shared_projections: Sequence[Tensor] = (),
) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """A MoE block's routing, routed experts and combine in one kernel call, where ``moe_decode_applies``
    (a few tokens: each chosen expert streamed once for all its rows) or ``moe_prefill_applies`` (a prompt:
    the rows grouped by expert, both projections as tiles on the pool). Returns the output [N, D], the chosen
    ids [N, K] and weights [N, K], and tokens per expert [E]; None when the prefill tiles could not run.
    Same arguments and meaning as ``route`` + ``moe_experts_reference`` (ungrouped routing), then
    ``+ sigmoid(shared_gate_N1) * shared_ND`` (``+ shared_ND`` without a gate; neither when None).
    ``shared_projections`` (prefill only): the shared expert's weights, (gate, up, down) for swiglu or (up,
    down) for relu2, computed in the experts' passes instead of a given ``shared_ND``."""
    N, D = x_ND.shape
    E, I = up_proj_EFD.shape[0], down_proj_EDI.shape[2]
    x_ND = x_ND.contiguous()
    logits_NE = logits_NE.float()
    if logits_NE.stride(1) != 1:
        logits_NE = logits_NE.contiguous()
    bias = None if expert_bias_E is None else expert_bias_E.float().contiguous()
    if not 1 <= top_k <= E:
        raise ValueError(f"moe_block: top_k must be in [1, num_experts={E}], got {top_k}")
    _check_shared(N, D, activation, shared_ND, shared_gate_N1, shared_projections)
    shared = None if shared_ND is None else shared_ND.contiguous()
    has_shared = shared is not None or bool(shared_projections)
    gate = shared_gate_N1.float() if shared_gate_N1 is not None and has_shared else None
    swiglu = activation == "swiglu"
    out_ND = torch.empty(N, D, dtype=torch.float32)
    counts_E = torch.empty(E, dtype=torch.int64)
    ids_NK = torch.empty(N, top_k, dtype=torch.int64)
    weights_NK = torch.empty(N, top_k, dtype=torch.float32)
    routed = (
        x_ND.data_ptr(), N, D, logits_NE.data_ptr(), logits_NE.stride(0), E, top_k, int(scoring == "sigmoid"),
        None if bias is None else bias.data_ptr(), int(norm_topk_prob), routed_scaling_factor,
        up_proj_EFD.data_ptr(), down_proj_EDI.data_ptr(), I, int(swiglu),
        *_pointers(shared, gate), 0 if gate is None else gate.stride(0),
    )  # fmt: skip
    rows = N * top_k
    if rows <= MAX_EXPERT_ROWS:
        scratch = torch.empty(rows * ((2 if swiglu else 1) * I + D), dtype=torch.float32)
        _library().hybridlm_moe_decode(
            *routed, *_pointers(out_ND, counts_E, ids_NK, weights_NK, scratch), _threads(up_proj_EFD[0].numel() * 2)
        )
    else:
        shared_in, *shared_up, shared_down = shared_projections or (None, None)  # (gate, up, down) or (up, down)
        shared_up = shared_up[0] if shared_up else None
        S = 0 if shared_down is None else shared_down.shape[1]
        order = torch.empty(2 * rows, dtype=torch.int64)
        scratch = torch.empty(rows * (D + I) + N * (S + D), dtype=torch.float32)
        shared_weights = (*_pointers(shared_in, shared_up, shared_down), S)
        pointers = _pointers(out_ND, counts_E, ids_NK, weights_NK, order, scratch)
        if _library().hybridlm_moe_prefill(*routed, *shared_weights, *pointers, torch.get_num_threads()):
            return None
    return out_ND, ids_NK, weights_NK, counts_E
