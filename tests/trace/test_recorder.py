"""The Tracer on real models: what it records, checked against what the workload must produce."""

import os
import signal
import subprocess
import sys
import textwrap

import duckdb
import torch

from hybridlm import HybridLM, generate
from hybridlm.presets import get_preset
from hybridlm.trace.recorder import Tracer
from hybridlm.trace.store import TraceStore


def _traced_generate(path, pattern="MEGm*-EM", prompts=((1, 2, 3, 4, 5), (6, 7)), new_tokens=6):
    torch.manual_seed(0)
    model = HybridLM(get_preset("debug-tiny", pattern=pattern)).eval()
    with TraceStore(path) as store:
        tracer = Tracer(store, model="debug-tiny").attach(model)
        generate(model, [list(p) for p in prompts], new_tokens)
        tracer.close()
    assert model.block_observer is None
    return model, tracer.run_id


def test_every_block_call_is_one_event_with_its_phase_and_tokens(tmp_path):
    path = tmp_path / "t.duckdb"
    model, run_id = _traced_generate(path)
    con = duckdb.connect(str(path), read_only=True)
    rows = con.execute(
        "SELECT step, phase, layer, layer_type, name, batch, tokens, duration_us FROM events "
        "WHERE run_id = ? AND source = 'layer' ORDER BY step, start_us",
        [run_id],
    ).fetchall()
    num_blocks = len(model.config.pattern)
    # one prefill step (2 prompts left-padded to 5) + 5 decode steps (the 6th token needs no forward)
    assert len(rows) == 6 * num_blocks
    for step in range(6):
        block_rows = rows[step * num_blocks : (step + 1) * num_blocks]
        assert [r[2] for r in block_rows] == list(range(num_blocks))
        assert [r[3] for r in block_rows] == [b.layer_type for b in model.layers]
        assert all(r[4] == f"L{r[2]}.{r[3]}" for r in block_rows)
        phase, tokens = ("prefill", 10) if step == 0 else ("decode", 2)
        assert {(r[0], r[1], r[5], r[6]) for r in block_rows} == {(step, phase, 2, tokens)}
    assert all(r[7] > 0 for r in rows)
    steps = con.execute(
        "SELECT step, name, duration_us FROM events WHERE run_id = ? AND source = 'step' ORDER BY step", [run_id]
    ).fetchall()
    assert [s[1] for s in steps] == ["prefill"] + ["decode"] * 5
    # a step's wall time covers its blocks
    for step, _, duration in steps:
        block_total = sum(r[7] for r in rows if r[0] == step)
        assert block_total <= duration * 1.001


def test_routing_rows_count_every_token_expert_assignment(tmp_path):
    path = tmp_path / "t.duckdb"
    model, run_id = _traced_generate(path)
    con = duckdb.connect(str(path), read_only=True)
    k, num_experts = model.config.moe.num_experts_per_tok, model.config.moe.num_experts
    moe_layers = [i for i, c in enumerate(model.config.pattern) if c == "E"]
    totals = con.execute(
        "SELECT step, layer, count(*), sum(tokens) FROM routing WHERE run_id = ? GROUP BY step, layer ORDER BY 1, 2",
        [run_id],
    ).fetchall()
    expected = [(s, layer, num_experts, (10 if s == 0 else 2) * k) for s in range(6) for layer in moe_layers]
    assert totals == expected


def test_phase_is_train_for_a_training_model_and_explicit_steps_group_calls(tmp_path):
    model = HybridLM(get_preset("debug-tiny", pattern="M*E")).train()
    ids = torch.randint(0, 256, (2, 9))
    with TraceStore(tmp_path / "t.duckdb") as store:
        tracer = Tracer(store).attach(model)
        model(ids).logits.sum().backward()
        with tracer.step("train"):  # two forwards as one step
            model(ids)
            model(ids)
        tracer.close()
        rows = store.connection.execute(
            "SELECT step, phase, count(*) FROM events WHERE source = 'layer' GROUP BY 1, 2 ORDER BY 1"
        ).fetchall()
    assert rows == [(0, "train", 3), (1, "train", 6)]


def test_a_second_observer_is_refused(tmp_path):
    model = HybridLM(get_preset("debug-tiny", pattern="M")).eval()
    with TraceStore(tmp_path / "t.duckdb") as store:
        Tracer(store).attach(model)
        try:
            Tracer(store).attach(model)
        except ValueError as error:
            assert "already has a block observer" in str(error)
        else:
            raise AssertionError("attaching twice must fail")


def test_sigkill_keeps_every_flushed_event(tmp_path):
    path = tmp_path / "killed.duckdb"
    script = textwrap.dedent(
        f"""
        import sys, torch
        from hybridlm import HybridLM, generate, get_preset
        from hybridlm.trace.recorder import Tracer
        from hybridlm.trace.store import TraceStore
        torch.manual_seed(0)
        model = HybridLM(get_preset("debug-tiny")).eval()
        store = TraceStore({str(path)!r}, flush_every=10**9)
        tracer = Tracer(store).attach(model)
        flushed = 0
        while True:
            generate(model, [[1, 2, 3]], 4)
            store.flush()
            flushed = store.connection.execute("SELECT count(*) FROM events").fetchone()[0]
            print(flushed, flush=True)
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        seen = [int(process.stdout.readline()) for _ in range(3)]
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    con = duckdb.connect(str(path), read_only=True)
    stored = con.execute("SELECT count(*) FROM events").fetchone()[0]
    assert stored >= seen[-1] > 0
    steps = con.execute("SELECT count(*) FROM events WHERE source = 'step'").fetchone()[0]
    assert con.execute("SELECT count(*) FROM events WHERE source = 'layer'").fetchone()[0] == steps * 8
    con.close()
    # the report marks the killed run incomplete, with the steps it holds
    report = subprocess.run(
        [sys.executable, "-m", "hybridlm.cli", "report", str(path)], capture_output=True, text=True, check=False
    )
    assert report.returncode == 0, report.stderr
    assert f"INCOMPLETE: no end recorded (killed or interrupted); holds {steps} steps" in report.stdout
