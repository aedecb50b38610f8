"""The selection of other projects' CUDA kernels (hybridlm.ops.cuda_kernels), exercised on CPU: a kernel is
used only where it applies and after matching the plain loop on the device; the real kernels' example inputs
and references are held to the torch chunked forms, which stand in for a GPU kernel here."""

from __future__ import annotations

import dataclasses
import logging
import warnings

import pytest
import torch

from hybridlm.ops import cuda_kernels
from hybridlm.ops.cuda_kernels import GATED_DELTA, SSD, FastKernel, fast_kernel
from hybridlm.ops.gated_deltanet import gated_deltanet_chunked
from hybridlm.ops.ssd import ssd_chunked

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_verdicts():
    cuda_kernels._verdicts.clear()
    yield
    cuda_kernels._verdicts.clear()


def standing_in(kernel: FastKernel, fn, name: str = "stand-in") -> tuple[FastKernel, list]:
    """``kernel`` with ``fn`` as its loaded function, and the list its loads append to."""
    loads = []

    def load():
        loads.append(1)
        return fn

    return dataclasses.replace(kernel, name=name, load=load), loads


@pytest.mark.parametrize(("kernel", "torch_form"), [(SSD, ssd_chunked), (GATED_DELTA, gated_deltanet_chunked)])
def test_a_matching_kernel_is_used_and_checked_once_per_device(kernel, torch_form):
    stand_in, loads = standing_in(kernel, torch_form)
    with torch.inference_mode():
        assert fast_kernel(stand_in, CPU, device_types=("cpu",)) is torch_form
        assert fast_kernel(stand_in, CPU, device_types=("cpu",)) is torch_form
    assert len(loads) == 1


@pytest.mark.parametrize(("kernel", "torch_form"), [(SSD, ssd_chunked), (GATED_DELTA, gated_deltanet_chunked)])
def test_the_tolerance_is_well_above_the_torch_forms_error(kernel, torch_form):
    """The chunked torch forms match the loops on the example inputs to <1e-5 of the largest value: the 1e-3
    allowed a GPU kernel (another summation order, TF32) is loose against that but tight against a wrong
    adapter (below: an output off by 1% is refused)."""
    args, kwargs = kernel.example(CPU)
    got, want = torch_form(*args, **kwargs), kernel.reference(*args)
    worst = max(((g - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want, strict=True))
    assert worst < 1e-5 and 10 * worst < kernel.tolerance


@pytest.mark.parametrize(
    "wrong",
    [
        lambda fn: lambda *a, **k: (fn(*a, **k)[0] * 1.01, fn(*a, **k)[1]),  # output off by 1%
        lambda fn: lambda *a, **k: (fn(*a, **k)[0], fn(*a, **k)[1].transpose(-1, -2)),  # state transposed
        lambda fn: lambda *a, **k: (fn(*a, **k)[0], torch.zeros_like(fn(*a, **k)[1])),  # initial state ignored
        lambda fn: lambda *a, **k: (fn(*a, **k)[0].fill_(float("nan")), fn(*a, **k)[1]),
    ],
    ids=["scaled", "transposed state", "zero state", "nan"],
)
@pytest.mark.parametrize(("kernel", "torch_form"), [(SSD, ssd_chunked), (GATED_DELTA, gated_deltanet_chunked)])
def test_a_kernel_that_differs_is_refused_with_a_warning(kernel, torch_form, wrong):
    stand_in, _ = standing_in(kernel, wrong(torch_form), name="wrong kernel")
    with torch.inference_mode(), pytest.warns(RuntimeWarning, match="wrong kernel not used on cpu .*torch path runs"):
        assert fast_kernel(stand_in, CPU, device_types=("cpu",)) is None


def test_a_kernel_that_raises_is_refused_with_a_warning():
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image is available for execution on the device")

    with torch.inference_mode(), pytest.warns(RuntimeWarning, match="RuntimeError: no kernel image"):
        assert fast_kernel(standing_in(SSD, broken)[0], CPU, device_types=("cpu",)) is None


def test_a_missing_package_falls_back_without_a_warning(caplog):
    def load():
        raise ImportError("No module named 'mamba_ssm'")

    missing = dataclasses.replace(SSD, load=load)
    with torch.inference_mode(), warnings.catch_warnings(), caplog.at_level(logging.INFO):
        warnings.simplefilter("error")
        assert fast_kernel(missing, CPU, device_types=("cpu",)) is None
    assert "not installed" in caplog.text


def test_nothing_is_loaded_off_cuda_or_under_autograd():
    stand_in, loads = standing_in(SSD, ssd_chunked)
    with torch.inference_mode():
        assert cuda_kernels.fast_kernel(stand_in, CPU) is None  # CUDA only by default
    assert fast_kernel(stand_in, CPU, device_types=("cpu",)) is None  # gradients would not be checked
    assert loads == []
    with torch.inference_mode():
        assert cuda_kernels.ssd(CPU) is None and cuda_kernels.gated_delta(CPU) is None


@pytest.mark.parametrize(
    ("preset", "selector", "torch_form"),
    [("debug-tiny-nemotron", "ssd", ssd_chunked), ("debug-tiny-qwen3-next", "gated_delta", gated_deltanet_chunked)],
)
def test_the_mixers_call_a_selected_kernel_with_the_torch_forms_arguments(monkeypatch, preset, selector, torch_form):
    """The Mamba-2 and Gated DeltaNet mixers hand a selected kernel what they hand the torch chunked form (here
    a recording stand-in that is the torch form): the model's logits are unchanged and the stand-in ran."""
    from hybridlm.model import HybridLM
    from hybridlm.presets import get_preset

    torch.manual_seed(0)
    model = HybridLM(get_preset(preset)).double().eval()  # float64: past the fp32 CPU kernels, to the chunked form
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    with torch.inference_mode():
        expected = model(ids).logits
        calls = []

        def recording(*args, **kwargs):
            calls.append(kwargs)
            return torch_form(*args, **kwargs)

        monkeypatch.setattr(cuda_kernels, selector, lambda device: recording)
        actual = model(ids).logits
    assert calls and all("chunk_size" in kwargs for kwargs in calls)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12)


def test_chosen_reports_each_kernel_asked_for_and_whether_it_is_in_use():
    right, _ = standing_in(SSD, ssd_chunked, name="right kernel")
    wrong, _ = standing_in(SSD, lambda *a, **k: (ssd_chunked(*a, **k)[0] * 1.01, ssd_chunked(*a, **k)[1]), "off")
    assert cuda_kernels.chosen() == {}
    with torch.inference_mode(), pytest.warns(RuntimeWarning):
        fast_kernel(right, CPU, device_types=("cpu",))
        fast_kernel(wrong, CPU, device_types=("cpu",))
    assert cuda_kernels.chosen() == {"right kernel on cpu": True, "off on cpu": False}
