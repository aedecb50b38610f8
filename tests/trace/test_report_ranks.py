"""`hybridlm report` on traces written by real 2-rank `hybridlm profile --ep 2` runs: the MoE block parts
per rank, tokens per rank and the straggler, each checked against the raw rows of the trace database."""

from __future__ import annotations

import io
import json
from collections import Counter

import duckdb
import numpy as np
import pytest

from hybridlm.trace.report import report_main
from tests.helpers import run_cli

MODEL = "debug-tiny-nemotron"  # M*ME-E: MoE blocks 3 and 5, 8 experts each, top-2
WORKLOAD = ["--requests", "4", "--batch-size", "2", "--new-tokens", "4", "--prompt-len", "8-24", "--seed", "1"]
PARTS = ("moe_router", "moe_dispatch", "moe_experts", "moe_combine")
EXPERTS_PER_RANK = 8 // 2


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    """One file, three runs: --ep 2 without skew, --ep 2 with --routing-skew 2, one process (the latest)."""
    db = tmp_path_factory.mktemp("ranks") / "t.duckdb"
    runs = {}
    for name, flags in (("even", ["--ep", "2"]), ("skewed", ["--ep", "2", "--routing-skew", "2"]), ("single", [])):
        result = run_cli("profile", MODEL, "--db", str(db), *WORKLOAD, *flags)
        assert result.returncode == 0, result.stderr
        runs[name] = result.stdout.split()[1].rstrip(":")
    return db, runs


def _report(db, run_id: str) -> dict:
    """`hybridlm report DB --run ID --json`, in this process (the text report runs the real command below)."""
    out = io.StringIO()
    assert report_main(db, run=run_id, as_json=True, file=out) == 0
    return json.loads(out.getvalue())


def _rows(db, sql: str, *params) -> list[tuple]:
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql, list(params)).fetchall()


def test_report_prints_the_parts_per_rank_tokens_and_stragglers(traces):
    db, runs = traces
    result = run_cli("report", str(db), "--run", runs["skewed"])
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for phase in ("prefill", "decode"):
        assert f"phase {phase}: MoE block parts per rank" in text
        assert f"phase {phase}: wall time" in text and "summed over 2 ranks" in text
    lines = text.splitlines()
    for part in PARTS:
        ranks = [line.split()[1] for line in lines if line.strip().startswith(part) and len(line.split()) == 7]
        assert ranks == ["0", "1"] * 2, f"{part}: a row per rank in prefill and decode"
    assert "tokens per rank" in text
    stragglers = [line.split()[:2] for line in lines if line.strip().startswith(("moe_dispatch", "moe_combine"))]
    for collective in ("moe_dispatch", "moe_combine"):
        for phase in ("prefill", "decode", "all"):
            assert [collective, phase] in stragglers


def test_parts_per_rank_match_the_stored_calls(traces):
    db, runs = traces
    parts = _report(db, runs["skewed"])["expert_parallel"]["parts"]
    assert {(p["layer_type"], p["rank"]) for p in parts} == {(part, rank) for part in PARTS for rank in (0, 1)}
    for part in parts:
        where = "run_id = ? AND source = 'layer' AND layer_type = ? AND rank = ?"
        params = [runs["skewed"], part["layer_type"], part["rank"]]
        if part["phase"] != "all":
            where += " AND phase = ?"
            params.append(part["phase"])
        rows = _rows(db, f"SELECT duration_us, tokens FROM events WHERE {where}", *params)
        durations = np.array([d for d, _ in rows])
        assert part["calls"] == len(rows)
        assert part["p50_us"] == pytest.approx(np.percentile(durations, 50))
        assert part["p99_us"] == pytest.approx(np.percentile(durations, 99))
        assert part["tokens"] == sum(t for _, t in rows)


