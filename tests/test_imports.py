"""Importing one piece of hybridlm loads that piece, not the whole package."""

import subprocess
import sys

import pytest


def _modules_after(statement: str) -> set[str]:
    code = f"{statement}\nimport sys\nprint(' '.join(m for m in sys.modules if m.startswith('hybridlm')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


@pytest.mark.parametrize(
    ("statement", "unwanted"),
    [
        ("import hybridlm.ops.ssd", {"hybridlm.model", "hybridlm.checkpoints", "hybridlm.trace", "hybridlm.config"}),
        ("import hybridlm.config", {"hybridlm.model", "hybridlm.checkpoints", "hybridlm.trace", "hybridlm.presets"}),
        ("import hybridlm", {"hybridlm.model", "hybridlm.config", "hybridlm.checkpoints"}),
    ],
)
def test_import_loads_only_what_it_needs(statement, unwanted):
    assert not _modules_after(statement) & unwanted


def test_package_names_resolve_on_first_use():
    loaded = _modules_after("import hybridlm\nhybridlm.HybridLM\nhybridlm.get_preset")
    assert {"hybridlm.model", "hybridlm.presets"} <= loaded
