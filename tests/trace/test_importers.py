"""Importers on real traces, each checked against an independent reading of the same file."""

from __future__ import annotations

import gzip
import json
import sqlite3
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from hybridlm.trace.importers import detect_format, import_trace, innermost_enclosing
from hybridlm.trace.schema import TraceError
from hybridlm.trace.store import TraceStore, open_readonly
from tests.helpers import FIXTURES

KINETO = FIXTURES / "kineto/sampled_rank-1.json.gz"
NSIGHT = FIXTURES / "nsight/saxpy-mpi-cuda_nsys_perlmutter0.sqlite"
INGERO = sorted((FIXTURES / "ingero").glob("*.db"))


def imported(tmp_path_factory, fixture: Path):
    path = tmp_path_factory.mktemp("db") / "trace.duckdb"
    with TraceStore(path) as store:
        run_id = import_trace(fixture, store, command=f"hybridlm import {fixture.name}")
    return open_readonly(path), run_id


# -- the interval sweep ------------------------------------------------------------------------------


def test_innermost_enclosing_nested_siblings_and_self():
    ranges = [(0.0, 100.0, "outer"), (10.0, 40.0, "a"), (40.0, 90.0, "b"), (50.0, 60.0, "b1")]
    queries = [(12.0, 20.0), (55.0, 58.0), (45.0, 70.0), (95.0, 99.0), (150.0, 160.0), (40.0, 90.0)]
    found = innermost_enclosing(ranges, queries, exclude_self=[-1, -1, -1, -1, -1, 2])
    assert found == ["a", "b1", "b", "outer", None, "outer"]  # the last query is range b itself
    # whole-µs traces: a child may end 1 µs after its parent
    assert innermost_enclosing([(0.0, 10.0, "p")], [(5.0, 11.0)]) == [None]
    assert innermost_enclosing([(0.0, 10.0, "p")], [(5.0, 11.0)], tolerance_us=1.0) == ["p"]


# -- Kineto ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kineto_raw():
    return json.loads(gzip.decompress(KINETO.read_bytes()))


@pytest.fixture(scope="module")
def kineto_db(tmp_path_factory):
    return imported(tmp_path_factory, KINETO)


def test_kineto_counts_and_durations_match_the_json(kineto_raw, kineto_db):
    con, run_id = kineto_db
    expected = Counter()
    durations = Counter()
    source_of = {"kernel": "cuda", "cpu_op": "cpu", "cuda_runtime": "runtime", "user_annotation": "annotation"}
    source_of |= {"gpu_memcpy": "memcpy", "gpu_memset": "memset"}
    for e in kineto_raw["traceEvents"]:
        if e.get("ph") == "X" and e.get("cat") in source_of:
            expected[source_of[e["cat"]]] += 1
            durations[source_of[e["cat"]]] += e["dur"]
    got = con.execute(
        "SELECT source, count(*), sum(duration_us) FROM events WHERE run_id = ? GROUP BY 1", [run_id]
    ).fetchall()
    assert {s: n for s, n, _ in got} == dict(expected)
    assert {s: d for s, _, d in got} == pytest.approx(dict(durations))
    assert expected["cuda"] == 1104 and expected["cpu"] == 2302
    assert con.execute("SELECT DISTINCT rank FROM events").fetchall() == [(1,)]  # distributedInfo.rank
    (kind, source_file, command) = con.execute("SELECT kind, source_file, command FROM runs").fetchall()[0]
    assert (kind, Path(source_file).name, command) == ("imported", KINETO.name, f"hybridlm import {KINETO.name}")


def test_kineto_kernels_take_the_range_and_thread_of_their_launch(kineto_raw, kineto_db):
    """Brute force: for every kernel, the runtime call with its correlation id and the innermost
    user_annotation around that call on the same thread."""
    con, _ = kineto_db
    events = [e for e in kineto_raw["traceEvents"] if e.get("ph") == "X"]
    launches = {e["args"]["correlation"]: e for e in events if e.get("cat") == "cuda_runtime"}
    annotations = [e for e in events if e.get("cat") == "user_annotation" and not e["name"].startswith("ProfilerStep#")]
    expected = {}
    for kernel in (e for e in events if e.get("cat") == "kernel"):
        launch = launches[kernel["args"]["correlation"]]
        around = [
            a
            for a in annotations
            if a["tid"] == launch["tid"]
            and a["ts"] <= launch["ts"]
            and launch["ts"] + launch["dur"] <= a["ts"] + a["dur"] + 1
        ]
        innermost = min(around, key=lambda a: a["dur"])["name"] if around else None
        expected[kernel["args"]["correlation"]] = (innermost, launch["pid"], launch["tid"])
    got = con.execute("SELECT correlation, range_name, pid, tid FROM events WHERE source = 'cuda'").fetchall()
    assert {c: (r, p, t) for c, r, p, t in got} == expected
    assert sum(r is not None for r, _, _ in expected.values()) > 500


