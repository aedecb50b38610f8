"""`hybridlm profile|generate --ep N`, the real command in a subprocess: N local gloo ranks started by
hybridlm, or joined under torchrun; rank 0 alone prints and writes; a failing rank fails the command
with one line, and nothing hangs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from tests.helpers import run_cli

MODEL = "debug-tiny-nemotron"  # pattern M*ME-E: 8 experts per MoE block, top-2
SMALL = ["--requests", "2", "--batch-size", "2", "--new-tokens", "3", "--prompt-len", "4-8"]
LAYER_TYPES = {"mamba2", "attention", "mlp", "moe", "moe_router", "moe_dispatch", "moe_experts", "moe_combine"}


def _profile(db: Path, *flags: str, **kwargs) -> subprocess.CompletedProcess:
    return run_cli("profile", MODEL, "--db", str(db), *SMALL, *flags, **kwargs)


def _counts(db: Path) -> dict[tuple[str, int], int]:
    with duckdb.connect(str(db), read_only=True) as con:
        rows = con.execute("SELECT source, rank, count(*) FROM events GROUP BY ALL").fetchall()
    return {(source, rank): n for source, rank, n in rows}


def _layer_types_per_rank(db: Path) -> dict[int, set[str]]:
    with duckdb.connect(str(db), read_only=True) as con:
        rows = con.execute("SELECT DISTINCT rank, layer_type FROM events WHERE source = 'layer'").fetchall()
    types: dict[int, set[str]] = {}
    for rank, layer_type in rows:
        types.setdefault(rank, set()).add(layer_type)
    return types


def test_profile_on_two_spawned_ranks_stores_every_ranks_calls_and_prints_once(tmp_path):
    db = tmp_path / "ep.duckdb"
    result = _profile(db, "--ep", "2", "--routing-skew", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("run ")
    assert result.stdout.count("requests in batches of 2") == 1, "only rank 0 prints"
    assert "on 2 ranks, routing skew 1" in result.stdout.splitlines()[0]
    assert result.stderr.count("is a preset: random weights") == 1, result.stderr
    assert _layer_types_per_rank(db) == {0: LAYER_TYPES, 1: LAYER_TYPES}
    counts = _counts(db)
    # 1 prefill + 2 decode steps per rank; 2 MoE blocks x 2 collectives per step
    assert counts[("step", 0)] == counts[("step", 1)] == 3
    assert counts[("collective", 0)] == counts[("collective", 1)] == 3 * 2 * 2
    with duckdb.connect(str(db), read_only=True) as con:
        [(device, notes, ended)] = con.execute("SELECT device, notes, ended_at FROM runs").fetchall()
        [(routing_steps,)] = con.execute("SELECT count(DISTINCT step) FROM routing").fetchall()
    assert device == "cpu, 2 ranks (gloo)" and ended is not None
    assert '"world_size": 2' in notes and '"routing_skew": {"exponent": 1.0' in notes
    assert routing_steps == 3


def test_profile_under_torchrun_joins_its_process_group(tmp_path):
    db = tmp_path / "torchrun.duckdb"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "hybridlm", "profile", MODEL, "--ep", "2", "--db", str(db), *SMALL]  # fmt: skip
    env = {**os.environ, "HYBRIDLM_PROGRESS": "0"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("requests in batches of 2") == 1, "only rank 0 prints"
    assert _layer_types_per_rank(db) == {0: LAYER_TYPES, 1: LAYER_TYPES}


def test_torchrun_world_size_must_match_ep(tmp_path):
    env = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}
    result = _profile(tmp_path / "t.duckdb", "--ep", "2", env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "hybridlm profile: error: --ep 2, but torchrun started 1 ranks (WORLD_SIZE=1): give the same number"
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--ep", "3"], "--ep 3: 8 experts do not divide over 3 ranks; give one of 1, 2, 4, 8"),
        (["--ep", "0"], "--ep 0: give the number of ranks to spread the experts over, 1 or more"),
        (["--ep", "4"], "--batch-size 2 with --ep 4: each batch is split over the ranks, so give --batch-size 4 "
                        "or more"),
        (["--ep", "2", "--kernels"], "--kernels with --ep 2: operator traces of several ranks are not supported yet"),
        (["--routing-skew", "-1"], "--routing-skew -1: give an exponent >= 0 (0 = no skew; 0.5-4 = ever hotter "
                                   "experts)"),
    ],
)  # fmt: skip
def test_bad_flags_are_one_line_before_any_rank_starts(tmp_path, flags, message):
    result = _profile(tmp_path / "t.duckdb", *flags)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"hybridlm profile: error: {message}"]
    assert not (tmp_path / "t.duckdb").exists()


def test_a_last_batch_smaller_than_the_ranks_is_refused(tmp_path):
    result = run_cli("profile", MODEL, "--db", str(tmp_path / "t.duckdb"), "--ep", "2", "--requests", "3",
                     "--batch-size", "2")  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "hybridlm profile: error: --requests 3 in batches of 2 leaves a batch of 1 prompts for 2 ranks; "
        "give a multiple of --batch-size"
    )


def _generate(*flags: str) -> subprocess.CompletedProcess:
    return run_cli("generate", MODEL, "--prompt", "Hybrid ", "--max-new-tokens", "12", "--temperature", "1", *flags)


def test_generate_on_ranks_prints_the_single_process_text_once():
    """Sampled (seeded) text with a routing skew: every rank holds the same logits and the same skew, so
    draws the same tokens as one process; rank 0 alone prints them."""
    single = _generate("--seed", "3", "--routing-skew", "1")
    spread = _generate("--seed", "3", "--routing-skew", "1", "--ep", "2")
    for result in (single, spread):
        assert result.returncode == 0, result.stderr
    assert spread.stdout == single.stdout
    assert spread.stderr.count("is a preset: random weights") == 1


def test_a_rank_that_fails_fails_the_command_with_one_line_naming_it(tmp_path):
    """Rank 0 cannot open the trace database (another process holds DuckDB's lock): its error, not
    rank 1's lost peer, is the command's one line. Pinned to one CPU, the start also warns that the two
    ranks will time-share it."""
    db = tmp_path / "locked.duckdb"
    holder = duckdb.connect(str(db))
    try:
        result = _profile(db, "--ep", "2", preexec_fn=lambda: os.sched_setaffinity(0, {0}))
    finally:
        holder.close()
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0] == (
        "warning: --ep 2 starts 2 ranks on 1 CPU: they will time-share the cores, and time spent waiting in "
        "collectives will be mostly scheduling"
    )
    assert lines[-1].startswith(f"hybridlm profile: error: rank 0 of 2: {db}: cannot open for writing"), lines
    assert "Traceback" not in result.stderr


def _rank_processes(pid: int) -> list[int]:
    """The spawned ranks among ``pid``'s children (not multiprocessing's resource tracker)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    ranks = []
    for child in children:
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
            ranks.append(int(child))
    return ranks


