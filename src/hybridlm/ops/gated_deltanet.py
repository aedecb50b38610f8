"""Gated delta rule: the linear-attention recurrence of Gated DeltaNet.

Yang, Kautz, Hatamizadeh, "Gated Delta Networks: Improving Mamba2 with Delta Rule" (2024),
arXiv:2412.06464. Per head, a state S in R^{K x V} is decayed, then corrected toward the new
value with a delta-rule step (the paper's gated delta rule, written here with S as [K, V]):

    S_t = exp(g_t) * S_{t-1}
    S_t = S_t + beta_t * k_t ⊗ (v_t - S_t^T k_t)
    o_t = scale * S_t^T q_t

Three functions, one semantics:

- ``gated_deltanet_reference``: the recurrence above as a loop over time; the spec.
- ``gated_deltanet_chunked``: the paper's chunkwise-parallel form, which extends the WY / UT-transform
  algorithm of DeltaNet (Yang et al. 2024, arXiv:2406.06484) with the decay; what training and
  prefill use.
- ``gated_deltanet_step``: one token of decoding against a carried state.

The caller L2-normalises q and k and repeats heads for grouped attention; these ops see equal head
counts. Every op takes an initial state (zeros when absent) and returns the final state, so a
sequence split over two calls with the state carried over gives the same result as one call.
Half-precision inputs are computed in fp32; outputs come back in the dtype of ``v``, states stay
in the compute dtype (fp32, or fp64 for fp64 inputs).

Shape suffixes:
    B  batch
    T  sequence length
    H  heads
    K  key / query head dim
    V  value head dim
    N  number of chunks
    C  chunk length (positions inside one chunk; CC is a chunk-by-chunk matrix)
    X  batch and heads flattened (B * H), for batched matmuls
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["gated_deltanet_chunked", "gated_deltanet_reference", "gated_deltanet_step"]

# Inputs longer than this are processed in segments of about this many tokens (see gated_deltanet_chunked).
SEGMENT_TOKENS = 512


def _check_shapes(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor | None, state_name: str
) -> None:
    """Check shapes against q: ``[*L, H, K]`` where ``*L`` is ``B, T`` (sequence) or ``B`` (step)."""
    *lead, _ = q.shape
    expected = {
        "k": tuple(q.shape),
        "v": (*lead, v.shape[-1]),
        "g": tuple(lead),
        "beta": tuple(lead),
        state_name: (q.shape[0], q.shape[-2], q.shape[-1], v.shape[-1]),
    }
    found = {"k": k, "v": v, "g": g, "beta": beta, state_name: state}
    for name, tensor in found.items():
        if tensor is not None and tuple(tensor.shape) != expected[name]:
            raise ValueError(
                f"gated delta rule: {name} has shape {list(tensor.shape)}, expected {list(expected[name])} "
                f"(derived from q {list(q.shape)} and v {list(v.shape)}); states are [B, H, K, V]"
            )


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """fp32 for half-precision inputs, otherwise the widest input dtype (fp64 stays fp64)."""
    dtype = torch.float32
    for tensor in tensors:
        if tensor is not None:
            dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _initial_state(state: Tensor | None, q: Tensor, v: Tensor, dtype: torch.dtype) -> Tensor:
    if state is not None:
        return state.to(dtype)
    batch, heads, key_dim = q.shape[0], q.shape[-2], q.shape[-1]
    return q.new_zeros(batch, heads, key_dim, v.shape[-1], dtype=dtype)


def gated_deltanet_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    state: Tensor,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Advance the recurrence by one token.

    Args:
        q, k: ``[B, H, K]``, already L2-normalised.
        v: ``[B, H, V]``.
        g: ``[B, H]`` log-decay, ``<= 0``.
        beta: ``[B, H]`` write strength in ``(0, 1)``.
        state: ``[B, H, K, V]``; not modified.
        scale: output scale, default ``K ** -0.5``.

    Returns:
        ``o``: ``[B, H, V]`` in ``v``'s dtype, and the new state ``[B, H, K, V]`` (a new tensor).
    """
    _check_shapes(q, k, v, g, beta, state, "state")
    dtype = _compute_dtype(q, k, v, g, beta, state)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q_BHK, k_BHK, v_BHV, g_BH, beta_BH = (x.to(dtype) for x in (q, k, v, g, beta))

    state_BHKV = state.to(dtype) * g_BH.exp()[..., None, None]
    predicted_BHV = torch.einsum("bhk,bhkv->bhv", k_BHK, state_BHKV)
    delta_BHV = beta_BH[..., None] * (v_BHV - predicted_BHV)
    state_BHKV = state_BHKV + torch.einsum("bhk,bhv->bhkv", k_BHK, delta_BHV)
    o_BHV = scale * torch.einsum("bhk,bhkv->bhv", q_BHK, state_BHKV)
    return o_BHV.to(v.dtype), state_BHKV


