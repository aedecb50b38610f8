"""What the trainer reads: examples of (inputs, labels) split into train and held-out parts.

Every data set (MQAR, text) is materialised as two ``Split``s of equal-length sequences. Training
batches are a pure function of a position (the number of batches drawn so far), so a checkpoint
only needs that one integer to continue with exactly the batches an uninterrupted run would draw:
example ``g`` of the stream is example ``perm_e[g % N]`` of the train split, where ``e = g // N`` is
its epoch and ``perm_e`` a permutation seeded by (seed, e).

Labels hold the next token to predict at each position, or ``IGNORE_INDEX`` where nothing is scored
(MQAR scores only the query positions; text scores every position).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

IGNORE_INDEX = -100  # labels that no loss or metric reads (torch's cross_entropy default)


@dataclass
class Split:
    """Examples of one split: inputs [N, T] int64 token ids, labels [N, T] int64 (IGNORE_INDEX = unscored)."""

    inputs: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        if self.inputs.dim() != 2 or self.inputs.shape != self.labels.shape:
            raise ValueError(
                f"a split needs inputs and labels of one shape [N, T], got {tuple(self.inputs.shape)} "
                f"and {tuple(self.labels.shape)}"
            )

    @property
    def num_examples(self) -> int:
        return self.inputs.shape[0]

    @property
    def seq_len(self) -> int:
        return self.inputs.shape[1]


@dataclass
class TrainData:
    """A named data set: its vocabulary, its splits, and what its evaluation reports.

    ``metric`` is "recall" (accuracy at the scored positions is the result: MQAR) or "perplexity"
    (exp of the mean held-out loss: text).
    """

    name: str
    vocab_size: int
    train: Split
    eval: Split
    metric: str

    def __post_init__(self) -> None:
        if self.metric not in ("recall", "perplexity"):
            raise ValueError(f"{self.name}: metric must be 'recall' or 'perplexity', got {self.metric!r}")
        if self.eval.num_examples == 0:
            raise ValueError(f"{self.name}: the held-out split is empty; give more data or a larger held-out share")
        self._order_key: tuple[int, int] | None = None
        self._order = np.empty(0, dtype=np.int64)

    def check_fits(self, batch_size: int) -> None:
        """A ValueError when the train split holds fewer examples than one batch."""
        if self.train.num_examples < batch_size:
            raise ValueError(
                f"{self.name}: the train split has {self.train.num_examples} examples of {self.train.seq_len} tokens, "
                f"fewer than one batch (batch_size {batch_size}); give more data, shorter sequences or a smaller batch"
            )

    def batch(self, position: int, batch_size: int, seed: int) -> tuple[Tensor, Tensor]:
        """The ``position``-th training batch of ``batch_size`` examples: inputs, labels [B, T]."""
        size = self.train.num_examples
        stream = np.arange(position * batch_size, (position + 1) * batch_size)
        rows = np.empty(batch_size, dtype=np.int64)
        for epoch in np.unique(stream // size):  # a batch may straddle two epochs
            in_epoch = stream // size == epoch
            rows[in_epoch] = self._epoch_order(int(epoch), seed)[stream[in_epoch] % size]
        index = torch.from_numpy(rows)
        return self.train.inputs[index], self.train.labels[index]

    def _epoch_order(self, epoch: int, seed: int) -> np.ndarray:
        if self._order_key != (seed, epoch):  # a cache only: the order depends on (seed, epoch) alone
            self._order = np.random.default_rng([seed, epoch]).permutation(self.train.num_examples)
            self._order_key = (seed, epoch)
        return self._order

    def eval_batches(self, batch_size: int) -> list[tuple[Tensor, Tensor]]:
        """The held-out split in order, in batches of at most ``batch_size``."""
        return [
            (self.eval.inputs[start : start + batch_size], self.eval.labels[start : start + batch_size])
            for start in range(0, self.eval.num_examples, batch_size)
        ]
