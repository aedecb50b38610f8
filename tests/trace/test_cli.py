"""The trace subcommands as a user runs them: real subprocesses on real files."""

import gzip
import json

import numpy as np
import pytest

from tests.helpers import FIXTURES, run_cli

KINETO = FIXTURES / "kineto" / "sampled_rank-1.json.gz"
QUERY = (
    "SELECT name, count(*), percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_us) AS p50, "
    "percentile_cont(0.99) WITHIN GROUP (ORDER BY duration_us) AS p99 FROM events WHERE source='{source}' "
    "GROUP BY name ORDER BY p99 DESC LIMIT 20"
)


hybridlm = run_cli


@pytest.fixture(scope="module")
def kineto_db(tmp_path_factory):
    if not KINETO.exists():
        pytest.fail(f"fixture missing: {KINETO}")
    db = tmp_path_factory.mktemp("cli") / "k.duckdb"
    result = hybridlm("import", str(KINETO), "--db", str(db))
    assert result.returncode == 0, result.stderr
    assert "imported" in result.stdout and "cuda" in result.stdout
    return db


def test_query_as_written_matches_numpy_on_the_raw_trace(kineto_db):
    from hybridlm.trace.query import run_query

    with gzip.open(KINETO) as file:
        events = json.load(file)["traceEvents"]
    durations: dict[str, list[float]] = {}
    for e in events:
        if e.get("ph") == "X" and e.get("cat") == "kernel":
            durations.setdefault(e["name"], []).append(float(e["dur"]))
    expected = sorted(
        ((n, len(d), np.percentile(d, 50), np.percentile(d, 99)) for n, d in durations.items()), key=lambda r: -r[3]
    )[:20]
    _, rows = run_query(kineto_db, QUERY.format(source="cuda"))
    np.testing.assert_allclose([r[3] for r in rows], [e[3] for e in expected], rtol=1e-9)  # p99, descending
    by_name = {e[0]: e for e in expected}
    for name, count, p50, p99 in rows:
        if p99 > expected[-1][3]:  # rows above the cut-off are not ties with left-out names
            assert (count, p50, p99) == pytest.approx(by_name[name][1:], rel=1e-9), name

    result = hybridlm("query", str(kineto_db), QUERY.format(source="cuda"))
    assert result.returncode == 0, result.stderr
    assert expected[0][0][:25] in result.stdout
    result = hybridlm("query", str(kineto_db), QUERY.format(source="cpu"))
    assert result.returncode == 0 and "aten::" in result.stdout, result.stderr


def test_bad_sql_and_bad_files_are_one_line_errors(kineto_db, tmp_path):
    result = hybridlm("query", str(kineto_db), "SELECT nope FROM events")
    assert result.returncode == 2 and "Traceback" not in result.stderr and "nope" in result.stderr
    junk = tmp_path / "junk.txt"
    junk.write_text("not a trace")
    result = hybridlm("import", str(junk), "--db", str(tmp_path / "x.duckdb"))
    assert result.returncode == 2 and "Traceback" not in result.stderr and "junk.txt" in result.stderr


def test_query_prints_values_literally_and_as_json_or_csv_for_scripts(kineto_db):
    sql = "SELECT '[true, false]' AS a, '[/]' AS b, NULL AS c, 0.1::DOUBLE + 0.2::DOUBLE AS d"
    result = hybridlm("query", str(kineto_db), sql)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[2].split() == ["[true,", "false]", "[/]", "NULL", "0.3"]
    result = hybridlm("query", str(kineto_db), sql, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [{"a": "[true, false]", "b": "[/]", "c": None, "d": 0.1 + 0.2}]
    result = hybridlm("query", str(kineto_db), sql, "--csv")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["a,b,c,d", f'"[true, false]",[/],,{0.1 + 0.2!r}']
    result = hybridlm("query", str(kineto_db), "SELECT 1; DROP TABLE events")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "got 2 statements" in result.stderr


def test_profile_on_a_device_this_machine_lacks_is_one_clear_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    db = tmp_path / "p.duckdb"
    for device, message in (("cuda", "CUDA is not available here"), ("tpu", "unknown device")):
        result = hybridlm("profile", "debug-tiny", "--device", device, "--db", str(db))
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr and message in result.stderr
        assert result.stderr.strip().count("\n") == 0
    assert not db.exists()  # refused before anything was traced


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--requests", "100000000000000000000"], "--requests 100000000000000000000: give 1 to 100,000"),
        (["--new-tokens", "0"], "--new-tokens 0: give 1 to"),
        (["--batch-size", "0"], "--batch-size 0: give 1 to"),
        (["--prompt-len", "9-3"], "--prompt-len 9-3: need 1 <= MIN <= MAX"),
        (["--prompt-len", "4-"], "--prompt-len: expected LEN or MIN-MAX, got '4-'"),
        (["--seed=-5"], "--seed -5: give 0 to 2**64 - 1"),
        (["--db", "{tmp}/afile.txt/x.duckdb"], "afile.txt is a file, not a directory"),
        (["--db", "{tmp}"], "is a directory; give a file name"),
    ],
    ids=[
        "huge-requests",
        "no-new-tokens",
        "no-batch",
        "inverted-prompt-range",
        "open-prompt-range",
        "negative-seed",
        "file-as-parent",
        "dir-as-db",
    ],
)
def test_profile_refuses_a_bad_workload_before_building_the_model(tmp_path, args, message):
    """One line, nothing else on stderr: the preset's 'random weights' note would come from building the model
    (and 10**20 requests used to hang building prompts)."""
    (tmp_path / "afile.txt").write_text("mine")
    args = [a.format(tmp=tmp_path) for a in args]
    result = hybridlm("profile", "debug-tiny", *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hybridlm profile: error: ")
    assert message in result.stderr and "random weights" not in result.stderr
    assert (tmp_path / "afile.txt").read_text() == "mine"


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf"])
def test_report_refuses_a_gate_threshold_that_is_not_a_positive_fraction(kineto_db, value):
    result = hybridlm("report", str(kineto_db), "--p50-threshold", value)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert f"--p50-threshold {float(value)}" in result.stderr
