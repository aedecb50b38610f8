"""Mamba-1 selective scan (Gu & Dao 2023, Algorithm 2), the SSM inside Jamba's Mamba layers.

Shape legend:
    B  batch          T  sequence length     L  chunk length
    Dn channels (d_inner)                    N  state size (d_state)

Layout: u, delta, z: [B, T, Dn]; A: [Dn, N] (negative); B, C: [B, T, N], shared by all channels;
D, delta_bias: [Dn]; initial_state and final_state: [B, Dn, N].

Recurrence, per channel d and state n (after delta += delta_bias; delta = softplus(delta)):
    state_t = exp(delta_t * A) * state_{t-1} + delta_t * B_t * u_t
    y_t     = sum_n state_t * C_t + D * u_t;   y_t *= silu(z_t)

`selective_scan_reference` loops over t and is the spec; it follows transformers'
`mamba_selective_scan` loop (models/jamba/modeling_jamba.py). `selective_scan_chunked` computes the
same scan a chunk at a time; `selective_scan_step` advances one token for decoding. All compute in
at least fp32 (fp64 stays fp64), return y in u's dtype and the state in at least fp32.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from hybridlm.ops.precision import state_dtype, upcast


def _discretize_delta(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool) -> Tensor:
    delta = upcast(delta)
    if delta_bias is not None:
        delta = delta + upcast(delta_bias)
    return F.softplus(delta) if delta_softplus else delta


def _skip_and_gate(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    if D is not None:
        y = y + upcast(u) * upcast(D)
    if z is not None:
        y = y * F.silu(upcast(z))
    return y.to(u.dtype)


def _zero_state(u_BTD: Tensor, A_DN: Tensor) -> Tensor:
    return u_BTD.new_zeros(u_BTD.shape[0], u_BTD.shape[-1], A_DN.shape[-1], dtype=state_dtype(u_BTD.dtype))


def _segment_sum(log_decay_BLDN: Tensor) -> Tensor:
    """out[:, t, s] = sum_{s < r <= t} log_decay[:, r] for s <= t, else -inf: [B, L, L, Dn, N].

    Summing each segment directly, as mamba's ssd_minimal.py `segsum` does, instead of differencing
    two cumulative sums keeps exp(S_t - S_s) accurate when both sums are large and close. The -inf
    mask goes in before exp, so the backward never meets inf * 0.
    """
    L = log_decay_BLDN.shape[1]
    ones_LL = torch.ones(L, L, dtype=torch.bool, device=log_decay_BLDN.device)
    by_r_s_BLLDN = log_decay_BLDN[:, :, None].expand(-1, -1, L, -1, -1)  # [B, r, s, Dn, N]
    terms_BLLDN = by_r_s_BLLDN.masked_fill(~ones_LL.tril(-1)[:, :, None, None], 0.0)  # keep r > s
    return torch.cumsum(terms_BLLDN, dim=1).masked_fill(~ones_LL.tril()[:, :, None, None], float("-inf"))


def selective_scan_step(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    state: Tensor,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> tuple[Tensor, Tensor]:
    """Advance the scan by one token.

    u, delta, z: [B, Dn]; A: [Dn, N]; B, C: [B, N]; D, delta_bias: [Dn]; state: [B, Dn, N].
    Returns (y: [B, Dn] in u's dtype, new_state: [B, Dn, N] fp32); `state` is left untouched.
    """
    delta_BD = _discretize_delta(delta, delta_bias, delta_softplus)
    decay_BDN = torch.exp(delta_BD[:, :, None] * upcast(A))
    input_BDN = (delta_BD * upcast(u))[:, :, None] * upcast(B)[:, None, :]
    state_BDN = decay_BDN * upcast(state) + input_BDN
    y_BD = torch.einsum("bdn,bn->bd", state_BDN, upcast(C))
    return _skip_and_gate(y_BD, u, D, z), state_BDN


def selective_scan_reference(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The spec: the recurrence as a plain loop over time.

    u, delta, z: [B, T, Dn]; A: [Dn, N]; B, C: [B, T, N]; D, delta_bias: [Dn];
    initial_state: [B, Dn, N] (zeros if None).
    Returns (y: [B, T, Dn] in u's dtype, final_state: [B, Dn, N] fp32).
    """
    delta_BTD = _discretize_delta(delta, delta_bias, delta_softplus)
    A_DN = upcast(A)
    u_BTD, B_BTN, C_BTN = upcast(u), upcast(B), upcast(C)
    state_BDN = _zero_state(u, A) if initial_state is None else upcast(initial_state)
    ys = []
    for t in range(u.shape[1]):
        decay_BDN = torch.exp(delta_BTD[:, t, :, None] * A_DN)
        input_BDN = (delta_BTD[:, t] * u_BTD[:, t])[:, :, None] * B_BTN[:, t, None, :]
        state_BDN = decay_BDN * state_BDN + input_BDN
        ys.append(torch.einsum("bdn,bn->bd", state_BDN, C_BTN[:, t]))
    y_BTD = torch.stack(ys, dim=1) if ys else u_BTD.new_zeros(u.shape)
    return _skip_and_gate(y_BTD, u, D, z), state_BDN


def selective_scan_chunked(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """Same contract and result as `selective_scan_reference`, parallel within chunks of chunk_size (L).

    Within a chunk, with S_t = sum_{s<=t} delta_s * A (the cumulative log-decay, [L, Dn, N]):
        state_t = exp(S_t) * state_0 + sum_{s<=t} exp(S_t - S_s) * delta_s * B_s * u_s
    1. intra-chunk output: y_t += sum_{s<=t} sum_n C_t B_s exp(S_t - S_s) * delta_s u_s;
    2. output from the carried state: y_t += sum_n C_t exp(S_t) state_0;
    3. state passed on: state_L = exp(S_L) state_0 + sum_s exp(S_L - S_s) delta_s B_s u_s.
    Unlike Mamba-2's scalar decay per head, Mamba-1's decay depends on (channel, state), so step 1 holds
    a [B, L, L, Dn, N] tensor, one chunk at a time: memory grows with chunk_size**2, not T**2.
    The last chunk is simply shorter when T is not a multiple of chunk_size.
    """
    delta_BTD = _discretize_delta(delta, delta_bias, delta_softplus)
    x_BTD = delta_BTD * upcast(u)  # delta_s * u_s
    B_BTN, C_BTN, A_DN = upcast(B), upcast(C), upcast(A)
    state_BDN = _zero_state(u, A) if initial_state is None else upcast(initial_state)

    ys = []
    for start in range(0, u.shape[1], chunk_size):
        chunk = slice(start, start + chunk_size)
        x_BLD, B_BLN, C_BLN = x_BTD[:, chunk], B_BTN[:, chunk], C_BTN[:, chunk]
        log_decay_BLDN = delta_BTD[:, chunk, :, None] * A_DN
        decay_sum_BLLDN = _segment_sum(log_decay_BLDN)  # [B, t, s, Dn, N]: S_t - S_s

        # 1. within the chunk
        decay_BLLDN = torch.exp(decay_sum_BLLDN)
        CB_BLLN = C_BLN[:, :, None, :] * B_BLN[:, None, :, :]
        scores_BLLD = torch.einsum("btsdn,btsn->btsd", decay_BLLDN, CB_BLLN)
        y_BLD = torch.einsum("btsd,bsd->btd", scores_BLLD, x_BLD)

        # 2. from the state carried into the chunk
        decay_from_start_BLDN = torch.exp(torch.cumsum(log_decay_BLDN, dim=1))
        y_BLD = y_BLD + torch.einsum("btdn,btn,bdn->btd", decay_from_start_BLDN, C_BLN, state_BDN)
        ys.append(y_BLD)

        # 3. the state at the end of the chunk
        state_BDN = decay_from_start_BLDN[:, -1] * state_BDN + torch.einsum(
            "bsdn,bsn,bsd->bdn", decay_BLLDN[:, -1], B_BLN, x_BLD
        )

    y_BTD = torch.cat(ys, dim=1) if ys else u.new_zeros(u.shape, dtype=state_dtype(u.dtype))
    return _skip_and_gate(y_BTD, u, D, z), state_BDN
