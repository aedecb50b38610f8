"""Resolve what the CLI and library are pointed at: a preset name or a checkpoint directory, a dtype
name, a device name."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from hybridlm.config import HybridConfig
from hybridlm.memory import move_to_huge_pages
from hybridlm.model import HybridLM
from hybridlm.presets import PRESETS, get_preset, list_presets

# the names transformers users write for ``torch_dtype`` / ``dtype`` (case-insensitive, "torch." optional)
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}  # fmt: skip
DEVICE_TYPES = ("cpu", "cuda", "mps")


# what hybridlm computes in; float8 is a storage format whose arithmetic torch does not provide
# (matmul and most ops raise), so it is refused by name rather than failing inside generate
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """ "bf16", "torch.bfloat16", torch.bfloat16 -> torch.bfloat16; "auto" or None -> None (as stored)."""
    if name is None:
        return None
    if isinstance(name, torch.dtype):
        if not name.is_floating_point:
            raise ValueError(f"dtype {name} is not a floating-point type; expected one of {_dtype_names()}")
        if name not in COMPUTE_DTYPES:
            raise ValueError(f"dtype {name} is a float8 storage type; hybridlm computes in {compute_dtype_names()}")
        return name
    key = name.strip().lower().removeprefix("torch.") if isinstance(name, str) else None
    if key == "auto":
        return None
    if key is not None and key.startswith("float8"):
        raise ValueError(f"dtype {name!r} is a float8 storage type; hybridlm computes in {compute_dtype_names()}")
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {_dtype_names()}")
    return DTYPES[key]


def _dtype_names() -> str:
    return ", ".join(["auto", *DTYPES])


def compute_dtype_names() -> str:
    return ", ".join(str(dtype).removeprefix("torch.") for dtype in COMPUTE_DTYPES)


def resolve_device(name: str | torch.device | None) -> torch.device:
    """ "cpu", "cuda", "cuda:1", "mps" or a torch.device -> a torch.device this machine has.

    A device the machine lacks (CUDA without a GPU, an index past the last GPU) or an unknown name
    is one ValueError saying what is there.
    """
    if name is None:
        return torch.device("cpu")
    try:
        device = name if isinstance(name, torch.device) else torch.device(str(name).strip())
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {name!r}; expected cpu, cuda, cuda:N or mps") from None
    if device.type not in DEVICE_TYPES:
        raise ValueError(f"unsupported device {name!r}; expected cpu, cuda, cuda:N or mps")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            built = "built without CUDA" if torch.version.cuda is None else f"built with CUDA {torch.version.cuda}"
            raise ValueError(f"device {name!r}: CUDA is not available here (torch {torch.__version__}, {built})")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {name!r}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r}: MPS (Apple GPU) is not available on this machine")
    return device


def resolve_config(name_or_path: str) -> HybridConfig:
    """A preset's config, or a checkpoint directory's config (weights are not read)."""
    if name_or_path in PRESETS:
        return get_preset(name_or_path)
    path = Path(name_or_path)
    if path.is_dir():
        from hybridlm.checkpoints import read_config

        return read_config(path)
    raise ValueError(f"{name_or_path!r} is neither a preset ({', '.join(list_presets())}) nor a checkpoint directory")


def load_model(
    name_or_path: str,
    seed: int = 0,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    quiet: bool = False,
) -> HybridLM:
    """A checkpoint directory's model, or a preset built with random weights from ``seed``.

    ``dtype`` and ``device`` take what ``parse_dtype`` and ``resolve_device`` do; both are checked
    before anything is built or read.
    """
    dtype = parse_dtype(dtype)
    device = resolve_device(device)
    if name_or_path in PRESETS:
        if not quiet:
            print(f"note: {name_or_path} is a preset: random weights (seed {seed})", file=sys.stderr)
        config = get_preset(name_or_path)
        torch.manual_seed(seed)
        with torch.device(device):
            model = HybridLM(config)
        if dtype is not None:
            model = model.to(dtype)
        move_to_huge_pages(model)  # as a checkpoint's weights are loaded (checkpoints.plan)
        return model.eval()
    resolve_config(name_or_path)  # the clear error for a bad name
    from hybridlm.checkpoints import from_pretrained

    return from_pretrained(name_or_path, dtype=dtype, device=device)