def test_kineto_collectives_of_a_recommender_are_comm_not_moe(kineto_raw, kineto_db):
    """The fixture is a TorchRec training step: its all-to-alls move KeyedJaggedTensor embeddings, not
    MoE tokens. Nothing in it is MoE, so nothing may be labelled moe_a2a; every collective is 'comm'."""
    con, _ = kineto_db
    rows = con.execute(
        "SELECT range_name, layer_type, layer_rule, count(*) FROM events "
        "WHERE source = 'cuda' AND name LIKE 'ncclKernel_SendRecv%' GROUP BY ALL ORDER BY 1"
    ).fetchall()
    assert rows == [
        ("nccl:_all_gather_base", "comm", "enclosing range name", 2),
        ("nccl:all_reduce", "comm", "enclosing range name", 4),
        ("nccl:all_to_all", "comm", "enclosing range name", 4),
    ]
    names = " ".join(e.get("name", "") for e in kineto_raw["traceEvents"]).lower()
    assert "moe" not in names and "expert" not in names and "kjt" in names  # the raw trace: no MoE anywhere
    assert con.execute("SELECT count(*) FROM events WHERE layer_type = 'moe_a2a'").fetchone() == (0,)
    all_to_all = con.execute(
        "SELECT DISTINCT layer_type FROM events WHERE regexp_matches(lower(name), 'all_?to_?all|all2all')"
    ).fetchall()
    assert all_to_all == [("comm",)]


def test_kineto_steps_come_from_profiler_step_ranges(kineto_raw, kineto_db):
    con, _ = kineto_db
    steps = {e["name"] for e in kineto_raw["traceEvents"] if e.get("name", "").startswith("ProfilerStep#")}
    assert steps == {"ProfilerStep#551", "ProfilerStep#552"}
    got = dict(con.execute("SELECT step, count(*) FROM events WHERE step IS NOT NULL GROUP BY 1").fetchall())
    assert set(got) == {551, 552} and min(got.values()) > 1000


def test_torch_profiler_trace_attributes_cpu_ops_to_block_ranges(tmp_path):
    torch = pytest.importorskip("torch")
    from torch.profiler import ProfilerActivity, profile, record_function

    x = torch.randn(32, 32)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for step in range(3):
            with record_function(f"hybridlm.step{step}.{'prefill' if step == 0 else 'decode'}"):
                with record_function("L0.attention"):
                    y = torch.softmax(x @ x.T, dim=-1) @ x
                with record_function("L1.moe"):
                    y = torch.relu(y @ x) + 1
    trace = tmp_path / "profile.json"
    prof.export_chrome_trace(str(trace))

    raw = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("ph") == "X"]
    blocks = [e for e in raw if e["name"] in ("L0.attention", "L1.moe")]
    expected = Counter()
    for op in (e for e in raw if e.get("cat") == "cpu_op"):
        around = [b for b in blocks if b["ts"] <= op["ts"] and op["ts"] + op["dur"] <= b["ts"] + b["dur"]]
        expected[(op["name"], around[0]["name"] if around else None)] += 1
    assert expected[("aten::mm", "L0.attention")] == 6 and expected[("aten::mm", "L1.moe")] == 3

    with TraceStore(tmp_path / "t.duckdb") as store:
        run_id = import_trace(trace, store)
        rows = store.connection.execute(
            "SELECT name, layer, layer_type, count(*) FROM events WHERE run_id = ? AND source = 'cpu' GROUP BY ALL",
            [run_id],
        ).fetchall()
        annotations = store.connection.execute(
            "SELECT name, layer, layer_type, count(*) FROM events WHERE source = 'annotation' AND layer IS NOT NULL "
            "GROUP BY ALL"
        ).fetchall()
        steps = store.connection.execute(
            "SELECT step, phase, count(*) FROM events WHERE name = 'aten::mm' GROUP BY ALL ORDER BY 1"
        ).fetchall()
    block = {"L0.attention": (0, "attention"), "L1.moe": (1, "moe"), None: (None, None)}
    got = Counter({(name, layer, kind): n for name, layer, kind, n in rows})
    assert got == Counter({(name, *block[b]): n for (name, b), n in expected.items()})
    assert sorted(annotations) == [("L0.attention", 0, "attention", 3), ("L1.moe", 1, "moe", 3)]
    assert steps == [(0, "prefill", 3), (1, "decode", 3), (2, "decode", 3)]  # from hybridlm.step{N}.{phase}


