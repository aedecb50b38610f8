"""Held-out evaluation: mean loss, accuracy at the scored positions, perplexity.

For MQAR the scored positions are the queries, so the accuracy is the recall accuracy; for text every
position is scored and the number to read is the perplexity, exp(mean next-token loss).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from hybridlm.model import HybridLM
from hybridlm.train.data import IGNORE_INDEX, TrainData


@dataclass
class EvalResult:
    step: int
    loss: float  # mean cross-entropy over the scored positions (nats)
    accuracy: float  # arg-max == label over the scored positions (MQAR: recall accuracy)
    num_scored: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf

    def to_dict(self) -> dict:
        return {**asdict(self), "perplexity": self.perplexity}


def count_correct(logits: Tensor, labels: Tensor) -> tuple[int, int]:
    """(correct arg-max predictions, scored positions) over the positions whose label is not IGNORE_INDEX.

    logits: [B, T, V], labels: [B, T].
    """
    scored = labels != IGNORE_INDEX
    correct = (logits.argmax(dim=-1) == labels) & scored
    return int(correct.sum()), int(scored.sum())


def recall_accuracy(logits: Tensor, labels: Tensor) -> float:
    """Share of scored positions where the arg-max of ``logits`` [B, T, V] equals the label [B, T]:
    MQAR's recall accuracy, read only at the query positions (every other label is IGNORE_INDEX)."""
    correct, total = count_correct(logits, labels)
    if total == 0:
        raise ValueError("recall_accuracy: the labels score no position (all are IGNORE_INDEX)")
    return correct / total


@torch.no_grad()
def evaluate(model: HybridLM, data: TrainData, batch_size: int, step: int = 0) -> EvalResult:
    """The held-out split through ``model`` in eval mode (restored to its previous mode after)."""
    was_training = model.training
    model.eval()
    observer, model.block_observer = model.block_observer, None  # a tracer records training steps only
    total_loss, correct, scored = 0.0, 0, 0
    try:
        for inputs, labels in data.eval_batches(batch_size):
            inputs, labels = inputs.to(model.device), labels.to(model.device)
            logits = model(inputs).logits.float()
            total_loss += float(
                F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
            )
            batch_correct, batch_scored = count_correct(logits, labels)
            correct, scored = correct + batch_correct, scored + batch_scored
    finally:
        model.block_observer = observer
        model.train(was_training)
    if scored == 0:
        raise ValueError(f"{data.name}: the held-out split scores no position (every label is IGNORE_INDEX)")
    return EvalResult(step=step, loss=total_loss / scored, accuracy=correct / scored, num_scored=scored)
