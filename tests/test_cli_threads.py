"""The threading setup the hybridlm command gives torch, seen from inside the process by OpenMP itself.

libgomp reads OMP_WAIT_POLICY and OMP_NUM_THREADS once, when torch loads it; OMP_DISPLAY_ENV=VERBOSE
makes it print what it read (GOMP_SPINCOUNT is 0 for PASSIVE, 300000 when unset, 3e10 for ACTIVE).
So these tests check the setting reached OpenMP, not merely os.environ.
"""

import os
import re
import subprocess

import pytest

from tests.helpers import run_cli

SPIN_COUNTS = {"PASSIVE": "0", "ACTIVE": "30000000000"}


def run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return run_cli(*args, env={"OMP_DISPLAY_ENV": "VERBOSE", **env}, clean_env=True)


def openmp_settings(stderr: str) -> dict[str, str]:
    """The variables libgomp printed for OMP_DISPLAY_ENV (skips where torch's OpenMP is not libgomp)."""
    found = dict(re.findall(r"^\s+(\w+) = '([^']*)'", stderr, flags=re.MULTILINE))
    if "GOMP_SPINCOUNT" not in found:
        pytest.skip("torch's OpenMP runtime here is not libgomp (no GOMP_SPINCOUNT in OMP_DISPLAY_ENV)")
    return found


def test_openmp_threads_sleep_when_idle_by_default():
    result = run("info", "debug-tiny", "--json")
    assert result.returncode == 0, result.stderr
    assert openmp_settings(result.stderr)["GOMP_SPINCOUNT"] == SPIN_COUNTS["PASSIVE"]


def test_a_wait_policy_the_user_set_is_kept():
    result = run("info", "debug-tiny", "--json", OMP_WAIT_POLICY="ACTIVE")
    assert result.returncode == 0, result.stderr
    assert openmp_settings(result.stderr)["GOMP_SPINCOUNT"] == SPIN_COUNTS["ACTIVE"]


def test_threads_flag_reaches_openmp_and_torch():
    result = run("--debug", "--threads", "1", "info", "debug-tiny", "--json", OMP_NUM_THREADS="2")
    assert result.returncode == 0, result.stderr
    settings = openmp_settings(result.stderr)
    assert settings["OMP_NUM_THREADS"] == "1"
    assert settings["GOMP_SPINCOUNT"] == SPIN_COUNTS["PASSIVE"]
    debug_line = next(line for line in result.stderr.splitlines() if line.startswith("hybridlm info: debug:"))
    assert "OMP_WAIT_POLICY=PASSIVE (set by hybridlm)" in debug_line
    assert "torch threads 1" in debug_line
    assert "torch was loaded before" not in debug_line


def test_threads_beyond_the_cpus_are_refused():
    too_many = len(os.sched_getaffinity(0)) + 1
    result = run("--threads", str(too_many), "info", "debug-tiny")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].startswith("hybridlm: error: argument --threads: must be between 1 and")
