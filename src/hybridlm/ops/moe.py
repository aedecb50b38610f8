"""Mixture-of-Experts routing and expert dispatch, as pure functions.

Shape legend (torchtitan-style suffixes):
    N  tokens (batch and sequence flattened)
    D  hidden size (model width, or the latent width for NemotronH's latent MoE)
    E  routed experts
    K  experts chosen per token (top-k)
    I  expert intermediate size
    F  up-projection rows: 2 * I for "swiglu" (gate then up), I for "relu2"
    G  expert groups (grouped top-k)
    M  (token, slot) pairs = N * K, sorted by expert id

Expert weights are stacked in nn.Linear layout ([out, in]) exactly as transformers v5 stores them:
`up_proj_EFD` is `gate_up_proj` for "swiglu" (Qwen3-Next, Jamba) and `up_proj` for "relu2" (NemotronH);
`down_proj_EDI` is `down_proj`. `moe_experts_reference` is the spec (a loop over experts, the way the
transformers eager experts run); `moe_experts_grouped` sorts the (token, slot) pairs by expert and runs
one grouped matmul per projection, with `torch.nn.functional.grouped_mm` where `grouped_mm_supported`
says it runs and a segmented per-expert loop otherwise.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from hybridlm.ops import native
from hybridlm.ops.precision import upcast

ACTIVATIONS = ("swiglu", "relu2")
SCORINGS = ("softmax", "sigmoid")


def _check_experts(
    hidden_ND: Tensor, topk_ids_NK: Tensor, up_proj_EFD: Tensor, down_proj_EDI: Tensor, activation: str
) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if hidden_ND.dim() != 2 or topk_ids_NK.dim() != 2 or topk_ids_NK.shape[0] != hidden_ND.shape[0]:
        raise ValueError(
            f"expected hidden [N, D] and topk_ids [N, K] with the same N, got "
            f"{tuple(hidden_ND.shape)} and {tuple(topk_ids_NK.shape)}; flatten batch and sequence first"
        )
    if up_proj_EFD.dim() != 3 or down_proj_EDI.dim() != 3:
        raise ValueError(
            f"expert weights must be stacked 3-D [E, out, in], got up_proj {tuple(up_proj_EFD.shape)} "
            f"and down_proj {tuple(down_proj_EDI.shape)}"
        )
    num_experts, D, I = up_proj_EFD.shape[0], hidden_ND.shape[1], down_proj_EDI.shape[2]
    expected_up = (num_experts, 2 * I if activation == "swiglu" else I, D)
    expected_down = (num_experts, D, I)
    if tuple(up_proj_EFD.shape) != expected_up or tuple(down_proj_EDI.shape) != expected_down:
        raise ValueError(
            f"{activation} experts for hidden size {D} need up_proj {expected_up} and down_proj "
            f"{expected_down} (nn.Linear layout [E, out, in]), got {tuple(up_proj_EFD.shape)} and "
            f"{tuple(down_proj_EDI.shape)}"
        )


def _activate(h_MF: Tensor, activation: str) -> Tensor:
    """The experts' activation of a fresh projection ``h_MF``."""
    if activation == "swiglu":
        # gate_up_proj stacks the gate rows first, then the up rows (transformers v5 Qwen3NextExperts).
        gate_MI, up_MI = h_MF.chunk(2, dim=-1)
        return native.swiglu(gate_MI, up_MI)
    # relu2 = squared ReLU (Primer, So et al. 2021), NemotronH's expert activation.
    return relu_squared(h_MF)


def relu_squared(h: Tensor) -> Tensor:
    """relu(h) ** 2; a fresh ``h`` that no gradient needs is overwritten (one pass, no new tensors)."""
    if torch.is_grad_enabled() and h.requires_grad:
        return torch.relu(h).square()
    return h.relu_().square_()


