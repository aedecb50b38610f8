"""Mamba-2 state-space duality (SSD): the selective scan with a scalar decay per head.

Dao & Gu 2024, "Transformers are SSMs: Generalized Models and Efficient Algorithms Through
Structured State Space Duality" (arXiv:2405.21060). The recurrence, per batch and head h:

    state_t = exp(dt_t * A_h) * state_{t-1} + dt_t * outer(x_t, B_t)      # [P, N]
    y_t     = state_t @ C_t + D_h * x_t                                   # [P]

Three functions, one semantics:

- ``ssd_reference``: the recurrence above as a loop over time; the spec.
- ``ssd_chunked``: the chunked SSD algorithm (paper section 6, and ``ssd_minimal.py`` in
  state-spaces/mamba): quadratic attention-like form inside chunks, the recurrence between chunks.
- ``ssd_step``: one token of decoding.

Every function takes ``initial_state`` and returns ``final_state``. Half-precision inputs (bf16/fp16)
are computed in fp32; ``y`` is cast back to the input dtype and states stay fp32.

Shape suffixes:
    B  batch
    T  sequence length (Tp: padded up to a multiple of the chunk length)
    H  heads
    P  head dim
    G  groups of B/C (head h reads group h // (H // G))
    N  state size
    c  number of chunks (z: c + 1, the chunk boundaries including the initial state)
    L  chunk length, target position inside a chunk (S: source position inside a chunk)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ssd_chunked", "ssd_reference", "ssd_step"]


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _groups_to_heads(t_xGN: Tensor, num_heads: int) -> Tensor:
    """Repeat each group for the H // G heads that read it: ``[..., G, N] -> [..., H, N]``."""
    num_groups = t_xGN.shape[-2]
    if num_heads % num_groups != 0:
        raise ValueError(f"number of heads ({num_heads}) must be divisible by the number of B/C groups ({num_groups})")
    return t_xGN.repeat_interleave(num_heads // num_groups, dim=-2)


def _initial_state(initial_state: Tensor | None, batch: int, x: Tensor, state_size: int, dtype: torch.dtype) -> Tensor:
    _, _, num_heads, head_dim = x.shape
    expected = (batch, num_heads, head_dim, state_size)
    if initial_state is None:
        return torch.zeros(expected, dtype=dtype, device=x.device)
    if tuple(initial_state.shape) != expected:
        raise ValueError(
            f"initial_state must have shape [B, H, P, N] = {list(expected)}, got {list(initial_state.shape)}"
        )
    return initial_state.to(dtype)


def _segsum(a_xL: Tensor) -> Tensor:
    """Segment sums ``out[..., i, j] = a[j+1] + ... + a[i]`` for ``i >= j``, ``-inf`` above the diagonal.

    ``[..., L] -> [..., L, L]``. ``exp`` of it is the decay from step j to step i. Summing the masked
    terms directly, rather than taking ``cumsum[i] - cumsum[j]``, avoids cancellation: inside a chunk
    of 64 the cumsum of ``dt * A`` reaches tens to hundreds, and an fp32 difference of such numbers
    carries an absolute error of ~1e-6 to 1e-5 in the exponent, i.e. that relative error on the decay
    of two nearby steps (on the tests' inputs, 20x the chunked-vs-reference error of this form).
    """
    length = a_xL.shape[-1]
    ones_LL = torch.ones(length, length, dtype=torch.bool, device=a_xL.device)
    # Column j holds a[j+1 .. L-1] in rows j+1 .. L-1 and zeros above; a cumsum down the rows sums them.
    a_xLL = a_xL.unsqueeze(-1).expand(*a_xL.shape, length)
    a_xLL = a_xLL.masked_fill(~torch.tril(ones_LL, diagonal=-1), 0)
    segsum_xLL = torch.cumsum(a_xLL, dim=-2)
    return segsum_xLL.masked_fill(~torch.tril(ones_LL), float("-inf"))


def ssd_reference(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The SSD recurrence as a plain loop over time (the spec).

    Args:
        x: ``[B, T, H, P]``.
        dt: ``[B, T, H]`` step sizes, positive (softplus, bias and clamp already applied).
        A: ``[H]`` negative decay rates (``-exp(A_log)``).
        B: ``[B, T, G, N]`` input projections; H must be divisible by G.
        C: ``[B, T, G, N]`` output projections.
        D: ``[H]`` skip connection or None.
        initial_state: ``[B, H, P, N]`` or None (zeros).

    Returns:
        y: ``[B, T, H, P]`` in the dtype of ``x``.
        final_state: ``[B, H, P, N]`` (fp32 for half-precision inputs).
    """
    out_dtype, dtype = x.dtype, _compute_dtype(x)
    batch, seq_len, num_heads, _ = x.shape
    x_BTHP, dt_BTH, A_H = x.to(dtype), dt.to(dtype), A.to(dtype)
    B_BTHN = _groups_to_heads(B, num_heads).to(dtype)
    C_BTHN = _groups_to_heads(C, num_heads).to(dtype)
    state_BHPN = _initial_state(initial_state, batch, x, B.shape[-1], dtype)

    ys = []
    for t in range(seq_len):
        decay_BH = torch.exp(dt_BTH[:, t] * A_H)
        dtx_BHP = dt_BTH[:, t, :, None] * x_BTHP[:, t]
        state_BHPN = decay_BH[..., None, None] * state_BHPN + torch.einsum("bhp,bhn->bhpn", dtx_BHP, B_BTHN[:, t])
        ys.append(torch.einsum("bhpn,bhn->bhp", state_BHPN, C_BTHN[:, t]))
    y_BTHP = torch.stack(ys, dim=1)
    if D is not None:
        y_BTHP = y_BTHP + D.to(dtype)[:, None] * x_BTHP
    return y_BTHP.to(out_dtype), state_BHPN


def ssd_chunked(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """The chunked SSD algorithm (Dao & Gu 2024, section 6); same contract as ``ssd_reference``.

    Cost is O(T * L) inside chunks plus O(T / L) sequential steps between chunks instead of T.
    T need not be a multiple of ``chunk_size``: inputs are padded with ``dt = 0`` (decay 1, no input),
    which leaves the state untouched, so ``final_state`` is the state after step T.

    Args:
        x: ``[B, T, H, P]``.
        dt: ``[B, T, H]`` positive step sizes.
        A: ``[H]`` negative.
        B: ``[B, T, G, N]``.
        C: ``[B, T, G, N]``.
        D: ``[H]`` or None.
        initial_state: ``[B, H, P, N]`` or None (zeros).
        chunk_size: chunk length L.

    Returns:
        y: ``[B, T, H, P]`` in the dtype of ``x``; final_state: ``[B, H, P, N]``.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    out_dtype, dtype = x.dtype, _compute_dtype(x)
    batch, seq_len, num_heads, head_dim = x.shape
    state_size = B.shape[-1]
    initial_state_BHPN = _initial_state(initial_state, batch, x, state_size, dtype)
    B_BTHN = _groups_to_heads(B, num_heads).to(dtype)
    C_BTHN = _groups_to_heads(C, num_heads).to(dtype)
    x_BTHP, dt_BTH, A_H = x.to(dtype), dt.to(dtype), A.to(dtype)

    # Pad T up to a multiple of L. Padded steps get dt = 0: decay exp(0) = 1 and input 0 * x = 0.
    chunk_len = max(1, min(chunk_size, seq_len))
    pad = -seq_len % chunk_len
    num_chunks = (seq_len + pad) // chunk_len

    def to_chunks(t_BTxx: Tensor) -> Tensor:  # [B, T, ...] -> [B, c, L, ...]
        padded = F.pad(t_BTxx, (0, 0) * (t_BTxx.dim() - 2) + (0, pad))
        return padded.reshape(batch, num_chunks, chunk_len, *t_BTxx.shape[2:])

    dtx_BcLHP = to_chunks(x_BTHP * dt_BTH[..., None])
    B_BcLHN, C_BcLHN = to_chunks(B_BTHN), to_chunks(C_BTHN)
    dtA_BHcL = to_chunks(dt_BTH * A_H).permute(0, 3, 1, 2)
    dtA_cumsum_BHcL = torch.cumsum(dtA_BHcL, dim=-1)

    # 1. Diagonal blocks: inside each chunk, the masked "attention" (C_l . B_s) * decay(s -> l).
    decay_BHcLS = torch.exp(_segsum(dtA_BHcL))
    y_diag_BcLHP = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C_BcLHN, B_BcLHN, decay_BHcLS, dtx_BcLHP)

    # 2. Chunk states: each chunk's own contribution to the state at its last step (starting from 0).
    #    decay(s -> end of chunk) is the last row of the segment-sum decay.
    decay_to_end_BHcS = decay_BHcLS[..., -1, :]
    chunk_states_BcHPN = torch.einsum("bcshn,bhcs,bcshp->bchpn", B_BcLHN, decay_to_end_BHcS, dtx_BcLHP)

    # 3. State passing: the recurrence over chunk boundaries, as one masked decay matrix over chunks.
    #    Boundary z holds the state entering chunk z; boundary c is the final state.
    states_BzHPN = torch.cat([initial_state_BHPN.unsqueeze(1), chunk_states_BcHPN], dim=1)
    chunk_decay_BHz = F.pad(dtA_cumsum_BHcL[..., -1], (1, 0))
    decay_chunks_BHzz = torch.exp(_segsum(chunk_decay_BHz))
    states_BzHPN = torch.einsum("bhzy,byhpn->bzhpn", decay_chunks_BHzz, states_BzHPN)
    entering_states_BcHPN, final_state_BHPN = states_BzHPN[:, :-1], states_BzHPN[:, -1]

    # 4. State to output: the state entering each chunk, decayed to position l and read out by C_l.
    decay_from_start_BHcL = torch.exp(dtA_cumsum_BHcL)
    y_off_BcLHP = torch.einsum("bclhn,bchpn,bhcl->bclhp", C_BcLHN, entering_states_BcHPN, decay_from_start_BHcL)

    y_BTHP = (y_diag_BcLHP + y_off_BcLHP).reshape(batch, num_chunks * chunk_len, num_heads, head_dim)
    y_BTHP = y_BTHP[:, :seq_len]
    if D is not None:
        y_BTHP = y_BTHP + D.to(dtype)[:, None] * x_BTHP
    return y_BTHP.to(out_dtype), final_state_BHPN


def ssd_step(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    state: Tensor,
) -> tuple[Tensor, Tensor]:
    """One decoding step of the recurrence. Does not modify ``state``; returns a new tensor.

    Args:
        x: ``[B, H, P]``.
        dt: ``[B, H]`` positive.
        A: ``[H]`` negative.
        B: ``[B, G, N]``.
        C: ``[B, G, N]``.
        D: ``[H]`` or None.
        state: ``[B, H, P, N]``.

    Returns:
        y: ``[B, H, P]`` in the dtype of ``x``; new_state: ``[B, H, P, N]`` (fp32 for half inputs).
    """
    out_dtype, dtype = x.dtype, _compute_dtype(x)
    num_heads = x.shape[1]
    x_BHP, dt_BH, A_H = x.to(dtype), dt.to(dtype), A.to(dtype)
    B_BHN = _groups_to_heads(B, num_heads).to(dtype)
    C_BHN = _groups_to_heads(C, num_heads).to(dtype)

    decay_BH = torch.exp(dt_BH * A_H)
    dtx_BHP = dt_BH[..., None] * x_BHP
    new_state_BHPN = decay_BH[..., None, None] * state.to(dtype) + torch.einsum("bhp,bhn->bhpn", dtx_BHP, B_BHN)
    y_BHP = torch.einsum("bhpn,bhn->bhp", new_state_BHPN, C_BHN)
    if D is not None:
        y_BHP = y_BHP + D.to(dtype)[:, None] * x_BHP
    return y_BHP.to(out_dtype), new_state_BHPN
