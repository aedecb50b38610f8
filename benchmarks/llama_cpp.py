"""llama.cpp on the benchmark checkpoints, for bench_decode (optional: skipped, with the reason, when absent).

llama-cpp-python is not a dependency of hybridlm: it builds llama.cpp from source (~8-15 minutes on
2 cores). Install it in this Python or in a venv of its own and point ``LLAMA_CPP_PYTHON`` at that
venv's python; ``LLAMA_CPP_SOURCE`` is a llama.cpp source tree holding ``convert_hf_to_gguf.py`` (the
llama-cpp-python sdist carries one under ``vendor/llama.cpp``). The defaults are where this project's
machines keep them. The timings run in a subprocess of that python (``LLAMA_CPP_WORKER``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from benchmarks.common import random_prompts

if TYPE_CHECKING:
    from benchmarks.bench_decode import Settings

_DEFAULT_DIR = Path("/work/llamacpp")
LLAMA_CPP_PYTHON = Path(os.environ.get("LLAMA_CPP_PYTHON", _DEFAULT_DIR / "venv/bin/python"))
LLAMA_CPP_SOURCE = Path(os.environ.get("LLAMA_CPP_SOURCE", _DEFAULT_DIR / "llama_cpp_python-0.3.36/vendor/llama.cpp"))


def find_llama_cpp(mode: str) -> tuple[Path | None, str]:
    """The python that imports llama_cpp (this one, else llama.cpp's own venv), or None and why not."""
    if mode == "off":
        return None, "--llama-cpp off"
    if not (LLAMA_CPP_SOURCE / "convert_hf_to_gguf.py").exists():
        return None, f"llama.cpp's converter not found under {LLAMA_CPP_SOURCE}"
    for python in (Path(sys.executable), LLAMA_CPP_PYTHON):
        if python.exists() and subprocess.run([python, "-c", "import llama_cpp"], capture_output=True).returncode == 0:
            return python, ""
    return None, f"llama_cpp is importable neither here nor with {LLAMA_CPP_PYTHON} (still building?)"


def bench_llama_cpp(
    python: Path, checkpoint: Path, family: str, settings: Settings, vocab_size: int, reference: list[int]
) -> dict:
    """llama.cpp's speeds on ``checkpoint`` (same prompts as the torch runs), and how many of its greedy
    tokens at batch 1 match ``reference`` (hybridlm's)."""
    prompt_len = settings.prompt_len
    try:
        gguf = convert_to_gguf(checkpoint, family)
    except RuntimeError as error:
        print(f"llama.cpp: skipped for {family} ({error})", flush=True)
        return {"skipped": str(error)}
    spec = {
        "gguf": str(gguf),
        "threads": torch.get_num_threads(),
        "prefill_lengths": list(settings.prefill_lengths),
        "decode_batches": list(settings.decode_batches),
        "prompt_len": prompt_len,
        "new_tokens": settings.new_tokens,
        "repeats": settings.repeats,
        "prompts": {str(b): random_prompts(b, prompt_len, vocab_size, b).tolist() for b in settings.decode_batches},
        "prefill_prompts": {str(t): random_prompts(1, t, vocab_size)[0].tolist() for t in settings.prefill_lengths},
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json") as spec_file:
        json.dump(spec, spec_file)
        spec_file.flush()
        done = subprocess.run(
            [python, "-c", LLAMA_CPP_WORKER, spec_file.name], capture_output=True, text=True, env=passive_env()
        )
    if done.returncode != 0:
        reason = f"llama.cpp worker failed (exit {done.returncode}): {done.stderr.strip()[-400:]}"
        print(reason, flush=True)
        return {"failed": reason}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    tokens = result.pop("tokens")
    result["greedy_tokens_agree_with_hybridlm"] = f"{_prefix_length(tokens, reference)}/{len(reference)}"
    result["gguf"] = str(gguf)
    return result


def _prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def passive_env() -> dict[str, str]:
    return {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}


def convert_to_gguf(checkpoint: Path, family: str) -> Path:
    """``checkpoint`` as an f32 GGUF written by llama.cpp's ``convert_hf_to_gguf.py`` (cached beside it).

    The converter insists on a tokenizer and on recognising its pre-tokenizer by hash. The checkpoint
    has none, so a staging folder links its weights and config and adds a byte-level BPE tokenizer of
    the model's vocabulary; the pre-tokenizer is declared "gpt-2" (the benchmark feeds token ids, so
    text handling never runs). Qwen3-Next's converter expects an MTP head unless told ``--no-mtp``.
    """
    gguf = checkpoint.parent / f"{checkpoint.name}.f32.gguf"
    weights = checkpoint / "model.safetensors"
    if gguf.exists() and gguf.stat().st_mtime >= weights.stat().st_mtime:
        return gguf
    print(f"llama.cpp: converting {checkpoint} to {gguf}", flush=True)
    with tempfile.TemporaryDirectory(dir=checkpoint.parent) as staging:
        source = Path(staging) / "source"
        source.mkdir()
        for name in ("config.json", "model.safetensors"):
            (source / name).symlink_to((checkpoint / name).resolve())
        write_byte_level_tokenizer(source, json.loads((checkpoint / "config.json").read_text())["vocab_size"])
        partial = Path(staging) / "model.gguf"
        command = [sys.executable, "-c", CONVERTER_SHIM, str(LLAMA_CPP_SOURCE), str(source)]
        command += ["--outtype", "f32", "--outfile", str(partial)] + (["--no-mtp"] if family == "qwen3_next" else [])
        done = subprocess.run(command, capture_output=True, text=True, env=passive_env())
        if done.returncode != 0 or not partial.exists():
            raise RuntimeError(f"convert_hf_to_gguf.py failed (exit {done.returncode}): {done.stderr.strip()[-400:]}")
        partial.replace(gguf)
    return gguf


def write_byte_level_tokenizer(directory: Path, vocab_size: int) -> None:
    """A GPT-2-style byte-level BPE with exactly ``vocab_size`` tokens: the 256 byte symbols, then
    merges of symbol pairs in order. Enough for converters that want a tokenizer; it tokenises nothing well."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(symbols)}
    merges = []
    pairs = ((a, b) for a in symbols for b in symbols)
    while len(vocab) < vocab_size:
        a, b = next(pairs)
        vocab[a + b] = len(vocab)
        merges.append((a, b))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))


# Runs llama.cpp's converter with its gguf-py on the path and the pre-tokenizer check answered "gpt-2".
CONVERTER_SHIM = r"""
import runpy, sys
source = sys.argv.pop(1)
sys.path[:0] = [source, source + "/gguf-py"]
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv[0] = source + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""

# Times a GGUF with llama-cpp-python's low-level API (one llama_batch per step, every sequence of the
# batch in it, greedy argmax in numpy), interleaving nothing: it runs alone in its own process.
LLAMA_CPP_WORKER = r"""
import ctypes, json, sys, time
import numpy as np
from llama_cpp import llama_cpp as C

spec = json.load(open(sys.argv[1]))
quiet = C.llama_log_callback(lambda level, text, data: None)
C.llama_log_set(quiet, None)
C.llama_backend_init()
model = C.llama_model_load_from_file(spec["gguf"].encode(), C.llama_model_default_params())
n_vocab = C.llama_vocab_n_tokens(C.llama_model_get_vocab(model))
longest = max(spec["prefill_lengths"] + [spec["prompt_len"] + spec["new_tokens"]])
max_batch = max(spec["decode_batches"])
params = C.llama_context_default_params()
params.n_ctx = max_batch * longest  # split evenly between the n_seq_max sequences
params.n_batch = params.n_ubatch = max(longest, max_batch * spec["prompt_len"])
params.n_seq_max = max_batch
params.n_threads = params.n_threads_batch = spec["threads"]
params.type_k = params.type_v = 0  # GGML_TYPE_F32: an fp32 KV cache like the other two (default f16)
ctx = C.llama_init_from_model(model, params)
memory = C.llama_get_memory(ctx)
batch = C.llama_batch_init(params.n_batch, 0, max_batch)

def decode(rows):  # rows: (token, position, sequence, wants logits)
    batch.n_tokens = len(rows)
    for i, (token, position, sequence, logits) in enumerate(rows):
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, position, 1
        batch.seq_id[i][0], batch.logits[i] = sequence, logits
    code = C.llama_decode(ctx, batch)
    if code != 0:
        raise RuntimeError(f"llama_decode returned {code}")

def argmax(i):
    return int(np.ctypeslib.as_array(C.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).argmax())

def prefill(prompts):
    C.llama_memory_clear(memory, True)
    T = len(prompts[0])
    decode([(t, p, s, p == T - 1) for s, prompt in enumerate(prompts) for p, t in enumerate(prompt)])
    return [argmax(s * T + T - 1) for s in range(len(prompts))]

def generate(prompts, new_tokens):
    out = [[t] for t in prefill(prompts)]
    T = len(prompts[0])
    for step in range(new_tokens - 1):
        decode([(row[-1], T + step, s, True) for s, row in enumerate(out)])
        for s, row in enumerate(out):
            row.append(argmax(s))
    return out

def best(fn):
    fn()
    times = []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)

n = spec["new_tokens"]
result = {"prefill": {}, "decode": {}, "generate_seconds": None, "n_threads": spec["threads"], "n_seq_max": max_batch}
for T, prompt in spec["prefill_prompts"].items():
    result["prefill"][T] = int(T) / best(lambda: prefill([prompt]))
for B, prompts in spec["prompts"].items():
    one, full = best(lambda: generate(prompts, 1)), best(lambda: generate(prompts, n))
    result["decode"][B] = int(B) * (n - 1) / (full - one)
    if B == "1":
        result["generate_seconds"] = full
result["tokens"] = generate(spec["prompts"]["1"], n)[0]
print(json.dumps(result))
"""


def merge_llama_cpp(rows: dict[str, dict], llama: dict, settings: Settings) -> None:
    if "prefill" not in llama:
        return
    for length in settings.prefill_lengths:
        rows[f"prefill 1x{length}"]["llama_cpp"] = llama["prefill"].get(str(length))
    for batch in settings.decode_batches:
        rows[f"decode b{batch}"]["llama_cpp"] = llama["decode"].get(str(batch))
    rows[f"generate e2e 1x{settings.prompt_len}+{settings.new_tokens} (s)"]["llama_cpp"] = llama["generate_seconds"]