def moe_experts_reference(
    hidden_ND: Tensor,
    topk_ids_NK: Tensor,
    topk_weights_NK: Tensor,
    up_proj_EFD: Tensor,
    down_proj_EDI: Tensor,
    activation: str,
) -> Tensor:
    """The spec: run each expert on the tokens routed to it and add the weighted outputs.

    hidden_ND: [N, D]; topk_ids_NK: [N, K] int; topk_weights_NK: [N, K];
    up_proj_EFD: [E, 2I, D] ("swiglu") or [E, I, D] ("relu2"); down_proj_EDI: [E, D, I].
    Returns [N, D] in hidden's dtype:
        out[n] = sum_k weights[n, k] * down_{ids[n, k]}(act(up_{ids[n, k]}(hidden[n]))).
    The routing weight is applied after down_proj, in hidden's dtype, as transformers does.
    """
    _check_experts(hidden_ND, topk_ids_NK, up_proj_EFD, down_proj_EDI, activation)
    weights_NK = topk_weights_NK.to(hidden_ND.dtype)
    out_ND = torch.zeros_like(hidden_ND)
    for expert in range(up_proj_EFD.shape[0]):
        token_idx, slot_idx = torch.where(topk_ids_NK == expert)
        if token_idx.numel() == 0:
            continue
        h_MF = F.linear(hidden_ND[token_idx], up_proj_EFD[expert])
        y_MD = F.linear(_activate(h_MF, activation), down_proj_EDI[expert])
        out_ND.index_add_(0, token_idx, y_MD * weights_NK[token_idx, slot_idx, None])
    return out_ND


def tokens_per_expert(topk_ids_NK: Tensor, num_experts: int) -> Tensor:
    """Number of (token, slot) pairs routed to each expert: [E] int64 (a scatter-add, not bincount,
    which on CUDA waits for the device to size its output)."""
    ids_M = topk_ids_NK.flatten()
    counts_E = torch.zeros(num_experts, dtype=torch.int64, device=ids_M.device)
    return counts_E.scatter_add_(0, ids_M, torch.ones_like(ids_M, dtype=torch.int64))


def _is_16_byte_aligned(t: Tensor) -> bool:
    return t.data_ptr() % 16 == 0 and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1])


def grouped_mm_supported(
    hidden_ND: Tensor, up_proj_EFD: Tensor, down_proj_EDI: Tensor, topk_weights_NK: Tensor | None = None
) -> bool:
    """Whether `moe_experts_grouped` will call `torch.nn.functional.grouped_mm` for these inputs.

    It does when all of these hold, and uses the segmented per-expert loop otherwise:
    - torch has `F.grouped_mm` (public since torch 2.10);
    - hidden and both expert weights share one dtype: bf16 on CUDA SM80+ (the CUTLASS kernel runs on
      SM90/SM100; for other dtypes torch loops over groups itself, no better than our loop); fp32, bf16
      or fp16 on CPU;
    - 16-byte alignment: the weights' data pointers (memory-mapped safetensors may break it) and every
      row stride, i.e. D and I are multiples of 16 bytes (4 values in fp32, 8 in bf16); contiguous weights
      (the gathered tokens and activations are fresh tensors, aligned by the allocator);
    - on CPU, no autograd graph is being recorded. grouped_mm's CPU backward rejects gradients with zero
      strides (`F.grouped_mm(...).sum().backward()` fails with "Invalid strides/sizes"). The gradients
      this function feeds it are dense today and do pass, but nothing guarantees that, and grouped_mm
      measured no faster than the loop on CPU, so CPU training takes the loop;
    - not under torch.compile (inductor lowers grouped_mm for bf16 only, as transformers'
      integrations/moe.py notes, and the alignment test below reads data pointers, which dynamo cannot;
      a compiled decode step takes `moe_experts_sync_free`).
    """
    if getattr(F, "grouped_mm", None) is None:
        return False
    dtype, device = hidden_ND.dtype, hidden_ND.device
    if up_proj_EFD.dtype != dtype or down_proj_EDI.dtype != dtype:
        return False
    if device.type == "cuda":
        if dtype != torch.bfloat16 or torch.cuda.get_device_capability(device) < (8, 0):
            return False
    elif device.type == "cpu":
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return False
        tensors = (hidden_ND, up_proj_EFD, down_proj_EDI, topk_weights_NK)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
            return False
    else:
        return False
    if torch.compiler.is_compiling():  # the alignment test reads data pointers, which dynamo cannot
        return False
    if not (up_proj_EFD.is_contiguous() and down_proj_EDI.is_contiguous()):
        return False
    D, I = down_proj_EDI.shape[1], down_proj_EDI.shape[2]
    if (D * hidden_ND.element_size()) % 16 or (I * hidden_ND.element_size()) % 16:
        return False
    return all(_is_16_byte_aligned(t) for t in (up_proj_EFD, down_proj_EDI))