def _events_written(db: Path, copy: Path) -> int:
    """Events in the trace database a live writer holds (read from a copy of the file and its log)."""
    if not db.exists():
        return 0
    copy.mkdir(exist_ok=True)
    for source in (db, db.with_name(db.name + ".wal")):
        if source.exists():
            shutil.copyfile(source, copy / source.name)
    try:
        with duckdb.connect(str(copy / db.name), read_only=True) as con:
            return con.execute("SELECT count(*) FROM events").fetchone()[0]
    except duckdb.Error:  # caught mid-write, or the tables are not there yet
        return 0
    finally:
        for leftover in copy.iterdir():
            leftover.unlink()


def test_a_killed_rank_stops_the_others_and_the_command_fails_without_hanging(tmp_path):
    db = tmp_path / "killed.duckdb"
    command = [sys.executable, "-m", "hybridlm", "profile", MODEL, "--ep", "2", "--db", str(db),
               "--requests", "2000", "--batch-size", "2", "--new-tokens", "16"]  # fmt: skip
    env = {**os.environ, "HYBRIDLM_PROGRESS": "0"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while _events_written(db, tmp_path / "copy") == 0:  # rank 0 wrote a first batch
            assert process.poll() is None and time.monotonic() < deadline, "the ranks did not start"
            time.sleep(0.5)
        ranks = _rank_processes(process.pid)
        silent = [pid for pid in ranks if os.readlink(f"/proc/{pid}/fd/1") == os.devnull]
        assert len(silent) == 1, "rank 1 writes nothing"
        os.kill(silent[0], signal.SIGKILL)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 2
    assert stderr.strip().splitlines()[-1] == (
        "hybridlm profile: error: rank 1 of 2 was killed by SIGKILL; the other ranks were stopped"
    )
    assert [pid for pid in ranks if Path(f"/proc/{pid}").exists()] == [], "every rank is gone"
    report = run_cli("report", str(db))
    assert "INCOMPLETE" in report.stdout
