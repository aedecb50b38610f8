"""RMSNorm and GatedRMSNorm against the formulas written out per group."""

from __future__ import annotations

import pytest
import torch

from hybridlm.layers.norm import GatedRMSNorm, RMSNorm
from tests.helpers import assert_close
from tests.layers.common import assert_finite_grads, gradcheck_layer, perturb_

EPS = 1e-5
SHAPES = [
    pytest.param((1, 1, 12), torch.float32, id="B1-T1-D12"),
    pytest.param((2, 13, 60), torch.float32, id="B2-T13-D60"),
]
ZERO_CENTERED = [pytest.param(False, id="plain"), pytest.param(True, id="zero-centred")]


def rms_norm_truth(x, weight, is_zero_centered, eps=EPS):
    """y = x / sqrt(mean(x^2) + eps) * w   (or * (1 + w))."""
    x, weight = x.double(), weight.double()
    scale = 1 + weight if is_zero_centered else weight
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * scale


def gated_rms_norm_truth(x, z, weight, group_size, norm_before_gate, eps=EPS):
    """Each group of group_size channels normalised on its own; gate silu(z) before or after the norm."""
    x, z, weight = x.double(), z.double(), weight.double()
    gate = z * torch.sigmoid(z)
    if not norm_before_gate:
        x = x * gate
    groups = []
    for start in range(0, x.shape[-1], group_size):
        group = x[..., start : start + group_size]
        groups.append(group / torch.sqrt((group * group).mean(-1, keepdim=True) + eps))
    y = torch.cat(groups, dim=-1) * weight
    return y * gate if norm_before_gate else y


@pytest.mark.parametrize(("shape", "dtype"), [*SHAPES, pytest.param((2, 13, 60), torch.float64, id="B2-T13-D60-fp64")])
@pytest.mark.parametrize("is_zero_centered", ZERO_CENTERED)
def test_rms_norm_matches_formula(is_zero_centered, shape, dtype):
    norm = perturb_(RMSNorm(shape[-1], EPS, is_zero_centered)).to(dtype)
    x = torch.randn(shape, dtype=dtype) * 3
    y = norm(x)
    assert y.dtype == dtype
    assert_close(y, rms_norm_truth(x, norm.weight, is_zero_centered))


def test_rms_norm_initial_weights_are_identity_scale():
    """Fresh weights scale by 1 in both conventions (ones, or zeros with 1 + w)."""
    x = torch.randn(2, 5, 12)
    expected = rms_norm_truth(x, torch.ones(12), is_zero_centered=False)
    assert_close(RMSNorm(12, EPS)(x), expected)
    assert_close(RMSNorm(12, EPS, is_zero_centered=True)(x), expected)


@pytest.mark.parametrize("norm_before_gate", [False, True], ids=["gate-then-norm", "norm-then-gate"])
@pytest.mark.parametrize(
    ("shape", "group_size", "dtype"),
    [
        pytest.param((1, 1, 60), 12, torch.float32, id="B1-T1-D60-5groups"),
        pytest.param((2, 13, 60), 12, torch.float32, id="B2-T13-D60-5groups"),
        pytest.param((2, 13, 60), 20, torch.float32, id="B2-T13-D60-3groups"),
        pytest.param((2, 13, 60), 60, torch.float32, id="B2-T13-D60-1group"),
        pytest.param((2, 13, 60), 20, torch.float64, id="B2-T13-D60-3groups-fp64"),
    ],
)
def test_gated_rms_norm_matches_formula(shape, group_size, dtype, norm_before_gate):
    norm = perturb_(GatedRMSNorm(shape[-1], group_size, EPS, norm_before_gate)).to(dtype)
    x, z = torch.randn(shape, dtype=dtype) * 2, torch.randn(shape, dtype=dtype) * 2
    y = norm(x, z)
    assert y.dtype == dtype
    assert_close(y, gated_rms_norm_truth(x, z, norm.weight, group_size, norm_before_gate))


@pytest.mark.parametrize("norm_before_gate", [False, True], ids=["gate-then-norm", "norm-then-gate"])
def test_gated_rms_norm_groups_are_independent(norm_before_gate):
    """Changing one group of x leaves the other groups' outputs bit-for-bit unchanged."""
    norm = perturb_(GatedRMSNorm(24, 8, EPS, norm_before_gate))
    x, z = torch.randn(3, 24), torch.randn(3, 24)
    changed = x.clone()
    changed[:, 8:16] = torch.randn(3, 8) * 10
    y, y_changed = norm(x, z), norm(changed, z)
    assert torch.equal(y[:, :8], y_changed[:, :8]) and torch.equal(y[:, 16:], y_changed[:, 16:])
    assert not torch.allclose(y[:, 8:16], y_changed[:, 8:16])


def test_gated_rms_norm_rejects_bad_group_size():
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        GatedRMSNorm(60, 7)


@pytest.mark.parametrize("is_zero_centered", ZERO_CENTERED)
def test_rms_norm_gradients_are_finite(is_zero_centered):
    norm = perturb_(RMSNorm(12, EPS, is_zero_centered))
    x = torch.randn(2, 13, 12, requires_grad=True)
    assert_finite_grads(norm, (norm(x) * torch.randn(2, 13, 12)).sum())
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("is_zero_centered", ZERO_CENTERED)
def test_rms_norm_gradcheck(is_zero_centered):
    tiny = perturb_(RMSNorm(5, EPS, is_zero_centered)).double()
    gradcheck_layer(tiny, (torch.randn(3, 5, dtype=torch.float64, requires_grad=True),), lambda m, x: m(x))


@pytest.mark.parametrize("norm_before_gate", [False, True], ids=["gate-then-norm", "norm-then-gate"])
def test_gated_rms_norm_gradients_are_finite(norm_before_gate):
    norm = perturb_(GatedRMSNorm(60, 20, EPS, norm_before_gate))
    x, z = torch.randn(2, 13, 60, requires_grad=True), torch.randn(2, 13, 60, requires_grad=True)
    assert_finite_grads(norm, (norm(x, z) * torch.randn(2, 13, 60)).sum())
    assert torch.isfinite(x.grad).all() and torch.isfinite(z.grad).all()


@pytest.mark.parametrize("norm_before_gate", [False, True], ids=["gate-then-norm", "norm-then-gate"])
def test_gated_rms_norm_gradcheck(norm_before_gate):
    tiny = perturb_(GatedRMSNorm(6, 3, EPS, norm_before_gate)).double()
    inputs = tuple(torch.randn(2, 6, dtype=torch.float64, requires_grad=True) for _ in range(2))
    gradcheck_layer(tiny, inputs, lambda m, x, z: m(x, z))
