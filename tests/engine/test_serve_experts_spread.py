"""`hybridlm serve --ep 2`: two real ranks (rank 0 serves HTTP, rank 1 replays its model calls) answer
with the text one process generates on the same weights, and stop together on SIGTERM."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.engine.test_server import MODEL, THREADS, Server

PROMPTS = ["Hybrid models keep state: ", "Experts are spread over ranks, "]
NEW_TOKENS = 12


def _generate_alone(prompt: str) -> str:
    command = [sys.executable, "-m", "hybridlm", *THREADS, "generate", MODEL, "--prompt", prompt]
    command += ["--max-new-tokens", str(NEW_TOKENS), "--temperature", "0"]
    env = {**os.environ, "HYBRIDLM_PROGRESS": "0", "PYTHONIOENCODING": "utf-8"}
    result = subprocess.run(command, capture_output=True, env=env, timeout=300, check=False)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout.decode("utf-8")[len(prompt) : -1]


def test_serving_with_experts_on_two_ranks_answers_what_one_process_generates(tmp_path):
    server = Server(tmp_path, MODEL, "--ep", "2", "--max-slots", "4", "--max-model-len", "256", "--drain-timeout", "5")
    try:
        client = server.client()

        def complete(prompt: str) -> str:
            answer = client.completions.create(model=MODEL, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0)
            return answer.choices[0].text

        with ThreadPoolExecutor(len(PROMPTS)) as pool:  # concurrent: the two decode in one batch
            served = list(pool.map(complete, PROMPTS))
        assert server.wait_until_idle()["free_slots"] == 4
        calls = _block_calls(httpx.get(f"{server.url}/metrics", timeout=30).text)
    finally:
        status = server.stop()
    assert status == 0, server.log.read_text()
    assert served == [_generate_alone(prompt) for prompt in PROMPTS]
    # the parts of the MoE blocks whose experts are spread are timed like blocks, in both phases
    for part in ("moe_router", "moe_dispatch", "moe_experts", "moe_combine"):
        assert calls[(part, "prefill")] > 0 and calls[(part, "decode")] > 0
        assert calls[(part, "decode")] == calls[("moe", "decode")]  # one of each part per MoE block call


def _block_calls(text: str) -> dict[tuple[str, str], float]:
    calls = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "hybridlm:block_seconds_count":
                calls[(sample.labels["layer_type"], sample.labels["phase"])] = sample.value
    return calls
