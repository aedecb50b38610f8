"""Checkpoints: a resumed run repeats the uninterrupted one bit for bit; a damaged file is one clear error."""

import json
import os
import random

import numpy as np
import pytest
import torch

from hybridlm.train.checkpoint import CHECKPOINT_NAME, FORMAT_TAG, read_checkpoint, write_checkpoint
from hybridlm.train.config import TrainConfig
from hybridlm.train.trainer import Trainer
from tests.train.helpers import tiny_model, tiny_mqar

# Every moving part: accumulation, clipping, weight decay, MoE losses and aux-loss-free bias updates.
CONFIG = TrainConfig(
    steps=7,
    batch_size=8,
    grad_accum=2,
    lr=3e-3,
    warmup_steps=2,
    grad_clip=0.5,
    aux_loss_free=True,
    bias_update_rate=0.01,
    eval_every=3,
)


def _model(seed=0):
    return tiny_model(pattern="M*E", seed=seed, moe={"use_expert_bias": True})


def _parameters(model):
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


@pytest.fixture(scope="module")
def uninterrupted():
    trainer = Trainer(_model(), tiny_mqar(), CONFIG)
    result = trainer.train()
    return result, _parameters(trainer.model)


@pytest.mark.parametrize("stop_at", [1, 3, 6])
def test_a_run_resumed_at_step_k_equals_the_uninterrupted_run_bit_for_bit(uninterrupted, stop_at, tmp_path):
    expected, expected_parameters = uninterrupted
    first = Trainer(_model(), tiny_mqar(), CONFIG, out_dir=tmp_path)
    stopped = first.train(until_step=stop_at)
    assert stopped.steps_done == stop_at and stopped.checkpoint == tmp_path / CHECKPOINT_NAME

    # a fresh process would start from other weights and other RNG states: the checkpoint must restore all
    torch.manual_seed(1234), random.seed(1234), np.random.seed(1234)
    second = Trainer(_model(seed=99), tiny_mqar(), CONFIG, out_dir=tmp_path)
    second.resume(tmp_path)
    resumed = second.train()

    assert resumed.losses == expected.losses  # exact float equality, every step
    assert [r.aux_loss for r in resumed.history] == [r.aux_loss for r in expected.history]
    assert [r.grad_norm for r in resumed.history] == [r.grad_norm for r in expected.history]
    assert [(e.step, e.loss, e.accuracy) for e in resumed.evals] == [
        (e.step, e.loss, e.accuracy) for e in expected.evals
    ]
    for name, tensor in _parameters(second.model).items():
        assert torch.equal(tensor, expected_parameters[name]), name  # expert biases included


def test_rng_states_come_back(tmp_path):
    trainer = Trainer(_model(), tiny_mqar(), CONFIG)
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    path = trainer.save_checkpoint(tmp_path / "c.pt")
    expected_torch, expected_python, expected_numpy = torch.rand(3), random.random(), np.random.rand()
    torch.manual_seed(6), random.seed(6), np.random.seed(6)
    Trainer(_model(), tiny_mqar(), CONFIG).resume(path)
    assert torch.equal(torch.rand(3), expected_torch)
    assert (random.random(), np.random.rand()) == (expected_python, expected_numpy)


def test_the_final_name_never_holds_a_partial_file(tmp_path, monkeypatch):
    trainer = Trainer(_model(), tiny_mqar(), CONFIG, out_dir=tmp_path)
    good = trainer.save_checkpoint()
    before = good.read_bytes()

    def fail_midway(*args, **kwargs):  # the staging file holds the new bytes, not yet on disk
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        trainer.train(until_step=1)  # trains; the end-of-run checkpoint write fails ...
    monkeypatch.undo()
    assert good.read_bytes() == before  # ... and the previous checkpoint is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]  # no staging file left


def test_a_stale_staging_file_is_removed_by_the_next_write(tmp_path):
    stale = tmp_path / f".{CHECKPOINT_NAME}.staging-12345"
    stale.write_bytes(b"half a checkpoint")
    Trainer(_model(), tiny_mqar(), CONFIG, out_dir=tmp_path).save_checkpoint()
    assert not stale.exists()


@pytest.fixture
def checkpoint(tmp_path):
    return Trainer(_model(), tiny_mqar(), CONFIG).save_checkpoint(tmp_path / "c.pt")


def _resume(path):
    Trainer(_model(), tiny_mqar(), CONFIG).resume(path)


def test_a_truncated_checkpoint_is_one_clear_error(checkpoint):
    data = checkpoint.read_bytes()
    for keep in (len(data) - 1, len(data) // 2, len(FORMAT_TAG) + 10, 5, 0):
        checkpoint.write_bytes(data[:keep])
        with pytest.raises(ValueError, match=rf"^{checkpoint}: (truncated|corrupt checkpoint header|not a hybridlm)"):
            _resume(checkpoint)


def test_a_corrupted_byte_is_one_clear_error(checkpoint):
    data = bytearray(checkpoint.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit inside the tensors
    checkpoint.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"^{checkpoint}: corrupt checkpoint: the payload's SHA-256"):
        _resume(checkpoint)


def test_other_files_and_versions_are_refused(tmp_path, checkpoint):
    other = tmp_path / "weights.pt"
    torch.save({"model": {}}, other)
    with pytest.raises(ValueError, match="not a hybridlm training checkpoint"):
        _resume(other)
    with pytest.raises(ValueError, match="no such checkpoint"):
        _resume(tmp_path / "missing.pt")
    data = checkpoint.read_bytes()
    tag_end = len(FORMAT_TAG)
    header_end = data.index(b"\n", tag_end)
    header = json.loads(data[tag_end:header_end])
    header["version"] = 99
    checkpoint.write_bytes(FORMAT_TAG + json.dumps(header).encode() + data[header_end:])
    with pytest.raises(ValueError, match="format version 99; this hybridlm reads 1"):
        _resume(checkpoint)


def test_a_payload_missing_a_key_is_refused(tmp_path):
    payload = read_checkpoint(Trainer(_model(), tiny_mqar(), CONFIG).save_checkpoint(tmp_path / "c.pt"))
    del payload["optimizer"]
    with pytest.raises(ValueError, match="missing"):
        write_checkpoint(tmp_path / "d.pt", payload)
    # written by hand past write_checkpoint's own check: the reader names the missing part
    import hashlib
    import io

    buffer = io.BytesIO()
    torch.save(payload, buffer)
    body = buffer.getvalue()
    header = {"version": 1, "payload_bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    (tmp_path / "d.pt").write_bytes(FORMAT_TAG + json.dumps(header).encode() + b"\n" + body)
    with pytest.raises(ValueError, match=r"the checkpoint lacks \['optimizer'\]"):
        _resume(tmp_path / "d.pt")


def test_a_checkpoint_of_another_run_is_refused(checkpoint):
    with pytest.raises(ValueError, match=r"written with lr = 0\.003, this run has 0\.001"):
        Trainer(_model(), tiny_mqar(), TrainConfig(**{**CONFIG.to_dict(), "lr": 1e-3})).resume(checkpoint)
    with pytest.raises(ValueError, match="another model config"):
        Trainer(tiny_model(pattern="M*E*", moe={"use_expert_bias": True}), tiny_mqar(), CONFIG).resume(checkpoint)
    # when to evaluate or checkpoint may change
    Trainer(_model(), tiny_mqar(), TrainConfig(**{**CONFIG.to_dict(), "eval_every": 5})).resume(checkpoint)
