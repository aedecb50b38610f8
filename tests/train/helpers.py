"""Small models and data sets the training tests share."""

import torch

from hybridlm.model import HybridLM
from hybridlm.presets import get_preset
from hybridlm.train.mqar import MQARConfig, mqar_data


def tiny_mqar(num_train_examples=64, num_eval_examples=16, seed=0):
    return mqar_data(
        MQARConfig(
            vocab_size=64,
            seq_len=16,
            num_pairs=2,
            num_train_examples=num_train_examples,
            num_eval_examples=num_eval_examples,
            seed=seed,
        )
    )


def tiny_model(pattern="M*E", seed=0, vocab_size=64, **overrides):
    """debug-tiny's blocks at width 64: Mamba-2, attention and an MoE block (8 experts, top-2)."""
    torch.manual_seed(seed)
    return HybridLM(get_preset("debug-tiny", pattern=pattern, vocab_size=vocab_size, **overrides))
