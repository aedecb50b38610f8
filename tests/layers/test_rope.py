"""RotaryEmbedding and apply_rotary against a complex-number rotation of dimension pairs (i, i + R/2)."""

from __future__ import annotations

import math

import pytest
import torch

from hybridlm.layers.rope import RotaryEmbedding, apply_rotary
from tests.helpers import assert_close

# (batch, seq_len, heads, head_dim, rotary_dim, theta)
CASES = [
    pytest.param(1, 1, 1, 12, 12, 10000.0, id="T1-H1-D12-R12"),
    pytest.param(2, 13, 3, 12, 12, 10000.0, id="T13-H3-D12-R12"),
    pytest.param(2, 13, 3, 60, 60, 1e6, id="T13-H3-D60-R60-theta1e6"),
    pytest.param(2, 13, 2, 60, 24, 10000.0, id="T13-H2-D60-R24-partial"),
    pytest.param(3, 5, 4, 12, 6, 500.0, id="T5-H4-D12-R6-partial"),
]


def random_positions(batch, seq_len):
    """Each row starts at its own offset (as after left padding or a cache), some far out."""
    offsets = torch.tensor([0, 7, 1000])[:batch]
    return offsets[:, None] + torch.arange(seq_len)


def rotate_truth(x, positions, rotary_dim, theta):
    """Dims i and i + R/2 form the complex number x_i + j x_{i+R/2}, multiplied by exp(j pos theta^(-2i/R))."""
    x = x.double()
    half = rotary_dim // 2
    out = x.clone()
    for i in range(half):
        frequency = theta ** (-2 * i / rotary_dim)
        angle = positions.double()[:, :, None] * frequency  # (B, T, 1), broadcast over heads
        z = torch.complex(x[..., i], x[..., i + half]) * torch.polar(torch.ones_like(angle), angle)
        out[..., i], out[..., i + half] = z.real, z.imag
    return out


@pytest.mark.parametrize(("batch", "seq_len", "heads", "head_dim", "rotary_dim", "theta"), CASES)
def test_rotary_tables_match_formula(batch, seq_len, heads, head_dim, rotary_dim, theta):
    positions = random_positions(batch, seq_len)
    cos, sin = RotaryEmbedding(rotary_dim, theta)(positions)
    assert cos.shape == sin.shape == (batch, seq_len, rotary_dim)
    assert cos.dtype == sin.dtype == torch.float32
    for i in range(rotary_dim):
        angle = positions.double() * theta ** (-2 * (i % (rotary_dim // 2)) / rotary_dim)
        assert_close(cos[..., i], torch.cos(angle), name=f"cos dim {i}")
        assert_close(sin[..., i], torch.sin(angle), name=f"sin dim {i}")


@pytest.mark.parametrize(("batch", "seq_len", "heads", "head_dim", "rotary_dim", "theta"), CASES)
def test_apply_rotary_matches_complex_rotation(batch, seq_len, heads, head_dim, rotary_dim, theta):
    positions = random_positions(batch, seq_len)
    x = torch.randn(batch, seq_len, heads, head_dim)
    # Tables in float64 from the same formula: the comparison then isolates apply_rotary itself.
    angles = positions.double()[..., None] * theta ** (-torch.arange(0, rotary_dim, 2).double() / rotary_dim)
    angles = torch.cat((angles, angles), dim=-1)
    y = apply_rotary(x, angles.cos().float(), angles.sin().float())
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_close(y, rotate_truth(x, positions, rotary_dim, theta))
    # Partial rotary: the dims past rotary_dim pass through bit for bit.
    assert torch.equal(y[..., rotary_dim:], x[..., rotary_dim:])


@pytest.mark.parametrize(("batch", "seq_len", "heads", "head_dim", "rotary_dim", "theta"), CASES)
def test_rotary_embedding_then_apply(batch, seq_len, heads, head_dim, rotary_dim, theta):
    """The module's own fp32 tables with apply_rotary, positions up to ~1000 included."""
    positions = random_positions(batch, seq_len)
    x = torch.randn(batch, seq_len, heads, head_dim)
    cos, sin = RotaryEmbedding(rotary_dim, theta)(positions)
    y = apply_rotary(x, cos, sin)
    assert_close(y, rotate_truth(x, positions, rotary_dim, theta))
    assert torch.equal(y[..., rotary_dim:], x[..., rotary_dim:])


def test_rotary_preserves_norm_and_depends_on_relative_position():
    """<R(m) q, R(n) k> depends on n - m only; a rotation keeps each pair's length."""
    rope = RotaryEmbedding(12, 10000.0)
    q, k = torch.randn(1, 1, 1, 12), torch.randn(1, 1, 1, 12)

    def rotated(x, position):
        cos, sin = rope(torch.tensor([[position]]))
        return apply_rotary(x, cos, sin)

    dots = [(rotated(q, m) * rotated(k, m + 3)).sum() for m in (0, 5, 11, 40)]
    for dot in dots[1:]:
        assert math.isclose(dot.item(), dots[0].item(), rel_tol=1e-5, abs_tol=1e-5)
    assert_close(rotated(q, 9).norm(), q.norm())


def test_position_zero_is_identity():
    x = torch.randn(2, 3, 2, 12)
    cos, sin = RotaryEmbedding(8, 10000.0)(torch.zeros(2, 3, dtype=torch.long))
    torch.testing.assert_close(apply_rotary(x, cos, sin), x, rtol=0, atol=0)


def test_apply_rotary_float64_keeps_float64_precision():
    """float64 x with float64 tables must be rotated in float64 (rope.py upcasts with .float(), which downcasts)."""
    positions = random_positions(2, 13)
    x = torch.randn(2, 13, 3, 12, dtype=torch.float64)
    angles = positions.double()[..., None] * 10000.0 ** (-torch.arange(0, 8, 2).double() / 8)
    angles = torch.cat((angles, angles), dim=-1)
    y = apply_rotary(x, angles.cos(), angles.sin())
    assert y.dtype == torch.float64
    assert_close(y, rotate_truth(x, positions, 8, 10000.0))
