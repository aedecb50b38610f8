"""Shared test helpers."""

import os
from pathlib import Path

from hybridlm.config import HybridConfig


def tiny_config(pattern: str = "MEGm*-EM", **overrides) -> HybridConfig:
    """debug-tiny with another pattern: every sub-config present, so any pattern is valid."""
    return HybridConfig.from_preset("debug-tiny", pattern=pattern, **overrides)


def fixtures_dir() -> Path:
    """The shared real-trace fixtures: $HYBRIDLM_FIXTURES, else shared/fixtures beside the checkout or /work."""
    candidates = [os.environ.get("HYBRIDLM_FIXTURES")]
    candidates += [str(parent / "shared" / "fixtures") for parent in Path(__file__).resolve().parents]
    candidates.append("/work/shared/fixtures")
    for candidate in candidates:
        if candidate and (Path(candidate) / "kineto").is_dir():
            return Path(candidate)
    return Path(__file__).resolve().parents[2] / "shared" / "fixtures"  # missing: the tests that need it fail


FIXTURES = fixtures_dir()
