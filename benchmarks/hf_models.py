"""The two ~110M-parameter checkpoints the speed benchmarks run, built by transformers (fixed seed).

- ``nemotron_h``: pattern ``MEMEM*EMEM*E`` (5 Mamba-2, 2 GQA attention, 5 MoE), hidden 512, Mamba-2
  16 heads x 64 in 2 groups with state 128, attention 8 query / 2 KV heads x 64, 8 routed relu2
  experts of 1536 top-2 + 1 shared of 1536, vocab 32000: 114.1M parameters, 50.6M active without the
  input embedding (the model of issue 8).
- ``qwen3_next``: 8 layers, Gated DeltaNet x3 then gated attention, each followed by an MoE of 8 swiglu
  experts of 640 top-2 + a gated shared expert of 1024, hidden 512, vocab 32000.

Both are saved with ``save_pretrained`` so hybridlm, transformers and llama.cpp's converter read the
same files.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

VOCAB_SIZE = 32000
HIDDEN_SIZE = 512


def config(family: str):
    """The transformers config of ``family`` ("nemotron_h" or "qwen3_next")."""
    import transformers

    if family == "nemotron_h":
        return transformers.NemotronHConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=HIDDEN_SIZE,
            hybrid_override_pattern="MEMEM*EMEM*E",
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=64,
            mamba_num_heads=16,
            mamba_head_dim=64,
            n_groups=2,
            ssm_state_size=128,
            conv_kernel=4,
            chunk_size=128,
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=1536,
            moe_shared_expert_intermediate_size=1536,
            n_group=1,
            topk_group=1,
            norm_topk_prob=True,
            routed_scaling_factor=1.0,
            max_position_embeddings=32768,
            tie_word_embeddings=False,
        )
    elif family == "qwen3_next":
        return transformers.Qwen3NextConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=HIDDEN_SIZE,
            num_hidden_layers=8,
            full_attention_interval=4,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=64,
            linear_num_key_heads=8,
            linear_num_value_heads=8,
            linear_key_head_dim=64,
            linear_value_head_dim=64,
            linear_conv_kernel_dim=4,
            intermediate_size=1024,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=640,
            shared_expert_intermediate_size=1024,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            max_position_embeddings=32768,
            tie_word_embeddings=False,
        )
    else:
        raise ValueError(f"family must be 'nemotron_h' or 'qwen3_next', got {family!r}")
    return config


def build(family: str, seed: int = 0):
    """A float32, eval-mode transformers model of ``family`` with weights drawn from ``seed``."""
    import transformers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config(family))
    return model.to(torch.float32).eval()


def build_and_save(family: str, directory: str | Path, seed: int = 0):
    """Build ``family``, save it to ``directory``, return it. A directory already holding this very
    config is reused; one holding another is rebuilt (written beside it, then swapped in)."""
    import transformers

    directory = Path(directory)
    saved = directory / "config.json"
    wanted = json.loads(config(family).to_json_string(use_diff=False))  # as save_pretrained writes it
    if saved.exists() and _same_config(json.loads(saved.read_text()), wanted):
        return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    model = build(family, seed)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    model.save_pretrained(staging)
    if directory.exists():
        shutil.rmtree(directory)
    staging.rename(directory)
    return model


def _same_config(saved: dict, wanted: dict) -> bool:
    """Every field the saved config.json records (past the bookkeeping ones) has the wanted value."""
    ignored = {"transformers_version", "architectures", "dtype", "torch_dtype", "_name_or_path"}
    return all(wanted.get(key) == value for key, value in saved.items() if key not in ignored)