# -- Nsight ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nsight_db(tmp_path_factory):
    return imported(tmp_path_factory, NSIGHT)


def test_nsight_counts_and_durations_match_sqlite(nsight_db):
    con, _ = nsight_db
    lite = read_fixture(NSIGHT)
    for table, source in (("KERNEL", "cuda"), ("MEMCPY", "memcpy"), ("MEMSET", "memset")):
        n, total = lite.execute(f"SELECT count(*), sum(end - start) FROM CUPTI_ACTIVITY_KIND_{table}").fetchone()
        got = con.execute(f"SELECT count(*), sum(duration_us) FROM events WHERE source = '{source}'").fetchall()
        assert got[0][0] == n
        if n:
            assert got[0][1] == pytest.approx(total / 1000)
    assert con.execute("SELECT count(*) FROM events WHERE source = 'cuda'").fetchall() == [(5,)]
    n_ranges = lite.execute("SELECT count(*) FROM NVTX_EVENTS WHERE eventType = 59 AND end IS NOT NULL").fetchone()
    assert con.execute("SELECT count(*) FROM events WHERE source = 'nvtx'").fetchall() == [n_ranges]
    # each runtime call once, although this export lists e.g. cudaMalloc and cudaMalloc_v3020
    (n_calls,) = lite.execute("SELECT count(DISTINCT correlationId) FROM CUPTI_ACTIVITY_KIND_RUNTIME").fetchone()
    assert con.execute("SELECT count(*) FROM events WHERE source = 'runtime'").fetchall() == [(n_calls,)]
    total_bytes = lite.execute("SELECT sum(bytes) FROM CUPTI_ACTIVITY_KIND_MEMCPY").fetchone()[0]
    assert con.execute("SELECT sum(bytes) FROM events WHERE source = 'memcpy'").fetchall() == [(total_bytes,)]
    copies = dict(con.execute("SELECT name, count(*) FROM events WHERE source = 'memcpy' GROUP BY 1").fetchall())
    assert copies == {"memcpy HtoD": 10, "memcpy DtoH": 5}


def test_nsight_kernels_name_pid_range_and_rank(nsight_db):
    con, _ = nsight_db
    lite = read_fixture(NSIGHT)
    (pid,) = lite.execute(
        "SELECT p.pid FROM PROCESSES p JOIN CUPTI_ACTIVITY_KIND_KERNEL k ON k.globalPid = p.globalPid LIMIT 1"
    ).fetchone()
    # the NVTX range around each launch, by brute force over the thread's ranges
    launches = lite.execute(
        "SELECT r.correlationId, r.start, r.end, r.globalTid FROM CUPTI_ACTIVITY_KIND_RUNTIME r "
        "JOIN CUPTI_ACTIVITY_KIND_KERNEL k USING (correlationId)"
    ).fetchall()
    ranges = lite.execute(
        "SELECT n.start, n.end, n.globalTid, coalesce(n.text, s.value) FROM NVTX_EVENTS n "
        "LEFT JOIN StringIds s ON s.id = n.textId WHERE n.eventType = 59"
    ).fetchall()
    expected = {}
    for correlation, start, end, tid in launches:
        around = [r for r in ranges if r[2] == tid and r[0] <= start and end <= r[1]]
        expected[correlation] = min(around, key=lambda r: r[1] - r[0])[3] if around else None
    rows = con.execute(
        "SELECT correlation, name, pid, range_name, rank, device_id, stream FROM events WHERE source = 'cuda'"
    ).fetchall()
    assert {r[0]: r[3] for r in rows} == expected == dict.fromkeys(expected, "saxpy")
    assert {r[1:3] for r in rows} == {("saxpy(double *, double *, double *, double, int)", pid)}
    assert {r[4:] for r in rows} == {(0, 0, 7)}  # 'MPI Rank 0' thread name; GPU 0, stream 7
    (device,) = con.execute("SELECT device FROM runs").fetchall()[0]
    assert device == "NVIDIA A100-SXM4-40GB"


