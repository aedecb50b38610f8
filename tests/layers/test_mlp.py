"""MLP (SwiGLU and squared ReLU) against the formulas."""

from __future__ import annotations

import pytest
import torch

from hybridlm.layers.mlp import MLP
from tests.helpers import assert_close
from tests.layers.common import assert_finite_grads, gradcheck_layer, params64, perturb_

CASES = [
    pytest.param(1, 1, 12, 20, False, id="T1-D12-I20"),
    pytest.param(2, 13, 60, 36, False, id="T13-D60-I36"),
    pytest.param(2, 13, 12, 7, True, id="T13-D12-I7-bias"),
]


def linear(x, p, name):
    y = x @ p[f"{name}.weight"].T
    return y + p[f"{name}.bias"] if f"{name}.bias" in p else y


def mlp_truth(mlp, x):
    p, x = params64(mlp), x.double()
    if mlp.activation == "swiglu":
        gate = linear(x, p, "gate_proj")
        return linear(gate * torch.sigmoid(gate) * linear(x, p, "up_proj"), p, "down_proj")
    return linear(torch.clamp(linear(x, p, "up_proj"), min=0) ** 2, p, "down_proj")


@pytest.mark.parametrize("activation", ["swiglu", "relu2"])
@pytest.mark.parametrize(("batch", "seq_len", "hidden", "intermediate", "bias"), CASES)
def test_mlp_matches_formula(batch, seq_len, hidden, intermediate, bias, activation):
    mlp = perturb_(MLP(hidden, intermediate, activation, bias), std=0.1)
    x = torch.randn(batch, seq_len, hidden)
    y = mlp(x)
    assert y.shape == x.shape
    assert_close(y, mlp_truth(mlp, x))


def test_mlp_parameters_follow_checkpoint_names():
    assert {n for n, _ in MLP(8, 4, "swiglu").named_parameters()} == {
        "gate_proj.weight",
        "up_proj.weight",
        "down_proj.weight",
    }
    assert {n for n, _ in MLP(8, 4, "relu2").named_parameters()} == {"up_proj.weight", "down_proj.weight"}


def test_mlp_rejects_unknown_activation():
    with pytest.raises(ValueError, match="swiglu"):
        MLP(8, 4, "gelu")


@pytest.mark.parametrize("activation", ["swiglu", "relu2"])
def test_mlp_gradients(activation):
    mlp = perturb_(MLP(12, 20, activation, bias=True), std=0.1)
    x = torch.randn(2, 13, 12, requires_grad=True)
    y = mlp(x)
    assert_finite_grads(mlp, (y * torch.randn_like(y)).sum())
    assert torch.isfinite(x.grad).all()

    tiny = perturb_(MLP(3, 4, activation, bias=True)).double()
    gradcheck_layer(tiny, (torch.randn(2, 3, dtype=torch.float64, requires_grad=True),), lambda m, x: m(x))