def test_tokens_per_rank_are_conserved_and_the_skew_unbalances_them(traces):
    db, runs = traces
    loads = {}
    for name in ("even", "skewed"):
        tokens = [t for t in _report(db, runs[name])["expert_parallel"]["tokens"] if t["phase"] == "all"]
        assert [t["rank"] for t in tokens] == [0, 1]
        assert sum(t["sent"] for t in tokens) == sum(t["received"] for t in tokens), "every pair sent is computed"
        routed = _rows(db, "SELECT sum(tokens) FROM routing WHERE run_id = ?", runs[name])[0][0]
        assert sum(t["sent"] for t in tokens) == routed
        loads[name] = max(t["load"] for t in tokens)
    assert loads["skewed"] > loads["even"], loads


def _entries(db, run_id: str, collective: str) -> dict[tuple[int, int], dict[int, float]]:
    """{(step, layer): {rank: entry µs}} from the collective rows."""
    entries: dict[tuple[int, int], dict[int, float]] = {}
    sql = "SELECT step, layer, rank, start_us FROM events WHERE run_id = ? AND source = 'collective' AND layer_type = ?"
    for step, layer, rank, start in _rows(db, sql, run_id, collective):
        entries.setdefault((step, layer), {})[rank] = start
    return entries


def test_the_straggler_is_the_rank_that_entered_last_and_the_others_waited_for_it(traces):
    db, runs = traces
    run_id = runs["skewed"]
    stragglers = [s for s in _report(db, run_id)["expert_parallel"]["stragglers"] if s["phase"] == "all"]
    assert [s["layer_type"] for s in stragglers] == ["moe_dispatch", "moe_combine"]
    for straggler in stragglers:
        entries = _entries(db, run_id, straggler["layer_type"])
        last = {call: max(ranks, key=ranks.get) for call, ranks in entries.items()}
        waits = sorted(
            max(r.values()) - t for call, r in entries.items() for rank, t in r.items() if rank != last[call]
        )
        counts = Counter(last.values())
        assert straggler["calls"] == len(entries) == 8 * 2  # 8 steps x 2 MoE blocks
        assert {int(k): v for k, v in straggler["last_counts"].items()} == dict(counts)
        assert counts[straggler["rank"]] == max(counts.values())
        assert straggler["wait_p50_us"] == pytest.approx(np.percentile(waits, 50))
        assert straggler["wait_p99_us"] == pytest.approx(np.percentile(waits, 99))
        assert straggler["wait_max_us"] == pytest.approx(waits[-1])


def test_hot_experts_are_the_stragglers_own_and_their_load_comes_from_the_routing(traces):
    db, runs = traces
    run_id = runs["skewed"]
    for straggler in _report(db, run_id)["expert_parallel"]["stragglers"]:
        if straggler["phase"] != "all":
            continue
        rank = straggler["rank"]
        entries = _entries(db, run_id, straggler["layer_type"])
        calls = {call for call, ranks in entries.items() if max(ranks, key=ranks.get) == rank}
        routing = _rows(db, "SELECT step, layer, expert, tokens FROM routing WHERE run_id = ?", run_id)
        per_expert, per_layer = Counter(), Counter()
        for step, layer, expert, tokens in routing:
            if (step, layer) in calls:
                per_expert[layer, expert] += tokens
                per_layer[layer] += tokens
        assert straggler["hot_experts"], "a skewed run's straggler has hot experts"
        for layer, expert, load in straggler["hot_experts"]:
            assert rank * EXPERTS_PER_RANK <= expert < (rank + 1) * EXPERTS_PER_RANK
            assert load == pytest.approx(per_expert[layer, expert] / (per_layer[layer] / 8))


def test_the_aggregate_counts_each_block_call_once(traces):
    db, runs = traces
    rows = _report(db, runs["skewed"])["decomposition"]
    for phase in ("prefill", "decode", "all"):
        group = [r for r in rows if r["phase"] == phase]
        [aggregate] = [r for r in group if r["is_aggregate"]]
        blocks = [r for r in group if not r["is_aggregate"] and r["layer_type"] not in PARTS]
        assert aggregate["calls"] == sum(r["calls"] for r in blocks), phase
        assert aggregate["ranks"] == 2 and 0 < aggregate["share_of_wall"] <= 1, phase
        assert all(0 < r["share_of_wall"] <= 1 for r in group), phase