def gated_deltanet_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    initial_state: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """The gated delta rule as a plain loop over time; the spec the other forms are tested against.

    Args:
        q, k: ``[B, T, H, K]``, already L2-normalised.
        v: ``[B, T, H, V]``.
        g: ``[B, T, H]`` log-decay, ``<= 0``.
        beta: ``[B, T, H]`` write strength in ``(0, 1)``.
        initial_state: ``[B, H, K, V]``, or ``None`` for zeros.
        scale: output scale, default ``K ** -0.5``.

    Returns:
        ``o``: ``[B, T, H, V]`` in ``v``'s dtype, and the final state ``[B, H, K, V]``.
    """
    _check_shapes(q, k, v, g, beta, initial_state, "initial_state")
    dtype = _compute_dtype(q, k, v, g, beta, initial_state)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH = (x.to(dtype) for x in (q, k, v, g, beta))
    state_BHKV = _initial_state(initial_state, q, v, dtype)

    outputs = []
    for t in range(q.shape[1]):
        k_BHK = k_BTHK[:, t]
        state_BHKV = state_BHKV * g_BTH[:, t].exp()[..., None, None]
        predicted_BHV = torch.einsum("bhk,bhkv->bhv", k_BHK, state_BHKV)
        delta_BHV = beta_BTH[:, t, :, None] * (v_BTHV[:, t] - predicted_BHV)
        state_BHKV = state_BHKV + torch.einsum("bhk,bhv->bhkv", k_BHK, delta_BHV)
        outputs.append(scale * torch.einsum("bhk,bhkv->bhv", q_BTHK[:, t], state_BHKV))
    o_BTHV = torch.stack(outputs, dim=1) if outputs else v_BTHV.clone()
    return o_BTHV.to(v.dtype), state_BHKV


