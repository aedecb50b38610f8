"""Shared test helpers."""

from pathlib import Path

from hybridlm.config import HybridConfig


def tiny_config(pattern: str = "MEGm*-EM", **overrides) -> HybridConfig:
    """debug-tiny with another pattern: every sub-config present, so any pattern is valid."""
    return HybridConfig.from_preset("debug-tiny", pattern=pattern, **overrides)


def fixtures_dir() -> Path:
    """The real-trace fixtures kept in the repository: tests/fixtures, beside this file."""
    return Path(__file__).resolve().parent / "fixtures"


FIXTURES = fixtures_dir()
