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
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["gated_deltanet_chunked", "gated_deltanet_reference", "gated_deltanet_step"]


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
    """``[B, T, H, *D] -> [B, H, N, C, *D]``, zero-padded along T up to a multiple of C."""
    x = x.movedim(1, 2)
    padding = -x.shape[2] % chunk_size
    if padding:
        x = torch.cat([x, x.new_zeros(*x.shape[:2], padding, *x.shape[3:])], dim=2)
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
    chunk_size = min(chunk_size, seq_len)  # a chunk longer than the input would only pad it (as ssd does)
    scale = q.shape[-1] ** -0.5 if scale is None else scale

    # Zero padding is a no-op step: beta = 0 writes nothing, g = 0 keeps the state, k = q = 0.
    q_BHNCK, k_BHNCK, v_BHNCV, g_BHNC, beta_BHNC = (_to_chunks(x.to(dtype), chunk_size) for x in (q, k, v, g, beta))
    q_BHNCK = q_BHNCK * scale

    # gamma_i: decay accumulated from the chunk start through position i. Cumulating per chunk, not
    # over the whole sequence, bounds how negative gamma gets: exp(gamma_i - gamma_j) is formed from
    # a difference of two cumsums and loses about |gamma| * eps in the exponent.
    gamma_BHNC = g_BHNC.cumsum(dim=-1)
    # decay_ij = exp(gamma_i - gamma_j) for j <= i, else 0. Masking the exponent (not the result)
    # keeps exp() away from the positive, overflowing upper triangle.
    is_causal_CC = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    decay_BHNCC = (gamma_BHNC[..., :, None] - gamma_BHNC[..., None, :]).masked_fill(~is_causal_CC, -torch.inf).exp()

    # Unrolling the recurrence inside a chunk from its start state S_0, the written values
    # v_new_i = beta_i (v_i - (exp(g_i) S_{i-1})^T k_i) satisfy
    #     v_new_i + sum_{j<i} A_ij v_new_j = beta_i v_i - beta_i exp(gamma_i) S_0^T k_i,
    #     A_ij = beta_i exp(gamma_i - gamma_j) k_i . k_j   (strictly lower triangular).
    # Solving the unit lower-triangular system once per chunk is the UT transform (DeltaNet's
    # W / U with the decay folded in, as in the Gated DeltaNet paper): with T = (I + A)^{-1},
    #     u = T diag(beta) V,   w = T diag(beta exp(gamma)) K,   v_new = u - w S_0.
    k_beta_BHNCK = k_BHNCK * beta_BHNC[..., None]
    A_BHNCC = (k_beta_BHNCK @ k_BHNCK.transpose(-1, -2) * decay_BHNCC).tril(diagonal=-1)
    unit_lower_BHNCC = A_BHNCC + torch.eye(chunk_size, dtype=dtype, device=q.device)
    u_BHNCV = torch.linalg.solve_triangular(
        unit_lower_BHNCC, v_BHNCV * beta_BHNC[..., None], upper=False, unitriangular=True
    )
    w_BHNCK = torch.linalg.solve_triangular(
        unit_lower_BHNCC, k_beta_BHNCK * gamma_BHNC.exp()[..., None], upper=False, unitriangular=True
    )

    # Causal intra-chunk attention, diagonal included: o_i sees its own write.
    attn_BHNCC = q_BHNCK @ k_BHNCK.transpose(-1, -2) * decay_BHNCC
    # Weights for carrying writes to the chunk end: exp(gamma_last - gamma_j) <= 1.
    decay_to_end_BHNC = (gamma_BHNC[..., -1:] - gamma_BHNC).exp()

    # Chunks are sequential only through the state:
    #     o     = (q * exp(gamma)) S_0 + attn v_new
    #     S_end = exp(gamma_last) S_0 + (k * exp(gamma_last - gamma))^T v_new
    # The paper's printed output formula masks the intra-chunk term with the binary causal mask M;
    # the decay matrix belongs there (as NVlabs/GatedDeltaNet issue 15 notes, and as the tests
    # against the reference loop confirm).
    state_BHKV = _initial_state(initial_state, q, v, dtype)
    outputs = []
    for n in range(q_BHNCK.shape[2]):
        v_new_BHCV = u_BHNCV[:, :, n] - w_BHNCK[:, :, n] @ state_BHKV
        q_decayed_BHCK = q_BHNCK[:, :, n] * gamma_BHNC[:, :, n, :, None].exp()
        outputs.append(q_decayed_BHCK @ state_BHKV + attn_BHNCC[:, :, n] @ v_new_BHCV)
        k_to_end_BHCK = k_BHNCK[:, :, n] * decay_to_end_BHNC[:, :, n, :, None]
        state_BHKV = (
            state_BHKV * gamma_BHNC[:, :, n, -1, None, None].exp() + k_to_end_BHCK.transpose(-1, -2) @ v_new_BHCV
        )

    if not outputs:
        return v.clone(), state_BHKV
    o_BHTV = torch.stack(outputs, dim=2).flatten(2, 3)[:, :, :seq_len]
    return o_BHTV.transpose(1, 2).to(v.dtype), state_BHKV
