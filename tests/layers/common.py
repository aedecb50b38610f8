"""Helpers shared by the layer tests: contexts, parameter noise, gradient checks, and the mechanics of
the state, left-padding and gradient tests that several mixers repeat.

The truths in the test files are written in float64 from the layer's own parameters and compared with
tests.helpers.assert_close: a float32 layer at rtol 1e-5, a float64 layer at rtol 2e-14.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from hybridlm.cache import BlockState, ForwardContext, RecurrentState
from tests.helpers import assert_close


def params64(module: nn.Module) -> dict[str, Tensor]:
    """The module's parameters and buffers as float64 copies, for the truths."""
    return {name: t.detach().double() for name, t in module.state_dict().items()}


def perturb_(module: nn.Module, std: float = 0.3, seed: int = 1) -> nn.Module:
    """Add noise to every parameter, so that zero biases, unit norm weights and D = 1 are not special."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return module


def context(batch: int, seq_len: int, past_len: int = 0, token_mask: Tensor | None = None) -> ForwardContext:
    """The context of a call of seq_len tokens after past_len earlier ones (in the same calls for every
    row). Without a mask, positions past_len .. past_len + seq_len - 1; with a token mask over all
    past_len + seq_len tokens (left padding), each new token's index among its row's real tokens, and
    each row's cache holding only its real past tokens (the slot layout of hybridlm.cache)."""
    if token_mask is None:
        positions = torch.arange(past_len, past_len + seq_len).expand(batch, seq_len)
        past_lengths = torch.full((batch,), past_len)
        return ForwardContext(positions, None, past_lengths, past_len, past_len + seq_len)
    past_lengths = token_mask[:, :past_len].sum(-1)
    new_mask = token_mask[:, past_len:]
    positions = past_lengths[:, None] + (new_mask.long().cumsum(-1) - 1).clamp_min(0)
    lengths = past_lengths.tolist()
    uniform = lengths[0] if all(n == lengths[0] for n in lengths) else None
    longest = int(token_mask.sum(-1).max())
    return ForwardContext(positions, None if bool(new_mask.all()) else new_mask, past_lengths, uniform, longest)


def left_padding_mask(seq_len: int, pads: list[int]) -> Tensor:
    """[len(pads), seq_len] bool, False on the first pads[b] positions of row b."""
    return torch.arange(seq_len)[None, :] >= torch.tensor(pads)[:, None]


def assert_finite_grads(module: nn.Module, loss: Tensor, skip: tuple[str, ...] = ()) -> None:
    """loss.backward() reaches every trainable parameter with a finite gradient."""
    module.zero_grad(set_to_none=True)
    loss.backward()
    for name, p in module.named_parameters():
        if not p.requires_grad or name in skip:
            continue
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"


def assert_finite_grads_of_call(layer: nn.Module, x: Tensor) -> None:
    """layer(x) over a whole (B, T, ...) sequence, then a random projection of the output backpropagated:
    every trainable parameter gets a finite gradient (``x.grad`` is left for the caller to check)."""
    y = layer(x, context(*x.shape[:2]))
    assert_finite_grads(layer, (y * torch.randn_like(y)).sum())


def run_in_pieces(layer: nn.Module, x: Tensor, splits: tuple[int, ...], state: BlockState) -> Tensor:
    """layer over x (B, T, ...) in consecutive pieces of splits[0], splits[1], ... tokens (the last length
    repeats until T is covered), each with its past length and all carrying ``state``; the outputs joined."""
    batch, seq_len = x.shape[:2]
    outputs: list[Tensor] = []
    past = 0
    while past < seq_len:
        length = splits[min(len(outputs), len(splits) - 1)]
        outputs.append(layer(x[:, past : past + length], context(batch, length, past_len=past), state))
        past += length
    return torch.cat(outputs, dim=1)


def random_state(layer: nn.Module, batch: int, max_len: int) -> tuple[RecurrentState, Tensor, Tensor]:
    """A float32 RecurrentState filled with noise, with copies of its conv and recurrent tensors as they start."""
    state = layer.new_state(batch, max_len, torch.device("cpu"), torch.float32)
    state.conv.copy_(torch.randn_like(state.conv))
    state.recurrent.copy_(torch.randn_like(state.recurrent))
    return state, state.conv.clone(), state.recurrent.clone()


def assert_state_close(state: RecurrentState, conv: Tensor, recurrent: Tensor, recurrent_name: str) -> None:
    assert_close(state.conv, conv, name="conv state")
    assert_close(state.recurrent, recurrent, name=recurrent_name)


def left_padded_call(layer: nn.Module, x: Tensor, pads: list[int]) -> tuple[Tensor, Tensor]:
    """layer over x (len(pads), T, ...) with the first pads[b] tokens of row b as padding: (y, token mask)."""
    token_mask = left_padding_mask(x.shape[1], pads)
    return layer(x, context(len(pads), x.shape[1], token_mask=token_mask)), token_mask


def assert_rows_match_alone(y: Tensor, x: Tensor, pads: list[int], alone: Callable[[Tensor], Tensor]) -> None:
    """Each row's real part, y[b, pads[b]:], equals alone(x[b : b + 1, pads[b]:]), its sequence without padding."""
    for b, pad in enumerate(pads):
        assert_close(y[b : b + 1, pad:], alone(x[b : b + 1, pad:]), name=f"row {b}")


class _Call(nn.Module):
    def __init__(self, layer: nn.Module, fn: Callable[..., Tensor | tuple[Tensor, ...]]) -> None:
        super().__init__()
        self.layer = layer
        self.fn = fn

    def forward(self, *inputs: Tensor) -> Tensor | tuple[Tensor, ...]:
        return self.fn(self.layer, *inputs)


def gradcheck_layer(
    layer: nn.Module, inputs: tuple[Tensor, ...], fn: Callable[..., Tensor | tuple[Tensor, ...]]
) -> None:
    """float64 torch.autograd.gradcheck of fn(layer, *inputs) w.r.t. the inputs and every trainable parameter.

    ``layer`` must already be float64 and ``inputs`` float64 leaves with requires_grad.
    """
    call = _Call(layer, fn)
    names = [f"layer.{n}" for n, p in layer.named_parameters() if p.requires_grad]
    params = [p.detach().clone().requires_grad_(True) for p in layer.parameters() if p.requires_grad]
    num_inputs = len(inputs)

    def run(*args: Tensor) -> Tensor | tuple[Tensor, ...]:
        return torch.func.functional_call(call, dict(zip(names, args[num_inputs:], strict=True)), args[:num_inputs])

    assert torch.autograd.gradcheck(run, (*inputs, *params))
