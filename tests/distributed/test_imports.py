"""Nothing of expert parallelism runs unless asked.

torch 2.13 itself imports ``torch.distributed`` at ``import torch``, so "a single-process model imports
no torch.distributed" is checked as: a model that runs forward, decode and generate loads no
``hybridlm.distributed``, starts no process group, and none of the hybridlm modules it loaded names
``torch.distributed``.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import hybridlm

SINGLE_PROCESS_RUN = """
import json, sys, torch, hybridlm
model = hybridlm.HybridLM(hybridlm.get_preset("debug-tiny", pattern="ME*E"))
cache = model.new_cache(batch_size=1, max_seq_len=8)
model(torch.tensor([[1, 2, 3]]), cache=cache)
model.decode_step(torch.tensor([4]), cache)
hybridlm.generate(model, [[1, 2]], max_new_tokens=2)
files = {name: m.__file__ for name, m in sys.modules.items() if name.startswith("hybridlm")}
print(json.dumps({"files": files, "process_group": torch.distributed.is_initialized()}))
"""


def _names_torch_distributed(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import) and any(a.name.startswith("torch.distributed") for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.distributed"):
            return True
        if (
            isinstance(node, ast.ImportFrom)
            and node.module == "torch"
            and any(a.name == "distributed" for a in node.names)
        ):
            return True
        if isinstance(node, ast.Attribute) and node.attr == "distributed" and ast.unparse(node.value) == "torch":
            return True
    return False


def test_single_process_model_loads_no_expert_parallelism():
    run = subprocess.run([sys.executable, "-c", SINGLE_PROCESS_RUN], capture_output=True, text=True, check=True)
    loaded = json.loads(run.stdout)
    assert not loaded["process_group"]
    assert "hybridlm.model" in loaded["files"]
    assert [name for name in loaded["files"] if name.startswith("hybridlm.distributed")] == []
    assert [name for name, file in loaded["files"].items() if _names_torch_distributed(Path(file))] == []


def test_the_check_sees_a_module_that_names_torch_distributed():
    package = Path(hybridlm.__file__).resolve().parent
    assert _names_torch_distributed(package / "distributed" / "exchange.py")
    assert not _names_torch_distributed(package / "model.py")
