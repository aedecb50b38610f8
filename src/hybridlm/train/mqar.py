"""Multi-query associative recall (MQAR), as Zoology defines it (Arora, Eyuboglu et al. 2023,
"Zoology: Measuring and improving recall in efficient language models", zoology/data/multiquery_ar.py).

A sequence of T tokens starts with n key-value pairs ``k1 v1 k2 v2 ... kn vn``; keys come from
[1, V/2) and values from [V/2, V), each drawn without replacement. Every key appears once more later,
at an even offset ``2 * gap`` into the rest of the sequence, with gaps drawn without replacement and
p(gap = g) proportional to (g + 1) ** (power_a - 1) (short gaps likely, as repeated bigrams in text).
The label at that query position is the key's value; every other label is IGNORE_INDEX, so the loss
and the recall accuracy read only the query positions. The other positions hold filler: token 0, or
(``random_filler``, Zoology's default) a uniform draw from the whole vocabulary.

    inputs:  k1 v1 k2 v2  f  f  k2  f  f  f  k1  f
    labels:  .  .  .  .   .  .  v2  .  .  .  v1  .      (. = IGNORE_INDEX)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from hybridlm.train.data import IGNORE_INDEX, Split, TrainData

# Rows drawn at once are bounded so a (rows x vocabulary) table of random numbers stays ~32 MB.
_DRAWS_PER_CHUNK = 4_000_000


@dataclass
class MQARConfig:
    vocab_size: int = 8192
    seq_len: int = 64
    num_pairs: int = 4
    power_a: float = 0.01
    random_filler: bool = True
    num_train_examples: int = 20_000
    num_eval_examples: int = 1_000
    seed: int = 0

    def check(self) -> None:
        """A ValueError naming the field when no MQAR sequence of this shape exists."""
        for name in ("vocab_size", "seq_len", "num_pairs", "num_train_examples", "num_eval_examples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MQAR {name} = {value!r}: expected a whole number >= 1")
        if self.seq_len % 2:
            raise ValueError(f"MQAR seq_len = {self.seq_len}: expected an even length (queries sit at even offsets)")
        if 4 * self.num_pairs > self.seq_len:
            raise ValueError(
                f"MQAR num_pairs = {self.num_pairs}: n pairs and their n queries need 4 * n <= seq_len "
                f"({self.seq_len}), so at most {self.seq_len // 4}"
            )
        if self.vocab_size <= self.seq_len:
            raise ValueError(f"MQAR vocab_size = {self.vocab_size}: expected more than seq_len ({self.seq_len})")
        if not (isinstance(self.power_a, int | float) and 0 < self.power_a <= 1 and math.isfinite(self.power_a)):
            raise ValueError(f"MQAR power_a = {self.power_a!r}: expected a number in (0, 1] (1 = uniform gaps)")
        if not isinstance(self.random_filler, bool):
            raise ValueError(f"MQAR random_filler = {self.random_filler!r}: expected true or false")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"MQAR seed = {self.seed!r}: expected a whole number from 0 to 2**63 - 1")

    @property
    def name(self) -> str:
        filler = "random filler" if self.random_filler else "zero filler"
        return f"mqar(V={self.vocab_size}, T={self.seq_len}, pairs={self.num_pairs}, {filler})"


def mqar_data(config: MQARConfig) -> TrainData:
    """Train and held-out splits, each from its own seeded generator (deterministic in ``config.seed``)."""
    config.check()
    train = generate_mqar(config, config.num_train_examples, np.random.default_rng([config.seed, 0]))
    held_out = generate_mqar(config, config.num_eval_examples, np.random.default_rng([config.seed, 1]))
    return TrainData(config.name, config.vocab_size, train, held_out, metric="recall")


def generate_mqar(config: MQARConfig, num_examples: int, rng: np.random.Generator) -> Split:
    """``num_examples`` MQAR sequences drawn from ``rng``: inputs and labels [N, T]."""
    config.check()
    rows_per_chunk = max(1, _DRAWS_PER_CHUNK // config.vocab_size)
    parts = [
        _generate_rows(config, min(rows_per_chunk, num_examples - start), rng)
        for start in range(0, num_examples, rows_per_chunk)
    ]
    inputs = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, config.seq_len), np.int64)
    labels = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, config.seq_len), np.int64)
    return Split(torch.from_numpy(inputs), torch.from_numpy(labels))


def _generate_rows(config: MQARConfig, rows: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    V, T, n = config.vocab_size, config.seq_len, config.num_pairs
    half = V // 2
    keys = 1 + _sample_distinct(rng, rows, half - 1, n)  # [rows, n] in [1, V/2)
    values = half + _sample_distinct(rng, rows, V - half, n)  # [rows, n] in [V/2, V)

    context = 2 * n
    num_gaps = (T - context) // 2  # query slots at even offsets after the pairs
    gap_weights = np.arange(1, num_gaps + 1, dtype=np.float64) ** (config.power_a - 1)
    gaps = _sample_without_replacement(rng, rows, num_gaps, n, gap_weights / gap_weights.sum())
    query_positions = context + 2 * gaps  # [rows, n]

    inputs = np.zeros((rows, T), dtype=np.int64)
    inputs[:, 0:context:2] = keys
    inputs[:, 1:context:2] = values
    np.put_along_axis(inputs, query_positions, keys, axis=1)
    labels = np.full((rows, T), IGNORE_INDEX, dtype=np.int64)
    np.put_along_axis(labels, query_positions, values, axis=1)
    if config.random_filler:
        filler = np.ones((rows, T), dtype=bool)
        filler[:, :context] = False
        np.put_along_axis(filler, query_positions, False, axis=1)
        inputs[filler] = rng.integers(0, V, size=int(filler.sum()))
    return inputs, labels


def _sample_distinct(rng: np.random.Generator, rows: int, population: int, k: int) -> np.ndarray:
    """[rows, k] distinct indices of range(population) per row, uniform over ordered k-tuples.

    For k much smaller than the population (k * k <= population) k independent draws are repeated for
    the rows that drew a duplicate (each row is accepted with probability >= ~0.6), far cheaper than
    ranking the whole population per row.
    """
    if k * k > population:
        return _sample_without_replacement(rng, rows, population, k)
    drawn = rng.integers(0, population, size=(rows, k))
    while True:
        ordered = np.sort(drawn, axis=1)
        has_duplicate = (ordered[:, 1:] == ordered[:, :-1]).any(axis=1)
        if not has_duplicate.any():
            return drawn
        drawn[has_duplicate] = rng.integers(0, population, size=(int(has_duplicate.sum()), k))


def _sample_without_replacement(
    rng: np.random.Generator, rows: int, population: int, k: int, p: np.ndarray | None = None
) -> np.ndarray:
    """[rows, k] distinct indices of range(population) per row, in random order.

    Uniform when ``p`` is None; otherwise successive weighted draws without replacement (as
    ``numpy.random.choice(replace=False, p=p)``), by Efraimidis-Spirakis: the k largest u ** (1 / p_i),
    compared as log(u) / p_i. Sorting the k winners by their keys gives the order of the draws.
    """
    scores = np.log(rng.random((rows, population)))
    if p is not None:
        scores = scores / p
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)