def test_nsight_block_and_step_ranges_reach_the_kernels(tmp_path):
    """The real export with its 'saxpy' NVTX ranges renamed to a hybridlm block range, inside one
    step range: the kernels (linked through their launches) take layer, type, step and phase."""
    copy = tmp_path / "renamed.sqlite"
    copy.write_bytes(NSIGHT.read_bytes())
    lite = sqlite3.connect(copy)
    lite.execute("UPDATE NVTX_EVENTS SET text = 'L3.moe' WHERE text = 'saxpy'")
    (tid,) = lite.execute("SELECT DISTINCT globalTid FROM NVTX_EVENTS WHERE text = 'L3.moe'").fetchone()
    lite.execute(
        "INSERT INTO NVTX_EVENTS (start, end, eventType, text, globalTid) VALUES (0, 10000000000, 59, ?, ?)",
        ["hybridlm.step4.decode", tid],
    )
    lite.commit()
    lite.close()
    with TraceStore(tmp_path / "t.duckdb") as store:
        import_trace(copy, store)
        kernels = store.connection.execute(
            "SELECT layer, layer_type, step, phase, range_name, count(*) FROM events WHERE source = 'cuda' GROUP BY ALL"
        ).fetchall()
        copies = store.connection.execute(
            "SELECT layer, step, phase, range_name, count(*) FROM events WHERE source = 'memcpy' GROUP BY ALL"
        ).fetchall()
    assert kernels == [(3, "moe", 4, "decode", "L3.moe", 5)]
    assert copies == [(None, 4, "decode", None, 15)]  # launched outside L3.moe, inside the step


def read_fixture(path: Path) -> sqlite3.Connection:
    """The reference reader: plain sqlite3, read-only and immutable, so it never writes beside a fixture."""
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro&immutable=1", uri=True)


def test_importing_leaves_the_trace_and_its_folder_untouched(tmp_path):
    for fixture in (*INGERO, NSIGHT):
        folder = tmp_path / fixture.stem
        folder.mkdir()
        copy = folder / fixture.name
        copy.write_bytes(fixture.read_bytes())
        with TraceStore(tmp_path / "out.duckdb") as store:
            import_trace(copy, store)
        assert [p.name for p in folder.iterdir()] == [fixture.name]  # no -wal / -shm side files
        assert copy.read_bytes() == fixture.read_bytes()


# -- Ingero ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ingero_db(tmp_path_factory):
    path = tmp_path_factory.mktemp("db") / "ingero.duckdb"
    with TraceStore(path) as store:
        runs = {fixture.name: import_trace(fixture, store) for fixture in INGERO}
    return open_readonly(path), runs


def raw_ingero(fixture: Path) -> list[tuple]:
    lite = read_fixture(fixture)
    return lite.execute(
        "SELECT lower(s.name), o.name, e.duration, e.timestamp, e.pid FROM events e "
        "JOIN sources s ON s.id = e.source JOIN ops o ON o.source_id = e.source AND o.op_id = e.op"
    ).fetchall()


@pytest.mark.parametrize("fixture", INGERO, ids=lambda p: p.stem)
def test_ingero_counts_match_sqlite(ingero_db, fixture):
    con, runs = ingero_db
    raw = raw_ingero(fixture)
    expected = Counter((source, op) for source, op, *_ in raw)
    got = con.execute(
        "SELECT source, name, count(*) FROM events WHERE run_id = ? GROUP BY 1, 2", [runs[fixture.name]]
    ).fetchall()
    assert {(s, n): c for s, n, c in got} == dict(expected)
    total_ns = sum(r[2] for r in raw)
    [(total_us,)] = con.execute("SELECT sum(duration_us) FROM events WHERE run_id = ?", [runs[fixture.name]]).fetchall()
    assert total_us == pytest.approx(total_ns / 1000)


