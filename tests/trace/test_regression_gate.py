"""The CI gate on real runs: the same code twice passes; a real slowdown planted in one layer type fails.

Each test records a baseline and a candidate run of debug-tiny with the Tracer, 20 generate calls
each (20 prefill and 140 decode calls per block), the two runs interleaved call by call so that a
burst of load from a neighbour on this shared 2-core machine lands on both. The thresholds are
the library's defaults, chosen from the measurements written next to them in analysis.py.
"""

from __future__ import annotations

import copy
import functools
import json
import time

import torch

from hybridlm import HybridLM, generate
from hybridlm.trace import analysis
from hybridlm.trace.recorder import Tracer
from hybridlm.trace.report import report_main
from hybridlm.trace.store import TraceStore, open_readonly
from tests.helpers import tiny_config

NUM_REQUESTS = 20
NEW_TOKENS = 8
PHASES = ("prefill", "decode", "all")


def prompts(i: int) -> list[list[int]]:
    return [[(7 * i + j) % 256 for j in range(12)], [(5 * i + j) % 256 for j in range(8)]]


def slow_down_attention(model: HybridLM, seconds: float) -> None:
    """Make every attention block really slower: its mixer sleeps before running (the module
    instance's own forward, wrapped; the model is otherwise untouched)."""
    for block in model.layers:
        if block.layer_type == "attention":
            forward = block.mixer.forward

            @functools.wraps(forward)
            def slow_forward(*args, _forward=forward, **kwargs):
                time.sleep(seconds)
                return _forward(*args, **kwargs)

            block.mixer.forward = slow_forward


def record_pair(tmp_path, attention_sleep_s: float = 0.0):
    """(baseline db, candidate db): the same weights and workload, the candidate optionally slowed."""
    torch.manual_seed(0)
    baseline = HybridLM(tiny_config()).eval()
    candidate = copy.deepcopy(baseline)
    if attention_sleep_s:
        slow_down_attention(candidate, attention_sleep_s)
    paths = (tmp_path / "baseline.duckdb", tmp_path / "candidate.duckdb")
    stores = [TraceStore(path) for path in paths]
    tracers = []
    for model, store in zip((baseline, candidate), stores, strict=True):
        generate(model, [[1, 2, 3]], 2)  # warm-up, untraced
        tracers.append(Tracer(store, model="debug-tiny", device="cpu").attach(model))
    for i in range(NUM_REQUESTS):
        for model in (baseline, candidate):
            generate(model, prompts(i), NEW_TOKENS)
    for tracer, store in zip(tracers, stores, strict=True):
        tracer.close()
        store.close()
    return paths


def compare(paths) -> list[analysis.Change]:
    con_a, con_b = open_readonly(paths[0]), open_readonly(paths[1])
    try:
        return analysis.compare_runs(con_a, analysis.resolve_run(con_a), con_b, analysis.resolve_run(con_b))
    finally:
        con_a.close()
        con_b.close()


def test_the_same_code_twice_passes_the_gate(tmp_path, capsys):
    paths = record_pair(tmp_path)
    changes = compare(paths)
    flagged = [c for c in changes if c.is_regression]
    assert flagged == [], flagged
    # and the gate did look: every layer type in both phases was compared (20 prefill calls is enough)
    compared = {(c.layer_type, c.phase) for c in changes if c.reason == "within thresholds"}
    assert compared == {(t, p) for t in ("mamba2", "moe", "gdn", "mamba", "attention", "mlp") for p in PHASES}
    assert report_main(paths[1], baseline=paths[0]) == 0
    assert "0 regressions" in capsys.readouterr().out


def test_a_planted_attention_slowdown_fails_the_gate_on_attention_only(tmp_path, capsys):
    paths = record_pair(tmp_path, attention_sleep_s=0.002)
    changes = compare(paths)
    flagged = {(c.layer_type, c.phase) for c in changes if c.is_regression}
    assert flagged == {("attention", "prefill"), ("attention", "decode"), ("attention", "all")}
    decode = next(c for c in changes if (c.layer_type, c.phase) == ("attention", "decode"))
    assert decode.p50_b - decode.p50_a > 1500  # the 2 ms sleep, seen in the median
    assert report_main(paths[1], baseline=paths[0]) == 1
    assert "REGRESSION" in capsys.readouterr().out
    assert report_main(paths[1], baseline=paths[0], as_json=True) == 1
    doc = json.loads(capsys.readouterr().out)
    assert sorted(doc["comparison"]["regressions"]) == ["attention/all", "attention/decode", "attention/prefill"]
