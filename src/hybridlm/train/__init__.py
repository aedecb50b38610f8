"""Training small hybrids: the trainer, its data (MQAR, text) and checkpoints.

Names are imported on first use (PEP 562), so ``import hybridlm.train.cli`` for argument parsing
does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TrainConfig": "hybridlm.train.config",
    "lr_factor": "hybridlm.train.config",
    "Trainer": "hybridlm.train.trainer",
    "TrainResult": "hybridlm.train.trainer",
    "StepRecord": "hybridlm.train.trainer",
    "TrainData": "hybridlm.train.data",
    "Split": "hybridlm.train.data",
    "IGNORE_INDEX": "hybridlm.train.data",
    "MQARConfig": "hybridlm.train.mqar",
    "mqar_data": "hybridlm.train.mqar",
    "generate_mqar": "hybridlm.train.mqar",
    "text_data": "hybridlm.train.text",
    "EvalResult": "hybridlm.train.evaluation",
    "evaluate": "hybridlm.train.evaluation",
    "recall_accuracy": "hybridlm.train.evaluation",
    "read_checkpoint": "hybridlm.train.checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'hybridlm.train' has no attribute {name!r}")
