"""HybridLM.compile_decode: the compiled decode step against the eager one on the same weights, and its fallback.

The eager step on CPU in fp32 runs hybridlm's C kernels; the compiled one traces the torch forms (torch.compile
cannot see into the kernels), so the two are independent computations of the same logits.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from hybridlm import compiled_decode
from hybridlm.model import HybridLM
from tests.helpers import assert_close, tiny_config

PATTERN = "MEGm*-EMP"  # every block type


def _twins(pattern: str = PATTERN) -> tuple[HybridLM, HybridLM]:
    torch.manual_seed(0)
    model = HybridLM(tiny_config(pattern)).eval()
    eager = HybridLM(tiny_config(pattern)).eval()
    eager.load_state_dict(model.state_dict())
    return model, eager


def _decode_side_by_side(model: HybridLM, eager: HybridLM, lengths: list[int], steps: int) -> None:
    """Prefill slots of ``lengths`` tokens (left-padded), then decode ``steps`` greedy tokens with both models;
    every step's logits must agree."""
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (len(lengths), max(lengths)))
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, -n:] = 1
    caches = [m.new_cache(len(lengths), max(lengths) + steps) for m in (model, eager)]
    with torch.inference_mode():
        logits = [
            m(ids, cache=c, attention_mask=mask, last_logits_only=True).logits[:, -1]
            for m, c in zip((model, eager), caches, strict=True)
        ]
        for step in range(steps):
            tokens = logits[1].argmax(-1)
            logits = [m.decode_step(tokens, c) for m, c in zip((model, eager), caches, strict=True)]
            assert_close(logits[0], logits[1], name=f"logits of step {step}")
    assert caches[0].host_lengths == caches[1].host_lengths == [n + steps for n in lengths]


def test_compiled_decode_matches_eager_for_every_block_type(monkeypatch):
    """Three slots of different lengths, then one slot (a batch of one compiles apart), each decoding across
    attention's read-width buckets (4 columns here, so the width grows every 4 tokens, as it does every 256)."""
    monkeypatch.setattr(compiled_decode, "KV_BUCKET", 4)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model, eager = _twins()
    model.compile_decode()
    _decode_side_by_side(model, eager, lengths=[9, 4, 1], steps=6)
    _decode_side_by_side(model, eager, lengths=[3], steps=6)
    assert model.compiled_decode.failure is None
    # two graphs per batch size, both compiled inside its check (attention reading to the cache's end and
    # short of it): the decoding after them compiled nothing unchecked; and nothing split a graph
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 4
    assert dict(torch._dynamo.utils.counters["graph_break"]) == {}


def _forgetting_states(blocks):
    """Right logits, then every state tensor zeroed: wrong only from the next step on."""

    def step(hidden, context, cache):
        logits = blocks(hidden, context, cache)
        for tensor in cache.state_tensors():
            tensor.zero_()
        return logits

    return step


def _compile_returning(fake):
    def fake_compile(function, **kwargs):
        return fake(function)

    return fake_compile


@pytest.mark.parametrize(
    ("fake", "reason"),
    [
        (lambda blocks: lambda *args: (_ for _ in ()).throw(RuntimeError("no backend")), "RuntimeError: no backend"),
        (lambda blocks: lambda *args: blocks(*args) + 1.0, "logits differ from the eager step's by up to"),
        (lambda blocks: lambda *args: blocks(*args) * float("nan"), "logits differ"),
        (lambda blocks: _forgetting_states(blocks), "states differ"),
    ],
    ids=["raises", "wrong-logits", "nan", "wrong-states"],
)
def test_a_failing_or_wrong_compiled_step_is_warned_and_decoding_stays_eager(monkeypatch, fake, reason):
    monkeypatch.setattr(compiled_decode.torch, "compile", _compile_returning(fake))
    model, eager = _twins("ME*")
    model.compile_decode()
    with pytest.warns(UserWarning, match=f"torch.compile of the decode step: .*{reason}.*; decoding eagerly"):
        _decode_side_by_side(model, eager, lengths=[5, 2], steps=3)
    assert reason.split(":")[0] in model.compiled_decode.failure


def test_compiled_step_is_not_used_while_recording_gradients(monkeypatch):
    monkeypatch.setattr(compiled_decode.torch, "compile", _compile_returning(lambda blocks: pytest.fail))
    model, _ = _twins("ME*")
    model.compile_decode()
    cache = model.new_cache(2, 8)
    model(torch.zeros(2, 3, dtype=torch.long), cache=cache)
    model.decode_step(torch.zeros(2, dtype=torch.long), cache)  # gradients on: eager
    assert model.compiled_decode.failure is None


class _Observer:
    def before_block(self, *args):
        pass

    def after_block(self, *args):
        pass


def test_an_observer_and_a_compiled_step_are_refused_together():
    """An observer times each block; the compiled step is one graph: either order is one clear error."""
    model, _ = _twins("ME")
    model.compile_decode()
    with pytest.raises(ValueError, match=r"times every block .* compiled decode step is one graph"):
        model.block_observer = _Observer()
    model.compile_decode(None)
    model.block_observer = _Observer()
    with pytest.raises(ValueError, match=r"compile_decode\(None\) first, or detach the observer"):
        model.compile_decode()


def test_compile_decode_refuses_an_unknown_mode_and_turns_off_with_none():
    model, _ = _twins("ME")
    with pytest.raises(ValueError, match=r"compile mode must be one of default, reduce-overhead, .*got 'fast'"):
        model.compile_decode("fast")
    model.compile_decode()
    assert model.compiled_decode is not None
    model.compile_decode(None)
    assert model.compiled_decode is None
