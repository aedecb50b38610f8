"""Shared test helpers."""

from hybridlm.config import HybridConfig


def tiny_config(pattern: str = "MEGm*-EM", **overrides) -> HybridConfig:
    """debug-tiny with another pattern: every sub-config present, so any pattern is valid."""
    return HybridConfig.from_preset("debug-tiny", pattern=pattern, **overrides)
