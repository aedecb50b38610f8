"""The all-to-all exchanges of expert parallelism: rows of uneven counts between ranks, differentiable.

Legend: W ranks in the group, L experts per rank, D hidden size, S rows sent, R rows received.

``torch.distributed.all_to_all_single`` with uneven splits runs on gloo (CPU) and NCCL (GPU). Its
autograd form (``torch.distributed.nn.functional.all_to_all_single``) is deprecated in torch 2.13 in
favour of a private module, so the backward is written here: the gradient of an all-to-all is the
all-to-all of the gradients with the send and receive splits swapped.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

ProcessGroup = dist.ProcessGroup


def exchange_counts(counts_WL: Tensor, group: ProcessGroup | None = None) -> Tensor:
    """counts_WL [W, L]: row b holds how many rows this rank sends to each of rank b's L experts.

    Returns [W, L]: row a holds how many rows rank a sends to each of this rank's experts. Every rank
    must call it, even with nothing to send (a collective waits for all ranks).
    """
    received_WL = torch.empty_like(counts_WL)
    dist.all_to_all_single(received_WL, counts_WL.contiguous(), group=group)
    return received_WL


def exchange_rows(
    rows_SD: Tensor, send_splits: list[int], recv_splits: list[int], group: ProcessGroup | None = None
) -> Tensor:
    """Send ``send_splits[b]`` consecutive rows of rows_SD to rank b; returns the R = sum(recv_splits) rows
    received, rank 0's first. Differentiable: gradients travel back along the same routes."""
    return _AllToAll.apply(rows_SD, tuple(send_splits), tuple(recv_splits), group)


def _all_to_all(rows_SD: Tensor, send_splits: tuple[int, ...], recv_splits: tuple[int, ...], group) -> Tensor:
    received_RD = rows_SD.new_empty(sum(recv_splits), *rows_SD.shape[1:])
    dist.all_to_all_single(received_RD, rows_SD.contiguous(), list(recv_splits), list(send_splits), group=group)
    return received_RD


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows_SD: Tensor, send_splits: tuple[int, ...], recv_splits: tuple[int, ...], group) -> Tensor:
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        return _all_to_all(rows_SD, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, grad_RD: Tensor) -> tuple[Tensor, None, None, None]:
        return _all_to_all(grad_RD, ctx.recv_splits, ctx.send_splits, ctx.group), None, None, None
