"""The MQAR generator against Zoology's definition, and recall accuracy recomputed by hand."""

import numpy as np
import pytest
import torch

from hybridlm.train.data import IGNORE_INDEX
from hybridlm.train.evaluation import count_correct, recall_accuracy
from hybridlm.train.mqar import MQARConfig, generate_mqar, mqar_data


def _generate(num_examples=200, seed=0, **fields):
    config = MQARConfig(**{"vocab_size": 128, "seq_len": 64, "num_pairs": 8, **fields})
    return config, generate_mqar(config, num_examples, np.random.default_rng(seed))


@pytest.mark.parametrize("random_filler", [True, False])
def test_pairs_come_first_with_keys_and_values_from_disjoint_halves(random_filler):
    config, split = _generate(random_filler=random_filler)
    n, half = config.num_pairs, config.vocab_size // 2
    keys, values = split.inputs[:, 0 : 2 * n : 2], split.inputs[:, 1 : 2 * n : 2]
    assert bool(((keys >= 1) & (keys < half)).all())
    assert bool(((values >= half) & (values < config.vocab_size)).all())
    for row in range(split.num_examples):  # drawn without replacement: n distinct keys and n distinct values
        assert len(set(keys[row].tolist())) == n
        assert len(set(values[row].tolist())) == n


@pytest.mark.parametrize("random_filler", [True, False])
def test_each_key_is_queried_once_later_and_its_label_is_its_value(random_filler):
    config, split = _generate(random_filler=random_filler)
    n = config.num_pairs
    for row in range(split.num_examples):
        inputs, labels = split.inputs[row].tolist(), split.labels[row].tolist()
        pairs = dict(zip(inputs[0 : 2 * n : 2], inputs[1 : 2 * n : 2], strict=True))
        scored = [t for t, label in enumerate(labels) if label != IGNORE_INDEX]
        assert len(scored) == n  # one query per key
        assert all(t >= 2 * n and (t - 2 * n) % 2 == 0 for t in scored)  # after the pairs, at even offsets
        assert sorted(inputs[t] for t in scored) == sorted(pairs)  # the queries are the keys ...
        assert all(labels[t] == pairs[inputs[t]] for t in scored)  # ... labelled with their values


def test_filler_is_zero_or_random_as_asked():
    config, zeros = _generate(random_filler=False, seed=3)
    _, random = _generate(random_filler=True, seed=3)
    filler = zeros.labels == IGNORE_INDEX
    filler[:, : 2 * config.num_pairs] = False
    assert bool((zeros.inputs[filler] == 0).all())
    assert float((random.inputs[filler] == 0).float().mean()) < 0.05  # uniform over 128 tokens
    assert int(random.inputs[filler].max()) == config.vocab_size - 1  # filler spans the whole vocabulary


def test_query_gaps_follow_a_power_law():
    config, split = _generate(num_examples=2000, seq_len=64, num_pairs=2, power_a=0.01)
    positions = (split.labels != IGNORE_INDEX).nonzero()[:, 1]
    gaps = ((positions - 2 * config.num_pairs) // 2).numpy()
    counts = np.bincount(gaps, minlength=30)
    # p(g) ~ (g + 1) ** -0.99: the first gap is drawn ~ 30x as often as the last (without replacement
    # flattens it somewhat); uniform gaps (power_a = 1) would make these equal
    assert counts[0] > 5 * counts[-1] and counts[0] > counts[1] > counts[3]
    _, uniform = _generate(num_examples=2000, seq_len=64, num_pairs=2, power_a=1.0)
    uniform_gaps = (((uniform.labels != IGNORE_INDEX).nonzero()[:, 1] - 4) // 2).numpy()
    assert np.bincount(uniform_gaps).min() > 0.6 * np.bincount(uniform_gaps).max()


def test_same_seed_same_data_other_seed_other_data():
    first = mqar_data(MQARConfig(vocab_size=64, seq_len=32, num_train_examples=50, num_eval_examples=20, seed=7))
    again = mqar_data(MQARConfig(vocab_size=64, seq_len=32, num_train_examples=50, num_eval_examples=20, seed=7))
    other = mqar_data(MQARConfig(vocab_size=64, seq_len=32, num_train_examples=50, num_eval_examples=20, seed=8))
    assert torch.equal(first.train.inputs, again.train.inputs) and torch.equal(first.eval.labels, again.eval.labels)
    assert not torch.equal(first.train.inputs, other.train.inputs)
    assert not torch.equal(first.train.inputs[:20], first.eval.inputs)  # held-out drawn apart from training


def test_generation_in_chunks_matches_shapes_of_a_large_vocabulary():
    _, split = _generate(num_examples=600, vocab_size=8192, seq_len=64, num_pairs=16)
    assert split.inputs.shape == (600, 64) and int(split.inputs.max()) < 8192


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"seq_len": 31}, "seq_len"),
        ({"num_pairs": 9, "seq_len": 32}, "num_pairs"),
        ({"vocab_size": 32, "seq_len": 32}, "vocab_size"),
        ({"power_a": 0.0}, "power_a"),
        ({"num_train_examples": 0}, "num_train_examples"),
        ({"num_pairs": 2.5}, "num_pairs"),
    ],
)
def test_impossible_settings_name_the_field(fields, named):
    with pytest.raises(ValueError, match=f"MQAR {named} = "):
        MQARConfig(**{"vocab_size": 128, "seq_len": 32, **fields}).check()


def test_recall_accuracy_reads_only_the_query_positions():
    # two sequences of 4 positions over a vocabulary of 5; queries at (0, 1), (0, 3) and (1, 2)
    labels = torch.tensor([[IGNORE_INDEX, 3, IGNORE_INDEX, 4], [IGNORE_INDEX, IGNORE_INDEX, 2, IGNORE_INDEX]])
    predicted = torch.tensor([[0, 3, 1, 1], [2, 2, 2, 2]])  # right at (0, 1) and (1, 2), wrong at (0, 3)
    logits = torch.nn.functional.one_hot(predicted, 5).float()
    assert count_correct(logits, labels) == (2, 3)
    assert recall_accuracy(logits, labels) == pytest.approx(2 / 3)
    # what is predicted at the unscored positions changes nothing
    elsewhere = torch.where(labels == IGNORE_INDEX, torch.full_like(predicted, 4), predicted)
    assert recall_accuracy(torch.nn.functional.one_hot(elsewhere, 5).float(), labels) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="no position"):
        recall_accuracy(logits, torch.full_like(labels, IGNORE_INDEX))


@pytest.mark.parametrize("vocab_size", [64, 18])  # few keys per row (drawn with rejection) and many (ranked)
def test_keys_and_values_are_drawn_uniformly(vocab_size):
    _, split = _generate(num_examples=4000, vocab_size=vocab_size, seq_len=16, num_pairs=4)
    half = vocab_size // 2
    key_counts = np.bincount(split.inputs[:, 0:8:2].flatten().numpy(), minlength=half)[1:]
    value_counts = np.bincount(split.inputs[:, 1:8:2].flatten().numpy(), minlength=vocab_size)[half:]
    first_key_counts = np.bincount(split.inputs[:, 0].numpy(), minlength=half)[1:]  # every key can come first
    for counts in (key_counts, value_counts, first_key_counts):
        assert counts.min() > 0.75 * counts.mean() and counts.max() < 1.25 * counts.mean()
