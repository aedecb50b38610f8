"""Analysis on real traces, each number checked against a numpy recomputation from the raw rows."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from hybridlm import HybridLM, generate
from hybridlm.blocks import layer_type_name
from hybridlm.trace import analysis
from hybridlm.trace.analysis import ALL_LAYERS, ALL_PHASES, OTHER
from hybridlm.trace.imbalance import latency_vs_imbalance, moe_imbalance
from hybridlm.trace.importers import import_trace
from hybridlm.trace.recorder import Tracer
from hybridlm.trace.schema import TraceError
from hybridlm.trace.store import TraceStore, open_readonly
from tests.helpers import FIXTURES, tiny_config

KINETO = FIXTURES / "kineto" / "sampled_rank-1.json.gz"
MOE_PATTERN = "MEME*EGE"  # four MoE blocks


def record_run(store: TraceStore, pattern: str = "MEGm*-EM", num_requests: int = 3, new_tokens: int = 12) -> str:
    """Trace `num_requests` generate calls (a prefill and new_tokens - 1 decode steps each)."""
    torch.manual_seed(0)
    model = HybridLM(tiny_config(pattern)).eval()
    generate(model, [[1, 2, 3]], 2)  # warm-up, untraced
    tracer = Tracer(store, model=f"debug-tiny {pattern}", device="cpu").attach(model)
    for i in range(num_requests):
        generate(model, [[(3 * i + j) % 256 for j in range(10)], [7, 8, 9, i]], new_tokens)
    tracer.close()
    return tracer.run_id


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """One file, two recorded runs: debug-tiny's own pattern, then one with four MoE blocks."""
    path = tmp_path_factory.mktemp("analysis") / "trace.duckdb"
    with TraceStore(path) as store:
        tiny = record_run(store)
        moe = record_run(store, MOE_PATTERN, num_requests=4, new_tokens=16)
    con = open_readonly(path)
    yield con, tiny, moe
    con.close()


@pytest.fixture(scope="module")
def kineto(tmp_path_factory):
    path = tmp_path_factory.mktemp("kineto") / "trace.duckdb"
    with TraceStore(path) as store:
        run_id = import_trace(KINETO, store)
    con = open_readonly(path)
    yield con, run_id
    con.close()


def expected_decomposition(con, run_id: str, source: str) -> dict[tuple[str, str], dict]:
    """The decomposition from the raw rows: numpy percentiles, Python sums."""
    raw = con.execute(
        "SELECT layer_type, phase, duration_us, start_us FROM events WHERE run_id = ? AND source = ?",
        [run_id, source],
    ).fetchall()
    steps = con.execute(
        "SELECT phase, duration_us FROM events WHERE run_id = ? AND source = 'step'", [run_id]
    ).fetchall()
    groups: dict[tuple[str, str], list[tuple[float, float]]] = {}
    spans: dict[str, list[tuple[float, float]]] = {}
    for layer_type, phase, duration, start in raw:
        layer_type = layer_type or OTHER
        phases = [ALL_PHASES] if phase is None else [phase, ALL_PHASES]
        for p in phases:
            groups.setdefault((layer_type, p), []).append((start, duration))
            groups.setdefault((ALL_LAYERS, p), []).append((start, duration))
            spans.setdefault(p, []).append((start, start + duration))
    if steps:
        walls = {p: sum(d for ph, d in steps if ph == p) for p in {ph for ph, _ in steps}}
        walls[ALL_PHASES] = sum(d for _, d in steps)
    else:
        walls = {p: max(e for _, e in s) - min(b for b, _ in s) for p, s in spans.items()}
    expected = {}
    for key, calls in groups.items():
        d = np.array([duration for _, duration in calls])
        p50, p99 = np.percentile(d, [50, 99], method="linear")
        expected[key] = {
            "calls": len(d),
            "p50_us": p50,
            "p99_us": p99,
            "mean_us": d.mean(),
            "total_us": d.sum(),
            "tail_ratio": p99 / p50,
            "share_of_wall": covered_time(calls) / walls[key[1]],
        }
    return expected