def _grouped_linear(x_MIn: Tensor, weight_EOutIn: Tensor, counts_E: Tensor, use_grouped_mm: bool) -> Tensor:
    """Row block e of x_MIn (counts_E[e] rows, sorted by expert) times weight_EOutIn[e].T: [M, Out]."""
    if use_grouped_mm:
        offsets_E = torch.cumsum(counts_E, dim=0, dtype=torch.int32)
        return F.grouped_mm(x_MIn, weight_EOutIn.transpose(-2, -1), offs=offsets_E)
    # Segmented fallback: one matmul per expert with tokens; differentiable everywhere.
    # counts_E.tolist() syncs with the device, which grouped_mm's offsets avoid.
    segments = torch.split(x_MIn, counts_E.tolist())
    outputs = [F.linear(x_SIn, weight_EOutIn[e]) for e, x_SIn in enumerate(segments) if x_SIn.shape[0] > 0]
    if not outputs:
        return x_MIn.new_empty(0, weight_EOutIn.shape[1])
    return torch.cat(outputs)


def _experts_on_pool(
    x_MD: Tensor, counts_E: Tensor, up_proj_EFD: Tensor, down_proj_EDI: Tensor, activation: str
) -> Tensor | None:
    """fp32 inference on CPU: both projections and the activation as tiles on the kernels' pool; None
    where ``native.expert_matmuls`` does not apply."""
    a_MI = native.expert_matmuls(x_MD, counts_E, up_proj_EFD, activation)
    return None if a_MI is None else native.expert_matmuls(a_MI, counts_E, down_proj_EDI)


def moe_experts_grouped(
    hidden_ND: Tensor,
    topk_ids_NK: Tensor,
    topk_weights_NK: Tensor,
    up_proj_EFD: Tensor,
    down_proj_EDI: Tensor,
    activation: str,
) -> Tensor:
    """Same contract and result as `moe_experts_reference`, computed as sorted grouped matmuls.

    1. sort the N*K (token, slot) pairs by expert id (stable) and gather their tokens;
    2. up-project each contiguous per-expert segment, activate, down-project;
    3. sum each token's K rows weighted by its routing weights (`native.combine`, in slot order; the
       reference adds them in expert order, so the sums agree to fp32 round-off).
    Step 2 runs on the kernels' pool (`native.expert_matmuls`: tiles of one expert's rows, each a
    single-threaded MKL sgemm, the activation fused) for fp32 inference on CPU; else `F.grouped_mm` when
    `grouped_mm_supported(...)` is true, else one matmul per non-empty expert segment.
    """
    _check_experts(hidden_ND, topk_ids_NK, up_proj_EFD, down_proj_EDI, activation)
    num_experts, K = up_proj_EFD.shape[0], topk_ids_NK.shape[1]
    use_grouped_mm = grouped_mm_supported(hidden_ND, up_proj_EFD, down_proj_EDI, topk_weights_NK)

    ids_M = topk_ids_NK.flatten()
    order_M = torch.argsort(ids_M, stable=True)
    token_M = order_M // K
    counts_E = tokens_per_expert(topk_ids_NK, num_experts)
    x_MD = torch.index_select(hidden_ND, 0, token_M)  # rows whole: faster than hidden_ND[token_M] (147 vs 210 us)

    y_MD = _experts_on_pool(x_MD, counts_E, up_proj_EFD, down_proj_EDI, activation)
    if y_MD is None:
        h_MF = _grouped_linear(x_MD, up_proj_EFD, counts_E, use_grouped_mm)
        y_MD = _grouped_linear(_activate(h_MF, activation), down_proj_EDI, counts_E, use_grouped_mm)

    row_M = torch.empty_like(order_M)
    row_M[order_M] = torch.arange(order_M.shape[0], device=order_M.device)  # where each (token, slot) went
    return native.combine(y_MD, row_M.view_as(topk_ids_NK), topk_weights_NK.to(hidden_ND.dtype))


