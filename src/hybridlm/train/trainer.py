"""Trainer: AdamW, warmup + cosine learning rate, clipping, accumulation, MoE balancing, checkpoints.

    trainer = Trainer(model, data, TrainConfig(steps=300, lr=3e-3), out_dir="run")
    result = trainer.train()              # or train(until_step=k), then Trainer(...).resume(path)
    result.final_eval.accuracy            # MQAR recall; .perplexity for text

A step draws ``grad_accum`` micro-batches at the data position (batches are a pure function of it),
runs forward and backward on each with loss = cross-entropy at the scored positions + the model's MoE
balancing and z losses (``HybridOutput.aux_loss``, training mode), divided by ``grad_accum``; then
clips the global gradient norm, steps AdamW and the schedule, and with ``aux_loss_free`` moves each
router's expert bias by the load it saw (``balancing.update_expert_bias``). Everything a step depends
on is in the checkpoint, so on CPU a resumed run repeats the uninterrupted one bit for bit.

One Trainer is one run, in process and with no global state besides torch's RNGs (saved and restored
with a checkpoint), so an ablation can build and run many in a loop.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR

from hybridlm.model import HybridLM
from hybridlm.train.balancing import ExpertLoad, check_aux_loss_free, update_expert_bias
from hybridlm.train.checkpoint import (
    CHECKPOINT_NAME,
    capture_rng_states,
    read_checkpoint,
    restore_rng_states,
    write_checkpoint,
)
from hybridlm.train.config import TrainConfig, lr_factor
from hybridlm.train.data import IGNORE_INDEX, TrainData
from hybridlm.train.evaluation import EvalResult, evaluate
from hybridlm.train.progress import TrainProgress

if TYPE_CHECKING:
    from hybridlm.train.tracing import TrainTrace

# Settings a resumed run may change: they decide when to look, not what is computed.
RESUMABLE_CHANGES = ("eval_every", "eval_batch_size", "checkpoint_every", "stop_at_accuracy")


@dataclass
class StepRecord:
    step: int  # the optimizer step just taken (1-based)
    loss: float  # mean cross-entropy of the step's micro-batches (without the MoE losses)
    aux_loss: float  # mean MoE balancing + z loss of the step's micro-batches (0 without MoE)
    lr: float  # learning rate the step used
    grad_norm: float  # global gradient norm before clipping
    tokens: int  # tokens in the step's micro-batches
    seconds: float  # wall time of the step
    expert_max_over_mean: float | None  # max / mean tokens per expert, mean over MoE blocks

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class TrainResult:
    history: list[StepRecord]
    evals: list[EvalResult]
    steps_done: int
    stopped_early: bool = False  # reached stop_at_accuracy before the last step
    checkpoint: Path | None = None
    trace_run_id: str | None = None
    steps_to_accuracy: int | None = field(default=None)  # first evaluated step at stop_at_accuracy

    @property
    def final_eval(self) -> EvalResult | None:
        return self.evals[-1] if self.evals else None

    @property
    def losses(self) -> list[float]:
        return [record.loss for record in self.history]


class Trainer:
    def __init__(
        self,
        model: HybridLM,
        data: TrainData,
        config: TrainConfig,
        *,
        out_dir: str | Path | None = None,
        trace_path: str | Path | None = None,
        model_name: str = "model",
        command: str = "",
        log: Callable[[str], None] | None = None,
        show_progress: bool = True,
    ) -> None:
        """``out_dir``: checkpoints go to ``out_dir/checkpoint.pt``; ``trace_path``: a trace database to
        record the run into; ``log``: receives one line per evaluation and checkpoint; ``show_progress``:
        a progress bar on stderr when it is a terminal (an ablation running many short runs turns it off)."""
        config.check()
        data.check_fits(config.batch_size)
        if data.vocab_size > model.config.vocab_size:
            raise ValueError(
                f"{data.name} has a vocabulary of {data.vocab_size} tokens, more than the model's "
                f"vocab_size {model.config.vocab_size}"
            )
        if config.aux_loss_free:
            check_aux_loss_free(model)
        if config.bf16:
            check_bf16(model.device)
        self.model, self.data, self.config = model, data, config
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.trace_path, self.model_name, self.command = trace_path, model_name, command
        self.log = log or (lambda line: None)
        self.show_progress = show_progress
        self.optimizer = build_optimizer(model, config)
        self.scheduler = LambdaLR(self.optimizer, lambda step: lr_factor(step, config))
        self.step = 0
        self.data_position = 0  # micro-batches drawn so far
        self.history: list[StepRecord] = []
        self.evals: list[EvalResult] = []
        self.load = ExpertLoad(model)

    # -- running ---------------------------------------------------------------------------------

    def train(self, until_step: int | None = None) -> TrainResult:
        """Train to ``config.steps`` (or stop after ``until_step``, as an interrupted run would);
        evaluates every ``eval_every`` steps and at the last step, checkpoints every
        ``checkpoint_every`` steps and where it stops."""
        target = self.config.steps if until_step is None else min(until_step, self.config.steps)
        result = TrainResult(self.history, self.evals, self.step)
        trace = self._open_trace() if self.trace_path is not None else None
        result.trace_run_id = None if trace is None else trace.run_id
        complete = False
        try:
            description = f"training {self.model_name}"
            with TrainProgress(description, self.config.steps, self.step, enabled=self.show_progress) as bar:
                while self.step < target:
                    record = self.train_step(trace)
                    bar.update(record.step, record.loss, record.tokens_per_second, record.expert_max_over_mean)
                    if self._after_step(result, is_last=self.step == self.config.steps):
                        break
            complete = True
        finally:
            if trace is not None:
                trace.close(complete=complete)
        if self.out_dir is not None:
            result.checkpoint = self.save_checkpoint()
        result.steps_done = self.step
        return result

    def _after_step(self, result: TrainResult, is_last: bool) -> bool:
        """Evaluate and checkpoint when due; True to stop (stop_at_accuracy reached)."""
        every = self.config.eval_every
        if is_last or (every and self.step % every == 0):
            evaluation = self.evaluate()
            target = self.config.stop_at_accuracy
            if target is not None and evaluation.accuracy >= target and result.steps_to_accuracy is None:
                result.steps_to_accuracy = self.step
                result.stopped_early = not is_last
                return True
        every = self.config.checkpoint_every
        if self.out_dir is not None and every and self.step % every == 0 and not is_last:
            self.save_checkpoint()
        return False

    def train_step(self, trace: TrainTrace | None = None) -> StepRecord:
        """One optimizer step over ``grad_accum`` micro-batches."""
        config, model = self.config, self.model
        model.train()
        started = time.perf_counter()
        self.load.reset()
        losses, aux_losses = [], []
        with trace.step() if trace is not None else contextlib.nullcontext():
            for _ in range(config.grad_accum):
                inputs, labels = self.data.batch(self.data_position, config.batch_size, config.seed)
                self.data_position += 1
                inputs, labels = inputs.to(model.device), labels.to(model.device)
                with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=config.bf16):
                    output = model(inputs)
                loss = F.cross_entropy(output.logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
                aux = output.aux_loss.float() if output.aux_loss is not None else torch.zeros((), device=loss.device)
                ((loss + aux) / config.grad_accum).backward()
                self.load.add_last_forward()
                losses.append(loss.detach())
                aux_losses.append(aux.detach())
        max_norm = config.grad_clip if config.grad_clip > 0 else math.inf  # inf: measure, scale by 1.0
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self._trained_parameters(), max_norm))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if config.aux_loss_free:
            update_expert_bias(model, self.load, config.bias_update_rate)
        self.step += 1
        loss_value = float(torch.stack(losses).mean())
        if not math.isfinite(loss_value):
            raise ValueError(
                f"training diverged at step {self.step}: the loss is {loss_value}; lower lr ({config.lr}) "
                f"or raise warmup_steps ({config.warmup_steps})"
            )
        record = StepRecord(
            step=self.step,
            loss=loss_value,
            aux_loss=float(torch.stack(aux_losses).mean()),
            lr=lr,
            grad_norm=grad_norm,
            tokens=config.grad_accum * config.batch_size * self.data.train.seq_len,
            seconds=time.perf_counter() - started,
            expert_max_over_mean=self.load.max_over_mean(),
        )
        self.history.append(record)
        return record

    def evaluate(self) -> EvalResult:
        """The held-out split now; appended to ``evals`` and logged."""
        batch_size = self.config.eval_batch_size or self.config.batch_size
        with torch.autocast(self.model.device.type, dtype=torch.bfloat16, enabled=self.config.bf16):
            result = evaluate(self.model, self.data, batch_size, step=self.step)
        self.evals.append(result)
        metric = (
            f"recall {result.accuracy:.4f}"
            if self.data.metric == "recall"
            else f"perplexity {result.perplexity:.3f} (loss {result.loss:.4f})"
        )
        self.log(f"step {self.step}/{self.config.steps}: held-out {metric}")
        return result

    def _trained_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _open_trace(self) -> TrainTrace:
        from hybridlm.train.tracing import TrainTrace

        notes = {"train_config": self.config.to_dict(), "data": self.data.name, "first_step": self.step}
        return TrainTrace(self.trace_path, self.model, self.model_name, notes, self.command, first_step=self.step)

    # -- checkpoints -----------------------------------------------------------------------------

    def save_checkpoint(self, path: str | Path | None = None) -> Path:
        """Everything the next step depends on, written atomically (default: ``out_dir/checkpoint.pt``)."""
        if path is None:
            if self.out_dir is None:
                raise ValueError("save_checkpoint needs a path, or a Trainer built with out_dir")
            path = self.out_dir / CHECKPOINT_NAME
        payload = {
            "step": self.step,
            "data_position": self.data_position,
            "train_config": self.config.to_dict(),
            "model_config": self.model.config.to_json(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": capture_rng_states(),
            "history": [asdict(record) for record in self.history],
            "evals": [asdict(result) for result in self.evals],
        }
        written = write_checkpoint(path, payload)
        self.log(f"step {self.step}: checkpoint {written}")
        return written

    def resume(self, path: str | Path) -> None:
        """Continue from the checkpoint at ``path`` (a file, or a directory holding checkpoint.pt): the
        same model config and training settings (bar RESUMABLE_CHANGES) are required."""
        path = Path(path)
        if path.is_dir():
            path = path / CHECKPOINT_NAME
        payload = read_checkpoint(path)
        self._check_same_run(path, payload)
        try:
            self.model.load_state_dict(payload["model"])
            self.optimizer.load_state_dict(payload["optimizer"])
            self.scheduler.load_state_dict(payload["scheduler"])
            restore_rng_states(payload["rng"])
            history = [StepRecord(**record) for record in payload["history"]]
            evals = [EvalResult(**result) for result in payload["evals"]]
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as error:
            raise ValueError(f"{path}: the checkpoint does not fit this run: {error}") from None
        self.step, self.data_position = payload["step"], payload["data_position"]
        self.history[:], self.evals[:] = history, evals
        self.log(f"resumed from {path} at step {self.step}")

    def _check_same_run(self, path: Path, payload: dict) -> None:
        try:
            saved_model = json.loads(payload["model_config"])
            saved = TrainConfig.from_dict(payload["train_config"]).to_dict()
        except (ValueError, TypeError) as error:
            raise ValueError(f"{path}: unreadable configs in the checkpoint ({error})") from None
        if saved_model != json.loads(self.model.config.to_json()):
            raise ValueError(f"{path}: the checkpoint was written for another model config than this run's")
        current = self.config.to_dict()
        for name, value in saved.items():
            if name not in RESUMABLE_CHANGES and current[name] != value:
                raise ValueError(
                    f"{path}: the checkpoint was written with {name} = {value!r}, this run has {current[name]!r}; "
                    f"resume with the same training settings"
                )
        if payload["step"] > self.config.steps:
            raise ValueError(f"{path}: the checkpoint is at step {payload['step']}, past steps ({self.config.steps})")
        if payload["data_position"] != payload["step"] * self.config.grad_accum:
            raise ValueError(
                f"{path}: data position {payload['data_position']} does not match step {payload['step']} x "
                f"grad_accum {self.config.grad_accum}"
            )


def build_optimizer(model: HybridLM, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm weights, biases, scalars per head are not decayed;
    the router's expert bias has no gradient and is left out)."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        (decay if parameter.dim() >= 2 else no_decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps)


def check_bf16(device: torch.device) -> None:
    """A ValueError where bf16 autocast cannot run. On CPU it runs (matmuls in bf16 through oneDNN) but is
    usually slower than fp32 unless the CPU has AVX512-BF16 or AMX; it is allowed there for numerics tests."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"bf16 autocast: {torch.cuda.get_device_name(device)} does not support bfloat16")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"bf16 autocast is supported on cpu and cuda, not {device.type}")
