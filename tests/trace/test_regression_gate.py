"""The CI gate: synthetic runs with known durations decide exactly (no timing in the verdict); then
a real slowdown planted in one layer type of a real recorded run fails it.

The planted-slowdown test records a baseline and a candidate run of debug-tiny with the Tracer, 20 generate calls
each (20 prefill and 140 decode calls per block), the two runs interleaved call by call so that a
burst of load from a neighbour on this shared 2-core machine lands on both. The thresholds are
the library's defaults, chosen from the measurements written next to them in analysis.py.
"""

from __future__ import annotations

import copy
import functools
import json
import time

import numpy as np
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


LAYER_TYPES = ("mamba2", "attention", "moe")


def write_synthetic_run(path, durations_us: dict[tuple[str, str], list[float]]) -> str:
    """A real trace file holding one run whose block calls have exactly the given durations
    ({(layer type, phase): [µs per call]}), one step event per call: nothing timed, nothing random."""
    with TraceStore(path) as store:
        run_id = store.new_run(model="synthetic", config={"pattern": "M*E"})
        rows, clock, step = [], 0.0, 0
        for (layer_type, phase), durations in durations_us.items():
            for duration in durations:
                rows.append(("layer", f"L0.{layer_type}", 0, layer_type, phase, step, clock, duration,
                             1, 1, 0, None, 1, None))  # fmt: skip
                rows.append(("step", phase, None, None, phase, step, clock, duration, 1, 1, 0, None, 1, None))
                clock += duration + 1.0
                step += 1
        store.add_events(run_id, rows)
        store.end_run(run_id)
    return run_id


def known_durations(slow: dict[str, float] | None = None) -> dict[tuple[str, str], list[float]]:
    """200 calls per (layer type, phase): 500 µs + a fixed spread of +-50 µs, times `slow[type]`."""
    spread = np.linspace(-50.0, 50.0, 200)
    return {
        (t, phase): list((500.0 + spread) * (slow or {}).get(t, 1.0))
        for t in LAYER_TYPES
        for phase in ("prefill", "decode")
    }


def test_identical_timings_pass_the_gate_and_every_type_is_compared(tmp_path, capsys):
    paths = (tmp_path / "baseline.duckdb", tmp_path / "candidate.duckdb")
    for path in paths:
        write_synthetic_run(path, known_durations())
    changes = compare(paths)
    assert [c for c in changes if c.is_regression] == []
    compared = {(c.layer_type, c.phase) for c in changes if c.reason == "within thresholds"}
    assert compared == {(t, p) for t in LAYER_TYPES for p in PHASES}
    assert all(c.p50_change == 0 and c.p99_change == 0 for c in changes)
    assert report_main(paths[1], baseline=paths[0]) == 0
    assert "0 regressions" in capsys.readouterr().out


def test_the_gate_flags_exactly_the_slowed_type_at_its_threshold(tmp_path, capsys):
    """p50 500 µs and the default P50_THRESHOLD (+300%): 5% under it passes, 5% over it fails, on that type only."""
    baseline = tmp_path / "baseline.duckdb"
    write_synthetic_run(baseline, known_durations())
    under, over = tmp_path / "under.duckdb", tmp_path / "over.duckdb"
    write_synthetic_run(under, known_durations({"attention": 0.95 * (1 + analysis.P50_THRESHOLD)}))
    write_synthetic_run(over, known_durations({"attention": 1.05 * (1 + analysis.P50_THRESHOLD)}))
    assert [c for c in compare((baseline, under)) if c.is_regression] == []
    flagged = {(c.layer_type, c.phase) for c in compare((baseline, over)) if c.is_regression}
    assert flagged == {("attention", "prefill"), ("attention", "decode"), ("attention", "all")}
    assert report_main(over, baseline=baseline) == 1
    assert "REGRESSION" in capsys.readouterr().out


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
