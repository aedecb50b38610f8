"""The block registry: every entry's facts agree with the module it builds, and a new block type
needs one entry and one module, nothing else."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from hybridlm.accounting import block_params, cache_bytes, count_params
from hybridlm.blocks import BLOCKS, LAYER_TYPES, BlockSpec, block_spec
from hybridlm.cache import RecurrentState
from hybridlm.config import HybridConfig
from hybridlm.layers.base import BlockModule, BlockParams, StateTensor, allocate
from hybridlm.model import HybridLM
from hybridlm.presets import get_preset
from tests.helpers import assert_close


def _leaves(state) -> dict[str, Tensor]:
    """Every tensor of a block state, by dotted field name."""
    if state is None:
        return {}
    out = {}
    for name, value in vars(state).items():
        if isinstance(value, Tensor):
            out[name] = value
        else:
            out.update({f"{name}.{k}": v for k, v in _leaves(value).items()})
    return out


@pytest.mark.parametrize("char", list(BLOCKS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_tensors_describe_exactly_what_new_state_allocates(char, dtype):
    config = get_preset("debug-tiny").replace(pattern=char)
    model = HybridLM(config).to(dtype)
    state = model.layers[0].mixer.new_state(3, 11, torch.device("cpu"), dtype)
    allocated = sorted((tuple(t.shape), t.dtype) for t in _leaves(state).values())
    described = sorted((t.shape, t.dtype(dtype)) for t in block_spec(char).module.state_tensors(config, 3, 11))
    assert allocated == described
    assert BLOCKS[char].mixes_sequence == (state is not None)
    if state is not None:
        assert all(t.dtype == torch.float32 for name, t in _leaves(state).items() if name.endswith("recurrent"))


@pytest.mark.parametrize("char", list(BLOCKS))
def test_module_param_count_matches_the_built_block(char):
    config = get_preset("debug-tiny").replace(pattern=char)
    block = HybridLM(config).layers[0]
    assert block_params(char, config).total == sum(p.numel() for p in block.parameters())


def test_every_layer_type_name_is_unique_and_the_model_uses_them():
    assert len(set(LAYER_TYPES)) == len(BLOCKS)
    config = get_preset("debug-tiny")
    model = HybridLM(config)
    assert [b.layer_type for b in model.layers] == [BLOCKS[c].layer_type for c in config.pattern]


def test_unknown_character_is_refused_by_name():
    with pytest.raises(ValueError, match=r"'Q' is not a block type"):
        block_spec("Q")


class _Scale(BlockModule):
    """A toy per-token block: x * weight (one vector of hidden_size parameters, no state)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.full((hidden_size,), 0.5))

    @classmethod
    def from_config(cls, config: HybridConfig) -> _Scale:
        return cls(config.hidden_size)

    @staticmethod
    def count_params(config: HybridConfig) -> BlockParams:
        return BlockParams(config.hidden_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight


class _Decay(BlockModule):
    """A toy sequence mixer with a state: h_t = 0.5 h_{t-1} + x_t, output h_t."""

    @classmethod
    def from_config(cls, config: HybridConfig) -> _Decay:
        module = cls()
        module.config = config
        return module

    @staticmethod
    def count_params(config: HybridConfig) -> BlockParams:
        return BlockParams(0, 0)

    @staticmethod
    def state_tensors(config: HybridConfig, batch_size: int, max_seq_len: int) -> list[StateTensor]:
        return [
            StateTensor("conv", "conv", (batch_size, 0)),  # RecurrentState has a conv field; this block has none
            StateTensor("recurrent", "recurrent", (batch_size, config.hidden_size)),
        ]

    def new_state(self, batch_size, max_seq_len, device, dtype):
        return RecurrentState(**allocate(self.state_tensors(self.config, batch_size, max_seq_len), device, dtype))

    def forward(self, x: Tensor, context, state: RecurrentState | None = None) -> Tensor:
        h = torch.zeros_like(x[:, 0]) if state is None else state.recurrent.to(x.dtype)
        outputs = []
        for t in range(x.shape[1]):
            h = 0.5 * h + x[:, t]
            outputs.append(h)
        if state is not None:
            state.recurrent.copy_(h)
        return torch.stack(outputs, 1)


def test_a_new_block_type_is_one_entry_and_one_module(monkeypatch):
    """Register two toy blocks and use them everywhere a character's meaning is asked: config
    validation, the model, the cache, accounting, and a cached decode against a full forward."""
    monkeypatch.setitem(BLOCKS, "S", BlockSpec("S", "scale", (), _Scale, False))
    monkeypatch.setitem(BLOCKS, "D", BlockSpec("D", "decay", (), _Decay, True))
    config = get_preset("debug-tiny").replace(pattern="SD*D")
    model = HybridLM(config).eval()
    assert count_params(config).total == sum(p.numel() for p in model.parameters())
    assert count_params(config).by_layer_type["decay"]["blocks"] == 2
    assert cache_bytes(config, 2, 9, torch.float32).recurrent == 2 * 2 * config.hidden_size * 4
    ids = torch.randint(0, config.vocab_size, (2, 9))
    full = model(ids).logits
    cache = model.new_cache(2, 9)
    assert cache.bytes_by_kind()["recurrent"] == cache_bytes(config, 2, 9, torch.float32).recurrent
    steps = [model(ids[:, :5], cache=cache).logits]
    steps += [model(ids[:, t : t + 1], cache=cache).logits for t in range(5, 9)]
    # measured 1.8e-7 absolute (fp32 accumulation order of the attention block): within fp32's default
    assert_close(torch.cat(steps, 1), full, name="cached decode vs full forward")