def covered_time(calls: list[tuple[float, float]]) -> float:
    """Length of the union of the intervals [start, start + duration): a sweep in start order."""
    total, end = 0.0, -np.inf
    for start, duration in sorted(calls):
        finish = start + duration
        if finish > end:
            total += finish - max(start, end)
            end = finish
    return total


def check_rows(rows, expected):
    assert {(r.layer_type, r.phase) for r in rows} == set(expected)
    for row in rows:
        want = expected[(row.layer_type, row.phase)]
        assert row.calls == want["calls"], row
        for name in ("p50_us", "p99_us", "mean_us", "total_us", "tail_ratio", "share_of_wall"):
            assert getattr(row, name) == pytest.approx(want[name], rel=1e-9), (row.layer_type, row.phase, name)


def test_decomposition_of_recorded_runs_matches_numpy(traced):
    con, tiny, moe = traced
    for run_id, pattern in ((tiny, "MEGm*-EM"), (moe, MOE_PATTERN)):
        rows = analysis.decomposition(con, run_id)
        assert {r.source for r in rows} == {"layer"}
        check_rows(rows, expected_decomposition(con, run_id, "layer"))
        for row in rows:  # block calls never overlap: the time they cover is their summed duration
            assert row.share_of_wall == pytest.approx(row.total_us / row.wall_us, rel=1e-9)
            assert row.wall_basis == "steps"
        # calls against the workload: every block once per forward step
        num_steps = dict(
            con.execute(
                "SELECT phase, count(*) FROM events WHERE run_id = ? AND source = 'step' GROUP BY phase", [run_id]
            ).fetchall()
        )
        for row in rows:
            if row.phase != ALL_PHASES and not row.is_aggregate:
                per_step = sum(1 for c in pattern if layer_type_name(c) == row.layer_type)
                assert row.calls == per_step * num_steps[row.phase], row
        # blocks fill nearly all of a forward step; the rest is embedding, final norm and LM head
        aggregate = next(r for r in rows if r.is_aggregate and r.phase == "decode")
        assert 0.5 < aggregate.share_of_wall < 1.0


def test_rows_come_per_phase_then_all_with_the_aggregate_last(traced):
    con, tiny, _ = traced
    rows = analysis.decomposition(con, tiny)
    phases = [r.phase for r in rows]
    assert list(dict.fromkeys(phases)) == ["prefill", "decode", ALL_PHASES]
    for phase in ("prefill", "decode", ALL_PHASES):
        group = [r for r in rows if r.phase == phase]
        assert group[-1].is_aggregate and not any(r.is_aggregate for r in group[:-1])
        # the block registry's order (M, G, *, m, -, E), whatever order the pattern has them in
        assert [r.layer_type for r in group[:-1]] == ["mamba2", "gdn", "attention", "mamba", "mlp", "moe"]
    decode = analysis.decomposition(con, tiny, phase="decode")
    # the same rows; sums over the same calls may differ in the last bits (DuckDB aggregates in parallel)
    expected = [r for r in rows if r.phase == "decode"]
    assert len(decode) == len(expected)
    for got, want in zip(decode, expected, strict=True):
        for field in dataclasses.fields(want):
            a, b = getattr(got, field.name), getattr(want, field.name)
            assert a == (pytest.approx(b, rel=1e-12) if isinstance(b, float) else b), field.name
    with pytest.raises(TraceError, match=r"phase 'train'.*'prefill', 'decode'"):
        analysis.decomposition(con, tiny, phase="train")


def test_runs_and_resolving_a_run(traced, tmp_path):
    con, tiny, moe = traced
    runs = analysis.runs(con)
    assert [r.run_id for r in runs] == [tiny, moe]
    assert runs[1].events_by_source["step"] == 4 * 15 + 4  # 4 prefills + 4 x 15 decodes
    assert runs[1].num_routing_rows > 0
    assert analysis.resolve_run(con) == moe
    assert analysis.resolve_run(con, tiny) == tiny
    with pytest.raises(TraceError) as error:
        analysis.resolve_run(con, "nosuchrun")
    assert "nosuchrun" in str(error.value) and tiny in str(error.value) and moe in str(error.value)
    with TraceStore(tmp_path / "empty.duckdb"):
        pass
    empty = open_readonly(tmp_path / "empty.duckdb")
    with pytest.raises(TraceError, match="no runs"):
        analysis.resolve_run(empty)
    empty.close()


