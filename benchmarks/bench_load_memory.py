"""Peak memory of ``hybridlm.from_pretrained`` on a ~500 MB nemotron_h checkpoint, in a fresh process.

    python -m benchmarks.bench_load_memory [--dtype float32|bfloat16] [--vocab-size 32000] [--baseline]

A first subprocess writes debug-small (vocab widened to reach ~500 MB in fp32) with random weights
as a Hugging Face nemotron_h checkpoint (hybridlm's exporter: per-expert keys, ``backbone.``
prefix) into a temporary directory; a second loads it and reports the peak RSS growth of the load
(ru_maxrss after loading minus the RSS right after ``import hybridlm, torch``) against the
checkpoint size. The target is below 1.5x. This parent process imports no torch: Linux carries
ru_maxrss over fork + exec, so a parent holding the model would mask the child's peak.

``--baseline`` also measures, for scale, ``safetensors.torch.load_file`` (the whole state dict,
memory-mapped) and ``safe_open`` tensor by tensor, each copied into tensors of its own as a loader
must: the pages of a mapped file count toward RSS while the map is open.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import print_table

_WRITE = r"""
import json, sys, time
import torch
from hybridlm import HybridLM, get_preset
from hybridlm.checkpoints import save_pretrained
path, dtype, vocab = sys.argv[1], getattr(torch, sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
model = HybridLM(get_preset("debug-small", vocab_size=vocab)).to(dtype).eval()
start = time.perf_counter()
save_pretrained(model, path, format="hf", family="nemotron_h")
print(json.dumps({"seconds": time.perf_counter() - start, "params": model.num_parameters()}))
"""

_LOAD = r"""
import json, resource, sys, time
import torch, hybridlm
torch.set_num_threads(1)
path, how = sys.argv[1], sys.argv[2]


def current_rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def high_water_mark():  # VmHWM: peak RSS of this process image (not inherited across exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


base = current_rss()
start = time.perf_counter()
if how == "hybridlm":
    model = hybridlm.from_pretrained(path)
elif how == "load_file":  # the whole state dict (memory-mapped), then copied into tensors of its own
    from safetensors.torch import load_file
    state = {name: t.clone() for name, t in load_file(path + "/model.safetensors").items()}
else:  # safe_open: one memory map, every tensor copied out while it is open
    from safetensors import safe_open
    state = {}
    with safe_open(path + "/model.safetensors", "pt") as f:
        for name in f.keys():
            state[name] = f.get_tensor(name).clone()
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"base": base, "peak": peak, "hwm": high_water_mark(), "seconds": seconds}))
"""


def _run(code: str, *args: str) -> dict:
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(result.stderr)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--baseline", action="store_true", help="also measure load_file and safe_open")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "nemotron_h"
        written = _run(_WRITE, str(path), args.dtype, str(args.vocab_size))
        size = (path / "model.safetensors").stat().st_size
        print(
            f"checkpoint: debug-small, vocab {args.vocab_size}, {args.dtype}, {written['params'] / 1e6:,.1f}M "
            f"parameters: {size / 1e6:,.1f} MB, written by hybridlm's nemotron_h exporter in {written['seconds']:.2f} s"
        )
        rows = []
        for how in ("hybridlm", "load_file", "safe_open") if args.baseline else ("hybridlm",):
            m = _run(_LOAD, str(path), how)
            growth, hwm_growth = m["peak"] - m["base"], m["hwm"] - m["base"]
            rows.append(
                [
                    how,
                    f"{growth / 1e6:,.1f} MB",
                    f"{growth / size:.2f}x",
                    f"{hwm_growth / size:.2f}x",
                    f"{m['seconds']:.2f} s",
                ]
            )
        print_table(["loader", "peak RSS growth", "/ checkpoint", "VmHWM / checkpoint", "time"], rows)


if __name__ == "__main__":
    main()