def test_ingero_percentiles_match_numpy(ingero_db):
    con, runs = ingero_db
    fixture = FIXTURES / "ingero/vllm-37343-logprobs-amplification.db"
    for source, op in (("cuda", "cudaLaunchKernel"), ("driver", "cuLaunchKernel"), ("host", "sched_switch")):
        durations = np.array([r[2] / 1000 for r in raw_ingero(fixture) if r[:2] == (source, op)])
        got = con.execute(
            "SELECT count(*), percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_us), "
            "percentile_cont(0.99) WITHIN GROUP (ORDER BY duration_us) FROM events "
            "WHERE run_id = ? AND source = ? AND name = ?",
            [runs[fixture.name], source, op],
        ).fetchall()[0]
        assert got[0] == len(durations) > 500
        assert got[1:] == pytest.approx((np.percentile(durations, 50), np.percentile(durations, 99)))


def test_ingero_runs_keep_session_facts(ingero_db):
    con, runs = ingero_db
    rows = dict(con.execute("SELECT run_id, device FROM runs").fetchall())
    assert rows[runs["sample-gpu-node-01.db"]] == "Tesla T4, 15360 MiB"
    config = json.loads(
        con.execute("SELECT config_json FROM runs WHERE run_id = ?", [runs["sample-gpu-node-01.db"]]).fetchall()[0][0]
    )
    assert config["format"] == "ingero" and config["version"] == "0.9"


# -- dispatch and bad input ---------------------------------------------------------------------------


def test_detect_format_on_the_fixtures():
    assert detect_format(KINETO) == "kineto"
    assert detect_format(NSIGHT) == "nsight"
    assert {detect_format(f) for f in INGERO} == {"ingero"}


def test_bad_input_is_a_trace_error_naming_the_file(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a trace\n")
    with pytest.raises(TraceError, match=r"notes\.txt: is not a trace file.*Kineto.*Nsight.*Ingero"):
        import_trace(text, TraceStore(tmp_path / "a.duckdb"))

    truncated = tmp_path / "cut.json.gz"
    truncated.write_bytes(KINETO.read_bytes()[:5000])
    with pytest.raises(TraceError, match=r"cut\.json\.gz: not a readable Kineto"):
        import_trace(truncated, TraceStore(tmp_path / "b.duckdb"))

    other = tmp_path / "inventory.sqlite"
    lite = sqlite3.connect(other)
    lite.execute("CREATE TABLE items (id INTEGER, name TEXT)")
    lite.commit()
    lite.close()
    with pytest.raises(TraceError, match=r"inventory\.sqlite: is a SQLite file of an unknown kind \(tables: items\)"):
        import_trace(other, TraceStore(tmp_path / "c.duckdb"))

    no_events = tmp_path / "config.json"
    no_events.write_text('{"hello": 1}')
    with pytest.raises(TraceError, match=r"config\.json: JSON without a 'traceEvents' list"):
        import_trace(no_events, TraceStore(tmp_path / "d.duckdb"))

    with pytest.raises(TraceError, match=r"absent\.json: no such file"):
        import_trace(tmp_path / "absent.json", TraceStore(tmp_path / "e.duckdb"))


def test_several_imports_share_one_file(tmp_path):
    with TraceStore(tmp_path / "all.duckdb") as store:
        a = import_trace(NSIGHT, store)
        b = import_trace(INGERO[1], store)
        counts = dict(store.connection.execute("SELECT run_id, count(*) FROM events GROUP BY 1").fetchall())
        assert store.latest_run_id() == b
    assert a != b and counts[a] == 99 and counts[b] == 200


def test_import_into_an_existing_run(tmp_path):
    with TraceStore(tmp_path / "t.duckdb") as store:
        recorded = store.new_run(model="debug-tiny")
        assert import_trace(NSIGHT, store, run_id=recorded) == recorded
        assert [r["kind"] for r in store.runs()] == ["recorded"]  # no second runs row
        store.flush()
        assert store.connection.execute("SELECT count(*) FROM events").fetchall() == [(99,)]
        with pytest.raises(TraceError, match="has no run 'nope'"):
            import_trace(KINETO, store, run_id="nope")
