"""Names users write for dtypes and devices, and load_model using them."""

from __future__ import annotations

import pytest
import torch

from hybridlm.loading import load_model, parse_dtype, resolve_device


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("auto", None),
        (None, None),
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("float", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("BF16", torch.bfloat16),
        ("torch.bfloat16", torch.bfloat16),
        ("float16", torch.float16),
        ("fp16", torch.float16),
        ("half", torch.float16),
        (torch.bfloat16, torch.bfloat16),
    ],
)
def test_parse_dtype_accepts_what_transformers_users_write(name, expected):
    assert parse_dtype(name) is expected


@pytest.mark.parametrize("name", ["bfloat", "int8", "", "fp8", 16, torch.int64])
def test_parse_dtype_refuses_anything_else_listing_the_accepted_names(name):
    with pytest.raises(ValueError, match=r"expected one of auto, float32, .*bfloat16"):
        parse_dtype(name)


def test_resolve_device_accepts_cpu_and_torch_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "", "tpu", "meta", 3])
def test_resolve_device_refuses_unknown_devices(name):
    with pytest.raises(ValueError, match="device"):
        resolve_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_without_cuda_is_one_clear_error():
    for name in ("cuda", "cuda:0", torch.device("cuda", 1)):
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device(name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_index_past_the_last_gpu_is_refused():
    count = torch.cuda.device_count()
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match=f"has {count} CUDA device"):
        resolve_device(f"cuda:{count}")


def test_load_model_takes_dtype_and_device_names():
    model = load_model("debug-tiny", dtype="bf16", device="cpu", quiet=True)
    assert model.dtype == torch.bfloat16 and model.device == torch.device("cpu")
    assert load_model("debug-tiny", dtype="auto", quiet=True).dtype == torch.float32


def test_load_model_checks_dtype_and_device_before_building():
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model("debug-tiny", dtype="bfloat", quiet=True)
    with pytest.raises(ValueError, match="unknown device"):
        load_model("debug-tiny", device="gpu", quiet=True)


@pytest.mark.parametrize("name", ["float8_e4m3fn", "torch.float8_e5m2", torch.float8_e4m3fn, torch.float8_e5m2])
def test_parse_dtype_refuses_float8_naming_what_hybridlm_computes_in(name):
    with pytest.raises(ValueError, match=r"float8.*float32, bfloat16, float16"):
        parse_dtype(name)