def _to_chunks(x: Tensor, chunk_size: int) -> Tensor:
    """``[B, T, H, *D] -> [B, H, N, C, *D]``, zero-padded along T up to a multiple of C; contiguous, so
    the matmuls that read it do not each copy it again."""
    padding = -x.shape[1] % chunk_size
    if padding:
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, padding))
    x = x.movedim(1, 2).contiguous()
    return x.reshape(*x.shape[:2], x.shape[2] // chunk_size, chunk_size, *x.shape[3:])


def gated_deltanet_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    initial_state: Tensor | None = None,
    scale: float | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """The gated delta rule in chunkwise-parallel form; same results as ``gated_deltanet_reference``.

    Args:
        q, k: ``[B, T, H, K]``, already L2-normalised.
        v: ``[B, T, H, V]``.
        g: ``[B, T, H]`` log-decay, ``<= 0``.
        beta: ``[B, T, H]`` write strength in ``(0, 1)``.
        initial_state: ``[B, H, K, V]``, or ``None`` for zeros.
        scale: output scale, default ``K ** -0.5``.
        chunk_size: positions per chunk; T need not be a multiple of it.

    Returns:
        ``o``: ``[B, T, H, V]`` in ``v``'s dtype, and the final state ``[B, H, K, V]``.
    """
    _check_shapes(q, k, v, g, beta, initial_state, "initial_state")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    dtype = _compute_dtype(q, k, v, g, beta, initial_state)
    seq_len = q.shape[1]
    chunk_size = max(1, min(chunk_size, seq_len))  # a chunk longer than the input would only pad it (as ssd does)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    state_BHKV = _initial_state(initial_state, q, v, dtype)

    # Long inputs go in segments of about SEGMENT_TOKENS, the state carried from one to the next: the
    # per-chunk matrices of a segment then stay cache-sized and the cost grows linearly with T.
    segment_len = max(1, SEGMENT_TOKENS // chunk_size) * chunk_size
    if seq_len == 0:
        return v.clone(), state_BHKV
    if seq_len <= segment_len:
        inputs = (x.to(dtype) for x in (q, k, v, g, beta))
        o_BTHV, state_BHKV = _chunked_segment(*inputs, state_BHKV, scale, chunk_size)
        return o_BTHV.to(v.dtype), state_BHKV
    # Each segment's output goes straight into o, so its buffers are free for the next segment to reuse.
    o_BTHV = v.new_empty(v.shape)
    for start in range(0, seq_len, segment_len):
        part = slice(start, start + segment_len)
        segment = (x[:, part].to(dtype) for x in (q, k, v, g, beta))
        o_BTHV[:, part], state_BHKV = _chunked_segment(*segment, state_BHKV, scale, chunk_size)
    return o_BTHV, state_BHKV


def _chunked_segment(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state_BHKV: Tensor, scale: float, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """``gated_deltanet_chunked`` on one segment, all its chunks at once; inputs in the compute dtype."""
    seq_len = q.shape[1]
    # Zero padding is a no-op step: beta = 0 writes nothing, g = 0 keeps the state, k = q = 0.
    q_BHNCK, k_BHNCK, v_BHNCV, g_BHNC, beta_BHNC = (_to_chunks(x, chunk_size) for x in (q, k, v, g, beta))

    # gamma_i: decay accumulated from the chunk start through position i. Cumulating per chunk, not
    # over the whole sequence, bounds how negative gamma gets: exp(gamma_i - gamma_j) is formed from
    # a difference of two cumsums and loses about |gamma| * eps in the exponent.
    gamma_BHNC = g_BHNC.cumsum(dim=-1)
    decay_BHNCC = _decay_matrix(gamma_BHNC)

    # Unrolling the recurrence inside a chunk from its start state S_0, the written values
    # v_new_i = beta_i (v_i - (exp(g_i) S_{i-1})^T k_i) satisfy
    #     v_new_i + sum_{j<i} A_ij v_new_j = beta_i v_i - beta_i exp(gamma_i) S_0^T k_i,
    #     A_ij = beta_i exp(gamma_i - gamma_j) k_i . k_j   (strictly lower triangular).
    # Solving the unit lower-triangular system once per chunk is the UT transform (DeltaNet's
    # W / U with the decay folded in, as in the Gated DeltaNet paper): with T = (I + A)^{-1},
    #     u = T diag(beta) V,   w = T diag(beta exp(gamma)) K,   v_new = u - w S_0.
    k_beta_BHNCK = k_BHNCK * beta_BHNC[..., None]
    A_BHNCC = (k_beta_BHNCK @ k_BHNCK.transpose(-1, -2)).mul_(decay_BHNCC).tril_(diagonal=-1)
    inverse_BHNCC = _unit_lower_inverse(A_BHNCC)
    u_BHNCV = inverse_BHNCC @ (v_BHNCV * beta_BHNC[..., None])
    w_BHNCK = inverse_BHNCC @ (k_beta_BHNCK * gamma_BHNC.exp()[..., None])

    # Causal intra-chunk attention, diagonal included: o_i sees its own write.
    attn_BHNCC = (q_BHNCK @ k_BHNCK.transpose(-1, -2)).mul_(decay_BHNCC).tril_().mul_(scale)
    q_decayed_BHNCK = q_BHNCK * (gamma_BHNC.exp()[..., None] * scale)
    # Weights for carrying writes to the chunk end: exp(gamma_last - gamma_j) <= 1.
    k_to_end_BHNKC = (k_BHNCK * (gamma_BHNC[..., -1:] - gamma_BHNC).exp()[..., None]).transpose(-1, -2)
    chunk_decay_BHN = gamma_BHNC[..., -1].exp()

    # Chunks are sequential only through the state:
    #     v_new = u - w S_0
    #     o     = (q * exp(gamma)) S_0 + attn v_new
    #     S_end = exp(gamma_last) S_0 + (k * exp(gamma_last - gamma))^T v_new
    # Only v_new and S_end are computed chunk by chunk; o for all chunks at once afterwards.
    # The paper's printed output formula masks the intra-chunk term with the binary causal mask M;
    # the decay matrix belongs there (as NVlabs/GatedDeltaNet issue 15 notes, and as the tests
    # against the reference loop confirm).
    # The loop runs on batches of matrices over X = B * H, the shape baddbmm takes.
    u_XNCV, w_XNCK, k_to_end_XNKC = (t.flatten(0, 1) for t in (u_BHNCV, w_BHNCK, k_to_end_BHNKC))
    chunk_decay_XN11 = chunk_decay_BHN.flatten(0, 1)[..., None, None]
    state_XKV = state_BHKV.flatten(0, 1)
    entering, v_news = [], []
    for n in range(u_XNCV.shape[1]):
        entering.append(state_XKV)
        v_new_XCV = torch.baddbmm(u_XNCV[:, n], w_XNCK[:, n], state_XKV, alpha=-1)
        v_news.append(v_new_XCV)
        state_XKV = torch.baddbmm(state_XKV * chunk_decay_XN11[:, n], k_to_end_XNKC[:, n], v_new_XCV)
    entering_BHNKV = torch.stack(entering, dim=1).view(*u_BHNCV.shape[:3], *state_BHKV.shape[-2:])
    v_new_BHNCV = torch.stack(v_news, dim=1).view_as(u_BHNCV)
    o_BHNCV = torch.matmul(q_decayed_BHNCK, entering_BHNKV).add_(attn_BHNCC @ v_new_BHNCV)
    state_BHKV = state_XKV.view_as(state_BHKV)
    o_BHTV = o_BHNCV.flatten(2, 3)[:, :, :seq_len]
    return o_BHTV.transpose(1, 2), state_BHKV


def _decay_matrix(gamma_xC: Tensor) -> Tensor:
    """``out[..., i, j] = exp(gamma_i - gamma_j)`` for ``j <= i``: ``[..., C, C]``; 1 above the diagonal.

    Not masked: the callers mask the products they form with it. Exponents are clamped to
    [log(tiny) + 1, 0]: above the diagonal they are positive (and would overflow); below, strong decays
    reach -100s, where ``exp`` underflows to subnormals or zero through a slow path (~20x slower on
    x86). The floor's decay (3e-38 in float32) is below anything a product with a decay near 1 can hold.
    """
    exponent_xCC = gamma_xC[..., :, None] - gamma_xC[..., None, :]
    return exponent_xCC.clamp_(min=math.log(torch.finfo(gamma_xC.dtype).tiny) + 1.0, max=0.0).exp_()


def _unit_lower_inverse(A_xCC: Tensor) -> Tensor:
    """``(I + A)^{-1}`` for a strictly lower triangular ``A``: ``[..., C, C]``.

    Block inversion by doubling, all matrices of the batch at once: with the inverses T11, T22 of the
    two diagonal halves of a lower triangular block, the block's inverse has T21 = -T22 A21 T11. From
    1 x 1 blocks (inverse 1) to C x C that is log2(C) rounds of batched matmuls, instead of C
    dependent row updates (forward substitution) or LAPACK's one-matrix-at-a-time triangular solve.
    C is padded up to a power of two with identity rows, which the inverse leaves alone.
    """
    size = A_xCC.shape[-1]
    padded = 1 << (size - 1).bit_length()
    if padded != size:
        A_xCC = F.pad(A_xCC, (0, padded - size, 0, padded - size))
    lead = A_xCC.shape[:-2]
    # [..., padded / block, block, block]: the inverses of the diagonal blocks of the current size.
    inverses = A_xCC.new_ones(*lead, padded, 1, 1)
    block = 1
    while block < padded:
        num_pairs = padded // (2 * block)
        # [..., num_pairs, block, block]: the lower-left quarter of each (2 block)^2 diagonal block of A.
        pairs = A_xCC.reshape(*lead, num_pairs, 2 * block, num_pairs, 2 * block).diagonal(dim1=-4, dim2=-2)
        lower_left = pairs.movedim(-1, -3)[..., block:, :block]
        upper_inverse, lower_inverse = inverses[..., 0::2, :, :], inverses[..., 1::2, :, :]
        lower_left_inverse = -(lower_inverse @ lower_left @ upper_inverse)
        top = torch.cat([upper_inverse, torch.zeros_like(upper_inverse)], dim=-1)
        bottom = torch.cat([lower_left_inverse, lower_inverse], dim=-1)
        inverses = torch.cat([top, bottom], dim=-2)
        block *= 2
    return inverses[..., 0, :size, :size]