def test_a_single_process_run_has_no_rank_sections(traces):
    db, runs = traces
    assert _report(db, runs["single"])["expert_parallel"] is None
    result = run_cli("report", str(db))
    assert result.returncode == 0, result.stderr
    assert "per rank" not in result.stdout and "stragglers" not in result.stdout


def test_hot_experts_follow_a_placement_the_run_records(tmp_path):
    """A run whose notes give a placement (rank 0 holding experts 0 and 3 of 4, as a rebalanced run
    would): the straggler's hot experts are the ones it held, not a contiguous range."""
    from hybridlm.trace.store import TraceStore

    db = tmp_path / "placed.duckdb"
    with TraceStore(db) as store:
        run_id = store.new_run(config={"moe": {"num_experts": 4}}, notes=json.dumps({"placement": {"1": [0, 3, 1, 2]}}))
        rows = []
        for step in range(3):
            for rank, entry in ((0, 100.0 + step), (1, 50.0)):  # rank 0 enters last every time
                for source in ("layer", "collective"):
                    rows.append((source, "L1.moe_combine", 1, "moe_combine", "decode", step, entry, 10.0,
                                 None, 4, rank, None, None, None))  # fmt: skip
        store.add_events(run_id, rows)
        store.add_routing(run_id, [(step, "decode", 1, expert, tokens, 0) for step in range(3)
                                   for expert, tokens in enumerate([1, 0, 2, 5])])  # fmt: skip
        store.end_run(run_id)
    [decode, _] = _report(db, run_id)["expert_parallel"]["stragglers"]
    assert decode["rank"] == 0 and decode["last_counts"] == {"0": 3}
    assert decode["wait_p50_us"] == pytest.approx(51.0)
    assert decode["hot_experts"] == [[1, 3, pytest.approx(15 / 6)], [1, 0, pytest.approx(3 / 6)]]


def test_imbalance_latency_is_the_slowest_ranks_block_time(traces):
    """The MoE trend's series, recomputed from the raw rows: per step, max / mean tokens per expert over
    both ranks' routing, and the MoE block's time on the slower rank (its parts are inside the block)."""
    from hybridlm.trace.imbalance import imbalance_and_latency

    db, runs = traces
    for name in ("skewed", "single"):
        run_id = runs[name]
        tokens: dict[tuple, Counter] = {}
        for layer, phase, step, expert, count in _rows(
            db, "SELECT layer, phase, step, expert, tokens FROM routing WHERE run_id = ?", run_id
        ):
            tokens.setdefault((layer, phase, step), Counter())[expert] += count
        block_us: dict[tuple, Counter] = {}
        for layer, step, rank, layer_type, duration in _rows(
            db, "SELECT layer, step, coalesce(rank, 0), layer_type, duration_us FROM events "
            "WHERE run_id = ? AND source = 'layer'", run_id,
        ):  # fmt: skip
            if layer_type not in PARTS:
                block_us.setdefault((layer, step), Counter())[rank] += duration
        expected: dict[tuple, list] = {}
        for (layer, phase, step), counts in sorted(tokens.items(), key=lambda item: item[0][2]):
            mean = sum(counts.values()) / len(counts)
            if mean > 0 and (layer, step) in block_us:
                pair = (max(counts.values()) / mean, max(block_us[(layer, step)].values()))
                expected.setdefault((layer, phase), []).append(pair)
        with duckdb.connect(str(db), read_only=True) as con:
            got = imbalance_and_latency(con, run_id)
        assert got.keys() == expected.keys() and got, name
        for key, pairs in expected.items():
            np.testing.assert_allclose(np.array(got[key]), np.array(pairs), rtol=1e-9, err_msg=f"{name} {key}")
