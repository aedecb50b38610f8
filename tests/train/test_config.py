"""TrainConfig checks, the learning-rate schedule against its formula, data sets too small to train on."""

import math

import pytest
import torch

from hybridlm.train.config import TrainConfig, lr_factor
from hybridlm.train.trainer import Trainer
from tests.train.helpers import tiny_model, tiny_mqar


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("steps", 0),
        ("steps", 2.5),
        ("batch_size", -1),
        ("grad_accum", 0),
        ("lr", 0.0),
        ("lr", float("nan")),
        ("lr", "0.001"),
        ("min_lr_ratio", 1.5),
        ("warmup_steps", -1),
        ("warmup_steps", 11),  # more than steps (10)
        ("weight_decay", -0.1),
        ("betas", (0.9, 1.0)),
        ("betas", (0.9,)),
        ("grad_clip", -1.0),
        ("seed", -1),
        ("bf16", 1),
        ("aux_loss_free", "yes"),
        ("bias_update_rate", 0.0),
        ("eval_every", -5),
        ("checkpoint_every", True),
        ("stop_at_accuracy", 1.5),
    ],
)
def test_a_bad_setting_is_one_error_naming_its_field(field, value):
    config = TrainConfig(steps=10, warmup_steps=2)
    setattr(config, field, value)
    with pytest.raises(ValueError, match=rf"^TrainConfig\.{field} = .*: expected "):
        config.check()


def test_the_trainer_checks_its_config_before_building_anything():
    with pytest.raises(ValueError, match=r"TrainConfig\.lr"):
        Trainer(tiny_model(), tiny_mqar(), TrainConfig(lr=-1.0))


def test_a_data_set_smaller_than_one_batch_is_refused():
    data = tiny_mqar(num_train_examples=8)
    expected = r"train split has 8 examples of 16 tokens, fewer than one batch \(batch_size 9\)"
    with pytest.raises(ValueError, match=expected):
        Trainer(tiny_model(), data, TrainConfig(steps=2, batch_size=9, warmup_steps=0))


def test_a_data_set_with_more_tokens_than_the_model_is_refused():
    with pytest.raises(ValueError, match="vocabulary of 64 tokens, more than the model's vocab_size 32"):
        Trainer(tiny_model(vocab_size=32), tiny_mqar(), TrainConfig(steps=2, batch_size=4, warmup_steps=0))


def test_aux_loss_free_needs_a_router_bias():
    config = TrainConfig(steps=2, batch_size=4, warmup_steps=0, aux_loss_free=True)
    with pytest.raises(ValueError, match="use_expert_bias"):
        Trainer(tiny_model(), tiny_mqar(), config)
    with pytest.raises(ValueError, match="needs MoE blocks"):
        Trainer(tiny_model(pattern="M*"), tiny_mqar(), config)


def _expected_lr(step, peak, warmup, total, min_ratio):
    """Warmup then cosine, written out from its definition (independently of lr_factor)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / (total - warmup)
    return peak * (min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi * progress)) / 2)


def test_the_learning_rate_each_step_used_follows_warmup_then_cosine():
    config = TrainConfig(steps=12, batch_size=4, lr=2e-3, warmup_steps=4, min_lr_ratio=0.25)
    result = Trainer(tiny_model(), tiny_mqar(), config).train()
    used = [record.lr for record in result.history]
    expected = [_expected_lr(s, 2e-3, 4, 12, 0.25) for s in range(12)]
    assert used == pytest.approx(expected, rel=1e-12)
    assert used[0] == pytest.approx(2e-3 / 4) and used[3] == pytest.approx(2e-3)  # warmup reaches the peak
    assert used[4] == pytest.approx(2e-3) and used[-1] > 2e-3 * 0.25  # cosine from the peak towards the floor


def test_lr_factor_edges():
    no_warmup = TrainConfig(steps=4, warmup_steps=0, min_lr_ratio=0.0)
    assert [lr_factor(s, no_warmup) for s in range(4)] == pytest.approx([1.0, 0.853553, 0.5, 0.146447], abs=1e-6)
    all_warmup = TrainConfig(steps=4, warmup_steps=4)
    assert [lr_factor(s, all_warmup) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_weight_decay_applies_to_matrices_only():
    model = tiny_model(moe={"use_expert_bias": True})
    trainer = Trainer(model, tiny_mqar(), TrainConfig(steps=2, batch_size=4, warmup_steps=0, weight_decay=0.1))
    decayed, plain = trainer.optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.dim() < 2 for p in plain["params"])
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert id(model.layers[2].mixer.gate.e_score_correction_bias) not in in_optimizer  # moved by balancing only


def test_gradient_accumulation_matches_one_large_batch():
    """Two micro-batches of 4 give the gradient of one batch of 8 (equal label counts per example)."""
    data = tiny_mqar()
    big = Trainer(tiny_model(pattern="M*"), data, TrainConfig(steps=3, batch_size=8, warmup_steps=0, seed=1))
    small = Trainer(
        tiny_model(pattern="M*"), data, TrainConfig(steps=3, batch_size=4, grad_accum=2, warmup_steps=0, seed=1)
    )
    # the same 8 examples per step: micro-batches 2k and 2k + 1 of 4 are batch k of 8
    for position in range(2):
        inputs_8, _ = data.batch(position, 8, seed=1)
        assert torch.equal(inputs_8, torch.cat([data.batch(2 * position + i, 4, seed=1)[0] for i in range(2)]))
    big_losses, small_losses = big.train().losses, small.train().losses
    assert small_losses == pytest.approx(big_losses, rel=1e-5)
    for a, b in zip(big.model.parameters(), small.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