def moe_experts_few_tokens(
    hidden_ND: Tensor,
    topk_ids_NK: Tensor,
    topk_weights_NK: Tensor,
    up_proj_EFD: Tensor,
    down_proj_EDI: Tensor,
    activation: str,
) -> Tensor:
    """Same contract as `moe_experts_reference`, for decoding: a few tokens, memory-bound.

    Each (token, chosen expert) pair is a row; `native.expert_linear` streams every chosen expert's
    weights once for all rows routed to it (no sort, no Python loop over experts or tokens), then
    the K rows of each token are weighted and summed (in slot order, not expert order: the sums
    agree with the reference to fp32 round-off).
    """
    _check_experts(hidden_ND, topk_ids_NK, up_proj_EFD, down_proj_EDI, activation)
    N, K = topk_ids_NK.shape
    expert_M = topk_ids_NK.reshape(-1)
    token_M = torch.arange(N, device=hidden_ND.device).repeat_interleave(K)
    h_MF = native.expert_linear(hidden_ND, token_M, expert_M, up_proj_EFD)
    a_MI = _activate(h_MF, activation)
    y_MD = native.expert_linear(a_MI, torch.arange(N * K, device=hidden_ND.device), expert_M, down_proj_EDI)
    weights_NK = topk_weights_NK.to(hidden_ND.dtype)
    return (y_MD.view(N, K, -1) * weights_NK[:, :, None]).sum(dim=1)


# The sync-free form copies each (token, expert) pair's weights when there are fewer pairs than experts:
# bounded, so large experts take the grouped form instead (Qwen3-Next's are 6 MB each in fp32).
GATHERED_MAX_BYTES = 64 * 2**20


def sync_free_applies(hidden_ND: Tensor, pairs: int, up_proj_EFD: Tensor, down_proj_EDI: Tensor) -> bool:
    """Whether `moe_experts_sync_free` suits ``pairs`` (token, expert) pairs: where `grouped_mm` does not
    run (it reads each expert once and never waits for the device), for a decode-sized number of pairs,
    reading no more weight bytes than the pairs' own experts take."""
    if not 0 < pairs <= native.MAX_EXPERT_ROWS or grouped_mm_supported(hidden_ND, up_proj_EFD, down_proj_EDI):
        return False
    per_expert = (up_proj_EFD[0].numel() + down_proj_EDI[0].numel()) * up_proj_EFD.element_size()
    return pairs >= up_proj_EFD.shape[0] or pairs * per_expert <= GATHERED_MAX_BYTES


def moe_experts_sync_free(
    hidden_ND: Tensor,
    topk_ids_NK: Tensor,
    topk_weights_NK: Tensor,
    up_proj_EFD: Tensor,
    down_proj_EDI: Tensor,
    activation: str,
) -> Tensor:
    """Same contract as `moe_experts_reference`, for decoding in torch with shapes known before the routing:
    no host synchronisation, so ``torch.compile`` traces it whole and a CUDA graph can hold it.

    Fewer pairs than experts: each (token, slot) pair takes a copy of its expert's weights and the
    pairs run as one batched matmul per projection (as gpt-fast's Mixtral decode). As many pairs as
    experts or more: every expert runs on every token (each expert read once), and each token keeps
    its chosen experts' rows. `sync_free_applies` says when either is worth it.
    """
    _check_experts(hidden_ND, topk_ids_NK, up_proj_EFD, down_proj_EDI, activation)
    (N, K), E = topk_ids_NK.shape, up_proj_EFD.shape[0]
    weights_NK = topk_weights_NK.to(hidden_ND.dtype)
    if N * K < E:
        ids_M = topk_ids_NK.reshape(-1)
        x_M1D = hidden_ND.repeat_interleave(K, dim=0)[:, None, :]
        a_M1I = _activate(torch.bmm(x_M1D, up_proj_EFD[ids_M].transpose(1, 2)), activation)
        y_NKD = torch.bmm(a_M1I, down_proj_EDI[ids_M].transpose(1, 2)).view(N, K, -1)
    else:
        x_END = hidden_ND.expand(E, N, hidden_ND.shape[1])
        a_ENI = _activate(torch.bmm(x_END, up_proj_EFD.transpose(1, 2)), activation)
        y_END = torch.bmm(a_ENI, down_proj_EDI.transpose(1, 2))
        y_NKD = y_END[topk_ids_NK, torch.arange(N, device=hidden_ND.device)[:, None]]
    return (y_NKD * weights_NK[:, :, None]).sum(dim=1)


