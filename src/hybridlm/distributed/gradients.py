"""Gradients of an expert-parallel training step, made equal to one process's.

The convention (Megatron-LM's for expert parallelism over data-parallel ranks): every rank runs the
model on its own share of the batch and calls ``backward`` on its loss L_r (a mean over that share).
The step's loss is L = mean over ranks of L_r, so

- a replicated parameter (router, attention, Mamba, shared experts, embeddings...) sees only its
  own rank's tokens: dL/dp = mean over ranks of dL_r/dp, an all-reduce average;
- a rank's local expert already holds sum over ranks of dL_r/dp, because the backward of the
  all-to-all brings every rank's gradients home to the expert that served them: dL/dp is that sum
  divided by the world size, with no communication.

After ``average_gradients`` every rank holds the gradient of L: all of it for the replicated
parameters, its slice for the experts, exactly what one process computes for L.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from hybridlm.distributed.exchange import ProcessGroup
from hybridlm.distributed.experts import sharded_experts


def average_gradients(model: nn.Module, group: ProcessGroup | None = None) -> None:
    """Turn each rank's gradients of its own loss into the gradients of the ranks' mean loss (above).

    Call on every rank after ``backward``, before the optimizer step. A replicated parameter without
    a gradient on some rank counts as zeros there (every rank must join the same all-reduce).
    """
    world_size = dist.get_world_size(group)
    expert_params = {id(p) for experts in sharded_experts(model) for p in experts.parameters()}
    replicated = [p for p in model.parameters() if p.requires_grad and id(p) not in expert_params]
    for param in replicated:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    if replicated:
        flat = torch.cat([p.grad.flatten() for p in replicated])  # one all-reduce for all of them
        dist.all_reduce(flat, group=group)
        flat /= world_size
        for param, grad in zip(replicated, flat.split([p.numel() for p in replicated]), strict=True):
            param.grad.copy_(grad.view_as(param))
    for experts in sharded_experts(model):
        for param in experts.parameters():
            if param.grad is not None:
                param.grad /= world_size
