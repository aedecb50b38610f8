"""Running an ablation: every variant on MQAR and on text, a learning-rate sweep, then more seeds.

The protocol, per variant and per task:
  1. the learning-rate sweep: seed 0 at every learning rate of ``lrs``;
  2. the best of them (MQAR: fewest steps to the target recall, else the highest final recall;
     text: the lowest held-out perplexity) is run again with seeds 1 .. seeds - 1.
The seed sets the initial weights, the order of the batches and (MQAR) the data set itself. The
per-seed numbers are therefore the best learning rate's runs; seed 0 also chose that rate, a small
optimistic bias the summary states. MQAR runs stop at the first evaluation reaching the target recall
(steps to it are a multiple of ``eval_every``); text runs train a fixed number of steps.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from hybridlm.model import HybridLM
from hybridlm.train.ablation.variants import SizedVariant, Variant, equal_parameter_models
from hybridlm.train.config import TrainConfig
from hybridlm.train.data import Split, TrainData
from hybridlm.train.mqar import MQARConfig, mqar_data
from hybridlm.train.trainer import Trainer

TASKS = ("mqar", "text")


@dataclass
class AblationSettings:
    sweep: str  # ratio, placement or mixer
    variants: list[Variant]
    width: int = 128  # the first variant's width; the others are matched to its parameters
    lrs: tuple[float, ...] = (1e-3, 3e-3)
    seeds: int = 3
    batch_size: int = 32
    mqar: MQARConfig = field(default_factory=MQARConfig)  # its seed is replaced by each run's
    mqar_steps: int = 1000  # the step budget of an MQAR run
    target_recall: float = 0.9
    eval_every: int = 25
    text_steps: int = 300
    text_seq_len: int = 64
    text_eval_examples: int = 256  # held-out windows scored for perplexity (the start of the held-out tail)
    tasks: tuple[str, ...] = TASKS
    device: str = "cpu"

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["variants"] = [dataclasses.asdict(v) for v in self.variants]
        data["lrs"], data["tasks"] = list(self.lrs), list(self.tasks)
        return data


@dataclass
class RunRecord:
    variant: str
    pattern: str
    task: str  # mqar or text
    lr: float
    seed: int
    phase: str  # "lr sweep" (seed 0, every lr) or "seeds" (the best lr, the other seeds)
    num_params: int
    hidden_size: int
    steps_done: int
    steps_to_target: int | None  # MQAR: first evaluated step at the target recall; None if never
    tokens_to_target: int | None  # training tokens up to that step
    final_recall: float | None  # MQAR: held-out recall where the run ended
    perplexity: float | None  # text: held-out perplexity at the last step
    seconds: float


@dataclass
class TaskData:
    """The data sets of one ablation: MQAR per seed (built on demand) and the text corpus."""

    mqar: MQARConfig
    text: TrainData | None
    _mqar_by_seed: dict[int, TrainData] = field(default_factory=dict)

    def mqar_for_seed(self, seed: int) -> TrainData:
        if seed not in self._mqar_by_seed:
            self._mqar_by_seed[seed] = mqar_data(dataclasses.replace(self.mqar, seed=seed))
        return self._mqar_by_seed[seed]

    def vocab_size(self, task: str) -> int:
        return self.mqar.vocab_size if task == "mqar" else self.text.vocab_size


def trim_held_out(data: TrainData, num_examples: int) -> TrainData:
    """``data`` scoring only the first ``num_examples`` held-out windows (perplexity over a large corpus's
    whole held-out tail would cost more than the training)."""
    held_out = Split(data.eval.inputs[:num_examples], data.eval.labels[:num_examples])
    return TrainData(data.name, data.vocab_size, data.train, held_out, data.metric)


def run_ablation(settings: AblationSettings, data: TaskData, log: Callable[[str], None]) -> dict[str, Any]:
    """Every run of the protocol; returns {"models": {task: [...]}, "runs": [RunRecord as dicts]}."""
    runs: list[dict[str, Any]] = []
    models: dict[str, list[SizedVariant]] = {
        task: equal_parameter_models(settings.variants, settings.width, data.vocab_size(task))
        for task in settings.tasks
    }
    total = len(settings.tasks) * len(settings.variants) * (len(settings.lrs) + settings.seeds - 1)

    def run_and_log(task: str, sized: SizedVariant, lr: float, seed: int, phase: str) -> dict[str, Any]:
        record = _run(settings, data, task, sized, lr, seed, phase)
        runs.append(dataclasses.asdict(record))
        log(f"[{len(runs)}/{total}] {settings.sweep} {sized.variant.name} ({sized.variant.pattern}) {task} "
            f"lr {lr:g} seed {seed}: {_outcome(record, settings.target_recall)} ({record.seconds:.0f} s)")  # fmt: skip
        return runs[-1]

    for task in settings.tasks:
        for sized in models[task]:
            sweep = [run_and_log(task, sized, lr, 0, "lr sweep") for lr in settings.lrs]
            best = min(sweep, key=selection_key)["lr"]
            for seed in range(1, settings.seeds):
                run_and_log(task, sized, best, seed, "seeds")
    return {"models": {task: [_model_entry(s) for s in sized] for task, sized in models.items()}, "runs": runs}


def selection_key(run: dict[str, Any]) -> tuple:
    """Smaller is better: MQAR by steps to the target (runs that reach it first), then final recall;
    text by perplexity. ``run`` is a RunRecord as a dict (as the JSON holds it)."""
    if run["task"] == "mqar":
        steps = run["steps_to_target"]
        return (0, steps, 0.0) if steps is not None else (1, 0, -run["final_recall"])
    return (0, run["perplexity"], 0.0)


def _model_entry(sized: SizedVariant) -> dict[str, Any]:
    return {
        "variant": sized.variant.name,
        "pattern": sized.variant.pattern,
        "hidden_size": sized.hidden_size,
        "num_params": sized.num_params,
    }


def _run(
    settings: AblationSettings, data: TaskData, task: str, sized: SizedVariant, lr: float, seed: int, phase: str
) -> RunRecord:
    """One training run from fresh weights (seeded), evaluated on the task's held-out split."""
    task_data = data.mqar_for_seed(seed) if task == "mqar" else data.text
    torch.manual_seed(seed)
    with torch.device(settings.device):
        model = HybridLM(sized.config(task_data.vocab_size))
    trainer = Trainer(model, task_data, _train_config(settings, task, lr, seed), show_progress=False)
    started = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - started
    reached = result.steps_to_accuracy if task == "mqar" else None
    return RunRecord(
        variant=sized.variant.name,
        pattern=sized.variant.pattern,
        task=task,
        lr=lr,
        seed=seed,
        phase=phase,
        num_params=sized.num_params,
        hidden_size=sized.hidden_size,
        steps_done=result.steps_done,
        steps_to_target=reached,
        tokens_to_target=None if reached is None else sum(r.tokens for r in result.history[:reached]),
        final_recall=result.final_eval.accuracy if task == "mqar" else None,
        perplexity=result.final_eval.perplexity if task == "text" else None,
        seconds=round(seconds, 2),
    )


def _outcome(record: RunRecord, target: float) -> str:
    if record.task == "text":
        return f"perplexity {record.perplexity:.3f}"
    if record.steps_to_target is not None:
        return f"recall {record.final_recall:.3f}, {target:.0%} at step {record.steps_to_target}"
    return f"recall {record.final_recall:.3f} after {record.steps_done} steps"


def _train_config(settings: AblationSettings, task: str, lr: float, seed: int) -> TrainConfig:
    steps = settings.mqar_steps if task == "mqar" else settings.text_steps
    return TrainConfig(
        steps=steps,
        batch_size=settings.batch_size,
        lr=lr,
        warmup_steps=min(100, steps // 10),
        weight_decay=0.0 if task == "mqar" else 0.1,
        seed=seed,
        eval_every=settings.eval_every if task == "mqar" else 0,
        stop_at_accuracy=settings.target_recall if task == "mqar" else None,
    )
