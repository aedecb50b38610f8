"""TrainConfig: the optimisation settings of one run, checked before anything is built.

The learning rate follows a linear warmup then a cosine decay to ``min_lr_ratio * lr``
(``lr_factor``, the multiplier torch's LambdaLR applies to ``lr`` at each optimizer step).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps
    batch_size: int = 32  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # the cosine decays to min_lr_ratio * lr at the last step
    warmup_steps: int = 100  # linear warmup from lr / warmup_steps to lr
    weight_decay: float = 0.1  # AdamW decay of matrices (not of norms, biases, or the expert bias)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    seed: int = 0  # data order (the model's initial weights are the caller's)
    bf16: bool = False  # bf16 autocast of the forward (see Trainer: on CPU it runs but rarely helps)
    aux_loss_free: bool = False  # DeepSeek-V3 balancing: the router's expert bias follows the load
    bias_update_rate: float = 1e-3  # how far each step moves an expert's bias (DeepSeek-V3's gamma)
    eval_every: int = 0  # evaluate every N steps; 0 = at the end only
    eval_batch_size: int = 0  # 0 = batch_size
    checkpoint_every: int = 0  # write a checkpoint every N steps (with an output directory); 0 = at the end
    stop_at_accuracy: float | None = None  # stop at the first evaluation reaching it (steps-to-accuracy runs)

    def check(self) -> None:
        """A ValueError naming the first bad field and what it expects."""
        for name in ("steps", "batch_size", "grad_accum"):
            _require_int(self, name, low=1)
        for name in ("warmup_steps", "eval_every", "eval_batch_size", "checkpoint_every"):
            _require_int(self, name, low=0)
        _require_int(self, "seed", low=0, high=2**63 - 1)
        if self.warmup_steps > self.steps:
            _fail("warmup_steps", self.warmup_steps, f"at most steps ({self.steps})")
        _require_number(self, "lr", lambda v: v > 0, "a positive number")
        _require_number(self, "min_lr_ratio", lambda v: 0 <= v <= 1, "a number in [0, 1]")
        _require_number(self, "weight_decay", lambda v: v >= 0, "a number >= 0")
        _require_number(self, "eps", lambda v: v > 0, "a positive number")
        _require_number(self, "grad_clip", lambda v: v >= 0, "a number >= 0 (0 = no clipping)")
        _require_number(self, "bias_update_rate", lambda v: v > 0, "a positive number")
        betas = self.betas
        if (
            not isinstance(betas, tuple | list)
            or len(betas) != 2
            or not all(_is_number(b) and 0 <= b < 1 for b in betas)
        ):
            _fail("betas", betas, "two numbers in [0, 1)")
        for name in ("bf16", "aux_loss_free"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "true or false")
        if self.stop_at_accuracy is not None:
            _require_number(self, "stop_at_accuracy", lambda v: 0 < v <= 1, "a number in (0, 1], or None")

    @property
    def micro_batches(self) -> int:
        """Micro-batches drawn over the whole run."""
        return self.steps * self.grad_accum

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["betas"] = list(self.betas)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}; known: {sorted(known)}")
        values = dict(data)
        if isinstance(values.get("betas"), list):
            values["betas"] = tuple(values["betas"])
        return cls(**values)


def lr_factor(step: int, config: TrainConfig) -> float:
    """The multiplier of ``config.lr`` for optimizer step ``step`` (0-based).

    Warmup: (step + 1) / warmup_steps for step < warmup_steps. Then a cosine from 1 towards
    min_lr_ratio: min + (1 - min) * (1 + cos(pi * progress)) / 2 with
    progress = (step - warmup_steps) / (steps - warmup_steps), which reaches 1 just after the last step.
    """
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _require_int(config: TrainConfig, name: str, low: int, high: int | None = None) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        _fail(name, value, f"a whole number >= {low}" + (f" and <= {high}" if high is not None else ""))


def _require_number(config: TrainConfig, name: str, is_ok, expected: str) -> None:
    value = getattr(config, name)
    if not _is_number(value) or not is_ok(value):
        _fail(name, value, expected)


def _fail(name: str, value: Any, expected: str) -> None:
    raise ValueError(f"TrainConfig.{name} = {value!r}: expected {expected}")
