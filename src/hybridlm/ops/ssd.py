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
    R  the H // G heads of one group side by side, times P (H // G * P)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ssd_chunked", "ssd_reference", "ssd_step"]


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _heads_per_group(num_heads: int, num_groups: int) -> int:
    if num_heads % num_groups != 0:
        raise ValueError(f"number of heads ({num_heads}) must be divisible by the number of B/C groups ({num_groups})")
    return num_heads // num_groups


def _groups_to_heads(t_xGN: Tensor, num_heads: int) -> Tensor:
    """Repeat each group for the H // G heads that read it: ``[..., G, N] -> [..., H, N]``."""
    return t_xGN.repeat_interleave(_heads_per_group(num_heads, t_xGN.shape[-2]), dim=-2)


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


# Sequences longer than this are scanned in segments of about this many tokens, the state carried
# from one to the next: every intermediate then stays a few MB (cache-sized) and the cost grows
# linearly with T. Below it, one segment does everything in a handful of large batched matmuls.
SEGMENT_TOKENS = 512


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
    which leaves the state untouched, so ``final_state`` is the state after step T. Inputs longer than
    ``SEGMENT_TOKENS`` go through in segments of whole chunks, the state carried between them.

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
    batch, seq_len, num_heads, _ = x.shape
    _heads_per_group(num_heads, B.shape[-2])
    state_BHPN = _initial_state(initial_state, batch, x, B.shape[-1], dtype)
    x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN = (t.to(dtype) for t in (x, dt, A, B, C))
    D_H = None if D is None else D.to(dtype)

    chunk_len = max(1, min(chunk_size, seq_len))
    segment_len = max(1, SEGMENT_TOKENS // chunk_len) * chunk_len
    if seq_len <= segment_len:
        y_BTHP, state_BHPN = _ssd_segment(x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN, D_H, state_BHPN, chunk_len)
        return y_BTHP.to(out_dtype), state_BHPN
    # Each segment's output goes straight into y, so its buffers are free for the next segment to reuse.
    y_BTHP = x.new_empty(x.shape)
    for start in range(0, seq_len, segment_len):
        part = slice(start, start + segment_len)
        y_BTHP[:, part], state_BHPN = _ssd_segment(
            x_BTHP[:, part], dt_BTH[:, part], A_H, B_BTGN[:, part], C_BTGN[:, part], D_H, state_BHPN, chunk_len
        )
    return y_BTHP, state_BHPN


def _ssd_segment(
    x_BTHP: Tensor,
    dt_BTH: Tensor,
    A_H: Tensor,
    B_BTGN: Tensor,
    C_BTGN: Tensor,
    D_H: Tensor | None,
    state_BHPN: Tensor,
    chunk_len: int,
) -> tuple[Tensor, Tensor]:
    """``ssd_chunked`` on one segment, all its chunks at once: inputs already in the compute dtype.

    The big work is four batched matmuls, arranged so that B and C are never repeated per head: a
    group's H // G heads sit side by side (R = H // G * P) and share one matmul with that group's B or C.
    """
    batch, seq_len, num_heads, head_dim = x_BTHP.shape
    num_groups = B_BTGN.shape[-2]
    heads_per_group = _heads_per_group(num_heads, num_groups)
    pad = -seq_len % chunk_len
    num_chunks = (seq_len + pad) // chunk_len

    def to_chunks(t_BTxx: Tensor) -> Tensor:  # [B, T, ...] -> [B, c, L, ...]; padded steps get dt = 0
        if pad:
            t_BTxx = F.pad(t_BTxx, (0, 0) * (t_BTxx.dim() - 2) + (0, pad))
        return t_BTxx.reshape(batch, num_chunks, chunk_len, *t_BTxx.shape[2:])

    x_BcLHP = to_chunks(x_BTHP)
    dt_BcHL = to_chunks(dt_BTH).transpose(2, 3)
    dtA_BcHL = dt_BcHL * A_H[:, None]
    B_BcGLN, C_BcGLN = to_chunks(B_BTGN).transpose(2, 3), to_chunks(C_BTGN).transpose(2, 3)

    # 1. Diagonal blocks: y_l = sum_{s <= l} (C_l . B_s) * decay(s -> l) * dt_s * x_s, plus D * x_l, which
    #    is one more term on the diagonal. As a matmul over s per chunk and head.
    CB_BcGLS = (C_BcGLN @ B_BcGLN.transpose(-1, -2)).tril_()  # causal: the only mask the scores get
    weight_BcHLS = _decay_matrix(dtA_BcHL) * dt_BcHL[..., None, :]
    scores_BcHLS = weight_BcHLS.unflatten(2, (num_groups, heads_per_group)) * CB_BcGLS.unsqueeze(3)
    scores_BcHLS = scores_BcHLS.flatten(2, 3)
    if D_H is not None:
        scores_BcHLS.diagonal(dim1=-2, dim2=-1).add_(D_H[:, None])
    y_diag_BcHLP = scores_BcHLS @ x_BcLHP.transpose(2, 3)

    # 2. Chunk states: each chunk's own contribution to the state at its last step (starting from 0),
    #    sum_s decay(s -> end) * dt_s * outer(x_s, B_s): the last row of the weights.
    weight_to_end_BcLH = weight_BcHLS[..., -1, :].transpose(2, 3)
    inputs = (x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN, state_BHPN) + (() if D_H is None else (D_H,))
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    if needs_grad:
        xw_BcLGR = (x_BcLHP * weight_to_end_BcLH[..., None]).reshape(batch, num_chunks, chunk_len, num_groups, -1)
        xw_BcGRL = xw_BcLGR.permute(0, 1, 3, 4, 2)
    else:  # written group-major by the multiply itself: the matmul below then reads it transposed, no copy
        xw_BcGLR = x_BcLHP.new_empty(batch, num_chunks, num_groups, chunk_len, heads_per_group * head_dim)
        torch.mul(
            x_BcLHP.unflatten(3, (num_groups, heads_per_group)).transpose(2, 3),
            weight_to_end_BcLH.unflatten(3, (num_groups, heads_per_group)).transpose(2, 3)[..., None],
            out=xw_BcGLR.view(batch, num_chunks, num_groups, chunk_len, heads_per_group, head_dim),
        )
        xw_BcGRL = xw_BcGLR.transpose(-1, -2)

    # 3. State passing: the recurrence over chunk boundaries, sequential but only O(T / L) steps.
    chunk_decay_BcH = torch.exp(dtA_BcHL.sum(dim=-1))
    entering_BcGRN, state_BHPN = _pass_states(xw_BcGRL, B_BcGLN, chunk_decay_BcH, state_BHPN)

    # 4. State to output: the state entering each chunk read out by C_l and decayed to position l.
    y_off_BcGLR = C_BcGLN @ entering_BcGRN.transpose(-1, -2)
    decay_from_start_BcLH = torch.exp(torch.cumsum(dtA_BcHL, dim=-1)).transpose(2, 3)
    if needs_grad:
        y_BcLHP = y_off_BcGLR.unflatten(-1, (heads_per_group, head_dim)).transpose(2, 3).flatten(3, 4)
        # In place on the matmul's fresh output (autograd keeps what it needs): two passes over y, not four.
        y_BcLHP = y_BcLHP.mul_(decay_from_start_BcLH[..., None]).add_(y_diag_BcHLP.transpose(2, 3))
    else:  # the decay multiply writes y token-major straight from the group-major matmul output
        y_BcLHP = x_BcLHP.new_empty(batch, num_chunks, chunk_len, num_heads, head_dim)
        torch.mul(
            y_off_BcGLR.unflatten(-1, (heads_per_group, head_dim)).transpose(2, 3),
            decay_from_start_BcLH.unflatten(-1, (num_groups, heads_per_group))[..., None],
            out=y_BcLHP.view(batch, num_chunks, chunk_len, num_groups, heads_per_group, head_dim),
        )
        y_BcLHP.add_(y_diag_BcHLP.transpose(2, 3))
    return y_BcLHP.reshape(batch, num_chunks * chunk_len, num_heads, head_dim)[:, :seq_len], state_BHPN


def _decay_matrix(dtA_xL: Tensor) -> Tensor:
    """``out[..., l, s] = exp(dtA[s+1] + ... + dtA[l])`` for ``s <= l``: ``[..., L, L]``; 1 above the diagonal.

    Not masked: the caller multiplies by the causally masked ``C . B``, which is cheaper than masking
    this per-head matrix. The exponents are differences of a cumsum taken in float64: in float32, inside
    a chunk the cumsum of ``dt * A`` reaches tens to hundreds, and the difference of two such numbers
    carries an absolute error of ~1e-6 to 1e-5 in the exponent, i.e. that relative error on the decay
    between nearby steps (20x the chunked-vs-reference error on the tests' inputs).

    Exponents are clamped to [log(tiny) + 1, 0]: above the diagonal they are positive (and would
    overflow); below, strong decays reach -100s, where ``exp`` underflows to subnormals or zero through
    a slow path (~20x slower on x86, most of the op's time with the decays of a trained Mamba-2). The
    floor's decay (3e-38 in float32) is below anything a product with a decay near 1 can hold.
    """
    cumsum_xL = torch.cumsum(dtA_xL.to(torch.float64), dim=-1)
    exponent_xLL = (cumsum_xL[..., :, None] - cumsum_xL[..., None, :]).to(dtA_xL.dtype)
    return exponent_xLL.clamp_(min=math.log(torch.finfo(dtA_xL.dtype).tiny) + 1.0, max=0.0).exp_()


def _pass_states(
    xw_BcGRL: Tensor, B_BcGLN: Tensor, chunk_decay_BcH: Tensor, initial_state_BHPN: Tensor
) -> tuple[Tensor, Tensor]:
    """The chunk states ``xw @ B``, then the state entering each chunk and the final state.

    ``entering[c + 1] = chunk_decay[c] * entering[c] + chunk_state[c]``, ``entering[0]`` the initial state.
    Without autograd, the matmul writes the chunk states straight into the buffer of entering states
    and the recurrence runs in place there; with autograd (training), out-of-place steps are stacked.
    Returns ``[B, c, G, R, N]`` and ``[B, H, P, N]``.
    """
    batch, num_chunks, num_groups, group_width, _ = xw_BcGRL.shape
    state_size = B_BcGLN.shape[-1]
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (xw_BcGRL, B_BcGLN, chunk_decay_BcH, initial_state_BHPN)
    )
    if not needs_grad:
        states_BzGRN = xw_BcGRL.new_empty(batch, num_chunks + 1, num_groups, group_width, state_size)
        torch.matmul(xw_BcGRL, B_BcGLN, out=states_BzGRN[:, 1:])
        states_BzGRN[:, 0] = initial_state_BHPN.reshape(batch, num_groups, group_width, state_size)
        states_BzHPN = states_BzGRN.view(batch, num_chunks + 1, *initial_state_BHPN.shape[1:])
        for c in range(num_chunks):
            states_BzHPN[:, c + 1].addcmul_(states_BzHPN[:, c], chunk_decay_BcH[:, c, :, None, None])
        return states_BzGRN[:, :-1], states_BzHPN[:, -1].clone()

    chunk_states_BcHPN = (xw_BcGRL @ B_BcGLN).view(batch, num_chunks, *initial_state_BHPN.shape[1:])
    entering, state_BHPN = [], initial_state_BHPN
    for c in range(num_chunks):
        entering.append(state_BHPN)
        state_BHPN = torch.addcmul(chunk_states_BcHPN[:, c], state_BHPN, chunk_decay_BcH[:, c, :, None, None])
    entering_BcGRN = torch.stack(entering, dim=1).view(batch, num_chunks, num_groups, group_width, state_size)
    return entering_BcGRN, state_BHPN


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