def test_moe_imbalance_matches_numpy(traced):
    con, _, moe = traced
    routing = con.execute("SELECT layer, phase, step, expert, tokens FROM routing WHERE run_id = ?", [moe]).fetchall()
    durations = {
        (step, layer): d
        for step, layer, d in con.execute(
            "SELECT step, layer, duration_us FROM events WHERE run_id = ? AND source = 'layer'", [moe]
        ).fetchall()
    }
    loads: dict[tuple[int, str], dict[int, np.ndarray]] = {}
    for layer, phase, step, expert, tokens in routing:
        per_step = loads.setdefault((layer, phase), {})
        per_step.setdefault(step, np.zeros(8))[expert] += tokens
    rows = moe_imbalance(con, moe)
    moe_layers = [i for i, c in enumerate(MOE_PATTERN) if c == "E"]
    assert [(r.layer, r.phase) for r in rows] == [(layer, p) for layer in moe_layers for p in ("prefill", "decode")]
    for row in rows:
        per_step = loads[(row.layer, row.phase)]
        steps = sorted(per_step)
        imbalance = np.array([per_step[s].max() / per_step[s].mean() for s in steps])
        assert row.steps == len(steps) and row.num_experts == 8
        assert row.p50 == pytest.approx(np.percentile(imbalance, 50))
        assert row.p99 == pytest.approx(np.percentile(imbalance, 99))
        assert row.mean == pytest.approx(imbalance.mean()) and row.max == pytest.approx(imbalance.max())
        # top-2 of 8 experts: every token lands on 2 experts, so the mean load is tokens * 2 / 8
        tokens = 2 * 10 if row.phase == "prefill" else 2  # two prompts, left-padded to 10 tokens
        assert row.mean_tokens_per_expert == pytest.approx(tokens * 2 / 8)
        trend = row.latency_vs_imbalance
        if row.phase == "prefill":
            assert trend is None  # 4 steps: too few to say anything
            continue
        latency = np.array([durations[(s, row.layer)] for s in steps])
        assert trend.steps == len(steps) == 60
        assert trend.spearman == pytest.approx(spearman_by_counting(imbalance, latency))
        assert trend.split == "quartiles"  # 60 steps; 2 tokens x top-2 give imbalance 2 or 4
        low_cut, high_cut = np.percentile(imbalance, [25, 75])
        low, high = imbalance <= low_cut, imbalance >= high_cut
        assert trend.low_steps == low.sum() and trend.high_steps == high.sum()
        assert trend.low_p50_us == pytest.approx(np.median(latency[low]))
        assert trend.high_p50_us == pytest.approx(np.median(latency[high]))
        assert trend.ratio == pytest.approx(np.median(latency[high]) / np.median(latency[low]))