def route(
    router_logits_NE: Tensor,
    top_k: int,
    scoring: str = "softmax",
    expert_bias_E: Tensor | None = None,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
    num_groups: int = 1,
    topk_groups: int = 1,
) -> tuple[Tensor, Tensor, Tensor]:
    """Choose K experts per token and their weights, in fp32.

    router_logits_NE: [N, E]. Returns (topk_ids_NK int64, topk_weights_NK fp32, scores_NE fp32).
    - scoring "softmax" (Qwen3-Next, Jamba, Mixtral) or "sigmoid" (DeepSeek-V3, NemotronH);
    - expert_bias_E ("e_score_correction_bias", DeepSeek-V3 aux-loss-free balancing) shifts the scores
      only to choose experts; the weights are gathered from the unbiased scores;
    - num_groups > 1: DeepSeek-V3 grouped top-k. A group scores the sum of its two best (biased) expert
      scores; only the best topk_groups groups stay eligible;
    - norm_topk_prob renormalises the K weights to sum 1; then all are scaled by routed_scaling_factor.
    """
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    N, E = router_logits_NE.shape
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must be in [1, num_experts={E}], got {top_k}")

    logits_NE = upcast(router_logits_NE)
    scores_NE = logits_NE.softmax(dim=-1) if scoring == "softmax" else logits_NE.sigmoid()
    choice_NE = scores_NE if expert_bias_E is None else scores_NE + upcast(expert_bias_E)

    if num_groups > 1:
        if E % num_groups or not 1 <= topk_groups <= num_groups:
            raise ValueError(
                f"grouped routing needs num_experts ({E}) divisible by num_groups ({num_groups}) and "
                f"1 <= topk_groups ({topk_groups}) <= num_groups"
            )
        experts_per_group = E // num_groups
        if top_k > topk_groups * experts_per_group:
            raise ValueError(
                f"top_k={top_k} exceeds the {topk_groups * experts_per_group} experts left in "
                f"topk_groups={topk_groups} groups of {experts_per_group}"
            )
        choice_NGX = choice_NE.view(N, num_groups, experts_per_group)
        group_scores_NG = choice_NGX.topk(min(2, experts_per_group), dim=-1).values.sum(dim=-1)
        kept_groups_NG = torch.topk(group_scores_NG, topk_groups, dim=-1).indices
        keep_NG = torch.zeros_like(group_scores_NG, dtype=torch.bool).scatter_(1, kept_groups_NG, True)
        # -inf is below any finite score, so a dropped group's experts are never among the top_k.
        choice_NE = choice_NGX.masked_fill(~keep_NG[:, :, None], float("-inf")).view(N, E)

    topk_ids_NK = torch.topk(choice_NE, top_k, dim=-1).indices
    topk_weights_NK = scores_NE.gather(1, topk_ids_NK)
    if norm_topk_prob:
        # 1e-20 keeps an all-zero sigmoid row finite (DeepSeek-V3); it is below fp32 resolution otherwise.
        topk_weights_NK = topk_weights_NK / (topk_weights_NK.sum(dim=-1, keepdim=True) + 1e-20)
    return topk_ids_NK, topk_weights_NK * routed_scaling_factor, scores_NE
