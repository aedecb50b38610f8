"""A served run traced into DuckDB: every block call of every step, each step's requests, and a report."""

from __future__ import annotations

import duckdb
import torch

from hybridlm.engine import Engine, EngineConfig, SamplingParams
from hybridlm.model import HybridLM
from hybridlm.tokenizer import ByteTokenizer
from tests.helpers import run_cli, tiny_config

PATTERN = "MEG*E"


def test_a_traced_serving_run_records_blocks_requests_and_reports(tmp_path):
    torch.manual_seed(0)
    model = HybridLM(tiny_config(PATTERN)).eval()
    config = EngineConfig(max_slots=2, max_model_len=128, step_token_budget=16, prefix_cache_bytes=0)
    engine = Engine(model, ByteTokenizer(), config)
    path = tmp_path / "serve.duckdb"
    run_id = engine.enable_trace(path, model_name="tiny")
    prompts = [list(range(1, 1 + n)) for n in (5, 30, 12)]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    handles = [engine.submit(p, params) for p in prompts]
    while engine.step():
        pass
    engine.shutdown()
    assert all(h._events.qsize() == 5 for h in handles)  # 4 tokens + the final event

    con = duckdb.connect(str(path), read_only=True)
    steps = con.execute("SELECT step, phase FROM events WHERE source = 'step' AND run_id = ?", [run_id]).fetchall()
    layers = con.execute("SELECT step, layer, layer_type FROM events WHERE source = 'layer'").fetchall()
    assert len(layers) == len(steps) * len(PATTERN)  # every block of every forward
    assert {lt for _, _, lt in layers} == {"mamba2", "moe", "gdn", "attention"}
    per_request = dict(
        con.execute(
            "SELECT name, list(struct_pack(phase := phase, tokens := tokens)) FROM events "
            "WHERE source = 'request' GROUP BY name"
        ).fetchall()
    )
    for handle, prompt in zip(handles, prompts, strict=True):
        rows = per_request[handle.request_id]
        prefill = sum(r["tokens"] for r in rows if r["phase"] == "prefill")
        decode = [r for r in rows if r["phase"] == "decode"]
        assert prefill == len(prompt)  # the prompt, in pieces of at most the step budget
        assert len(decode) == params.max_tokens - 1  # the first token comes from the prefill's logits
    assert con.execute("SELECT ended_at IS NOT NULL FROM runs WHERE run_id = ?", [run_id]).fetchone()[0]
    con.close()

    report = run_cli("report", str(path))
    assert report.returncode == 0, report.stderr
    assert "phase prefill" in report.stdout and "phase decode" in report.stdout and "gdn" in report.stdout