def spearman_by_counting(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho with tie-averaged ranks computed by counting: rank(v) = (#< v + #<= v + 1) / 2."""

    def ranks(v):
        s = np.sort(v)
        return (np.searchsorted(s, v, "left") + np.searchsorted(s, v, "right") + 1) / 2

    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / np.sqrt((rx**2).sum() * (ry**2).sum()))


def test_latency_vs_imbalance_is_honest_about_little_data():
    assert latency_vs_imbalance([2.0, 4.0, 2.0], [1.0, 2.0, 1.0]) is None  # < 8 steps
    flat = latency_vs_imbalance([2.0] * 12, list(range(12)))
    assert flat.split is None and flat.ratio is None and flat.spearman is None
    # 10 steps: halves; latency rising with imbalance shows as ratio > 1 and rho = 1
    x = [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5]
    trend = latency_vs_imbalance(x, [100 * v for v in x])
    assert trend.split == "halves" and (trend.low_steps, trend.high_steps) == (5, 5)
    assert trend.low_p50_us == 200 and trend.high_p50_us == 450 and trend.ratio == pytest.approx(2.25)
    assert trend.spearman == pytest.approx(1.0)
    # 20 steps of two values only (a small batch): the groups are the two values, whatever the counts
    x = [2.0] * 13 + [4.0] * 7
    trend = latency_vs_imbalance(x, [10.0] * 13 + [30.0] * 7)
    assert (trend.split, trend.low_steps, trend.high_steps, trend.ratio) == ("quartiles", 13, 7, 3.0)


def test_imported_kineto_trace_decomposes_its_kernels(kineto):
    con, run_id = kineto
    assert analysis.event_source(con, run_id) == "cuda"
    rows = analysis.decomposition(con, run_id)
    assert {r.phase for r in rows} == {ALL_PHASES} and {r.source for r in rows} == {"cuda"}
    check_rows(rows, expected_decomposition(con, run_id, "cuda"))
    types = [r.layer_type for r in rows]
    assert types == ["comm", OTHER, ALL_LAYERS]  # a recommender: its all-to-alls are not MoE
    collectives = rows[0]
    # the aggregate's median (thousands of short kernels) hides the collectives, each a long kernel
    assert collectives.p50_us > 10 * rows[-1].p50_us
    assert {r.wall_basis for r in rows} == {"span"}
    # kernels overlap across streams, CPU operators nest: the time they cover is less than their sum
    assert rows[-1].share_of_wall < rows[-1].total_us / rows[-1].wall_us
    cpu_rows = analysis.decomposition(con, run_id, source="cpu")
    check_rows(cpu_rows, expected_decomposition(con, run_id, "cpu"))
    assert cpu_rows[-1].share_of_wall < cpu_rows[-1].total_us / cpu_rows[-1].wall_us
    assert moe_imbalance(con, run_id) == []
    with pytest.raises(TraceError, match=r"no events with source 'layer'.*cuda"):
        analysis.decomposition(con, run_id, source="layer")


def test_compare_runs_of_different_patterns_lists_one_sided_types(traced):
    con, tiny, moe = traced
    changes = analysis.compare_runs(con, tiny, con, moe)
    by_key = {(c.layer_type, c.phase): c for c in changes}
    assert by_key[("mamba", "decode")].reason == "only in the baseline"  # 'm' is not in MOE_PATTERN
    assert by_key[("mlp", "decode")].calls_b == 0
    assert not any(c.is_regression for c in changes if c.reason.startswith("only"))
    assert by_key[(ALL_LAYERS, "decode")].reason == "aggregate (never gates)"
    same = analysis.compare_runs(con, moe, con, moe)
    assert not any(c.is_regression for c in same)
    assert all(c.p50_change == 0 and c.p99_change == 0 for c in same)
    assert by_key[("attention", "prefill")].reason.startswith("too few calls")  # 3 prefills


def test_profiled_operators_of_a_recorded_run_decompose_per_phase(tmp_path):
    """`hybridlm profile --kernels`: CPU operators attributed to blocks, with phases from the step
    ranges, beside the block calls; wall time from the forward steps."""
    from hybridlm.trace.profile import Workload, run_profile

    torch.manual_seed(0)
    model = HybridLM(tiny_config()).eval()
    with TraceStore(tmp_path / "t.duckdb") as store:
        workload = Workload(batch_size=2, min_prompt_len=4, max_prompt_len=8, new_tokens=4, num_requests=2)
        run_id = run_profile(model, store, workload, "debug-tiny", kernels=True)
    con = open_readonly(tmp_path / "t.duckdb")
    assert analysis.event_source(con, run_id) == "layer"
    rows = analysis.decomposition(con, run_id, source="cpu")
    check_rows(rows, expected_decomposition(con, run_id, "cpu"))
    assert {r.wall_basis for r in rows} == {"steps"} and {r.phase for r in rows} == {"prefill", "decode", "all"}
    # operators outside the forward steps (sampling, the generate loop) count in 'all' only
    by_key = {(r.layer_type, r.phase): r for r in rows}
    in_steps = by_key[(ALL_LAYERS, "prefill")].calls + by_key[(ALL_LAYERS, "decode")].calls
    [(no_phase,)] = con.execute(
        "SELECT count(*) FROM events WHERE run_id = ? AND source = 'cpu' AND phase IS NULL", [run_id]
    ).fetchall()
    assert no_phase > 0 and by_key[(ALL_LAYERS, "all")].calls == in_steps + no_phase
    con.close()
