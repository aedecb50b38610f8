"""Training runs in the trace database: the Tracer's forward block timing and routing counts, plus
each block's backward time, so ``hybridlm report`` decomposes a training step per layer type.

Forward: the Tracer on the model's block hook point, one ``tracer.step("train")`` around each
optimizer step's forward and backward passes (phase ``train``). Backward: two module hooks per block,
registered from outside the model: ``register_full_backward_pre_hook`` fires when the gradient of the
block's output is ready (its backward starts), ``register_full_backward_hook`` when the gradient of
its input is complete (its backward ends, the residual branch included). The interval is recorded as
a call of layer type ``<layer type>_backward`` (``mamba2_backward``, ``attention_backward``, ...) in
the same step, timed with the Tracer's clock (CUDA events on a GPU), so forward and backward of a
layer type are separate rows of the report.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from hybridlm.model import HybridLM
from hybridlm.trace.recorder import Tracer
from hybridlm.trace.store import TraceStore

BACKWARD_SUFFIX = "_backward"


class TrainTrace:
    """A training run recorded into the trace database at ``path`` (a new run in that file)."""

    def __init__(
        self, path: str | os.PathLike, model: HybridLM, model_name: str, notes: dict, command: str, first_step: int
    ) -> None:
        self.store = TraceStore(Path(path))
        device = str(model.device)
        if model.device.type == "cuda":
            device = f"{device} ({torch.cuda.get_device_name(model.device)})"
        self.tracer = Tracer(
            self.store,
            model=model_name,
            device=device,
            config=model.config.to_dict(),
            command=command,
            notes=json.dumps(notes),
        )
        self.tracer.attach(model)
        self.tracer.step_index = first_step - 1  # trace steps are the run's optimizer steps, also after a resume
        self._hooks = _register_backward_timers(model, self.tracer)

    @property
    def run_id(self) -> str:
        return self.tracer.run_id

    @contextmanager
    def step(self) -> Iterator[None]:
        with self.tracer.step("train"):
            yield

    def close(self, complete: bool) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        try:
            self.tracer.close(complete=complete)
        finally:
            self.store.close()


def _register_backward_timers(model: HybridLM, tracer: Tracer) -> list[torch.utils.hooks.RemovableHandle]:
    handles = []
    for block in model.layers:
        timer = _BackwardTimer(block.index, block.layer_type + BACKWARD_SUFFIX, tracer)
        handles.append(block.register_full_backward_pre_hook(timer.before))
        handles.append(block.register_full_backward_hook(timer.after))
    return handles


class _BackwardTimer:
    def __init__(self, index: int, layer_type: str, tracer: Tracer) -> None:
        self.index, self.layer_type, self.tracer = index, layer_type, tracer
        self._start: object = None

    def before(self, module: nn.Module, grad_output: tuple) -> None:
        self._start = self.tracer.timestamp()

    def after(self, module: nn.Module, grad_input: tuple, grad_output: tuple) -> None:
        if self._start is not None:  # a backward outside a traced step is not recorded
            self.tracer.record_call(self.index, self.layer_type, self._start, self.tracer.timestamp())
        self._start = None
