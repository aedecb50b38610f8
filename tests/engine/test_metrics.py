"""EngineMetrics: what /metrics renders, read back with prometheus_client's own parser and checked
against numbers recomputed here (tokens x top_k, blocks x forwards), with real models running."""

import duckdb
import pytest
import torch
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from hybridlm import HybridLM, generate
from hybridlm.engine.metrics import TTFT_BUCKETS, EngineMetrics
from hybridlm.presets import get_preset
from hybridlm.trace.recorder import Tracer
from hybridlm.trace.store import TraceStore

TINY = "debug-tiny"  # MEGm*-EM: every layer type but "parallel"; 2 MoE blocks of 8 experts, top-2


def scrape(metrics: EngineMetrics) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels without model_name): value} from the rendered text, via the real parser."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = dict(sample.labels)
            assert labels.pop("model_name") == metrics.model_name
            samples[(sample.name, frozenset(labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def names(samples: dict) -> set[str]:
    return {name for name, _ in samples}


def test_request_and_state_metrics_render_what_the_engine_reported():
    metrics = EngineMetrics("tiny", get_preset(TINY))
    for _ in range(3):
        metrics.on_queued()
    metrics.on_scheduled(0.2)
    metrics.on_first_token(0.03)  # TTFT buckets ... 0.02, 0.04 ...: lands in le=0.04
    metrics.on_first_token(3.0)
    for gap in (0.01, 0.02, 0.5):
        metrics.on_token(gap)
    metrics.on_finished(1.5, prompt_tokens=40, generation_tokens=7, finish_reason="stop")
    metrics.on_finished(0.4, prompt_tokens=10, generation_tokens=16, finish_reason="length")
    metrics.on_rejected("queue_full")
    metrics.on_rejected("queue_full")
    metrics.on_rejected("bad_request")
    metrics.set_load(running=5, waiting=2, used_slots=5, total_slots=8)
    metrics.set_memory({"weights": 1000, "kv": 200, "conv": 30, "recurrent": 4000})
    metrics.on_prefix_query(prompt_tokens=300, cached_tokens=256, miss_reason=None)
    metrics.on_prefix_query(prompt_tokens=20, cached_tokens=0, miss_reason="too_short")
    metrics.on_prefix_query(prompt_tokens=300, cached_tokens=0, miss_reason="evicted")
    metrics.set_prefix_cache(snapshots=4, snapshot_bytes=12345, evictions_total=3)
    metrics.set_prefix_cache(snapshots=3, snapshot_bytes=9000, evictions_total=5)
    metrics.on_step({"prefill": 300, "decode": 4}, 0.02)
    metrics.on_step({"prefill": 0, "decode": 5}, 0.004)

    s = scrape(metrics)
    assert value(s, "hybridlm:requests_queued_total") == 3
    assert value(s, "hybridlm:request_queue_time_seconds_count") == 1
    assert value(s, "hybridlm:time_to_first_token_seconds_count") == 2
    assert value(s, "hybridlm:time_to_first_token_seconds_sum") == pytest.approx(3.03)
    assert value(s, "hybridlm:time_to_first_token_seconds_bucket", le="0.02") == 0
    assert value(s, "hybridlm:time_to_first_token_seconds_bucket", le="0.04") == 1
    assert value(s, "hybridlm:time_to_first_token_seconds_bucket", le="+Inf") == 2
    ttft_bounds = {dict(labels)["le"] for name, labels in s if name == "hybridlm:time_to_first_token_seconds_bucket"}
    assert len(ttft_bounds) == len(TTFT_BUCKETS) + 1  # vLLM's 22 bounds and +Inf
    assert value(s, "hybridlm:inter_token_latency_seconds_count") == 3
    assert value(s, "hybridlm:inter_token_latency_seconds_bucket", le="0.025") == 2
    assert value(s, "hybridlm:e2e_request_latency_seconds_count") == 2
    assert value(s, "hybridlm:prompt_tokens_total") == 50
    assert value(s, "hybridlm:generation_tokens_total") == 23
    assert value(s, "hybridlm:request_prompt_tokens_sum") == 50
    assert value(s, "hybridlm:request_success_total", finished_reason="stop") == 1
    assert value(s, "hybridlm:request_success_total", finished_reason="length") == 1
    assert value(s, "hybridlm:request_success_total", finished_reason="abort") == 0  # present before it happens
    assert value(s, "hybridlm:request_rejected_total", reason="queue_full") == 2
    assert value(s, "hybridlm:request_rejected_total", reason="bad_request") == 1
    assert value(s, "hybridlm:request_rejected_total", reason="stopped") == 0
    assert value(s, "hybridlm:num_requests_running") == 5
    assert value(s, "hybridlm:num_requests_waiting") == 2
    assert value(s, "hybridlm:slots_used") == 5
    assert value(s, "hybridlm:slots_total") == 8
    assert value(s, "hybridlm:kv_cache_usage_perc") == 5 / 8
    assert value(s, "hybridlm:memory_bytes", kind="recurrent") == 4000
    assert value(s, "hybridlm:memory_bytes", kind="weights") == 1000
    # prefix cache: queries and hits in tokens (as vLLM), misses in requests
    assert value(s, "hybridlm:prefix_cache_queries_total") == 620
    assert value(s, "hybridlm:prefix_cache_hits_total") == 256
    assert value(s, "hybridlm:prefix_cache_lookups_total") == 3
    assert value(s, "hybridlm:prefix_cache_misses_total", reason="too_short") == 1
    assert value(s, "hybridlm:prefix_cache_misses_total", reason="evicted") == 1
    assert value(s, "hybridlm:prefix_cache_misses_total", reason="no_snapshot") == 0
    assert value(s, "hybridlm:prefix_cache_evictions_total") == 5  # the cache's own running total
    assert value(s, "hybridlm:prefix_cache_snapshots") == 3
    assert value(s, "hybridlm:prefix_cache_bytes") == 9000
    assert value(s, "hybridlm:iteration_tokens_total_count") == 2
    assert value(s, "hybridlm:iteration_tokens_total_sum") == 309
    assert value(s, "hybridlm:engine_step_seconds_count", step_kind="mixed") == 1
    assert value(s, "hybridlm:engine_step_seconds_count", step_kind="decode") == 1
    assert value(s, "hybridlm:step_tokens_total", phase="prefill") == 300
    assert value(s, "hybridlm:step_tokens_total", phase="decode") == 9


def test_each_engine_has_its_own_registry_and_bad_memory_input_is_refused():
    first, second = EngineMetrics("a", get_preset(TINY)), EngineMetrics("b", get_preset(TINY))
    first.on_queued()
    assert value(scrape(second), "hybridlm:requests_queued_total") == 0
    assert b"hybridlm:" not in generate_latest(REGISTRY)  # the process-wide registry holds none of ours
    with pytest.raises(ValueError, match="memory_bytes\\['slots'\\]"):
        first.set_memory({"slots": "16"})


def block_counts(samples: dict, phase: str) -> dict[str, float]:
    return {
        dict(labels)["layer_type"]: v
        for (name, labels), v in samples.items()
        if name == "hybridlm:block_seconds_count" and dict(labels)["phase"] == phase
    }


def expert_rows(samples: dict) -> dict[int, dict[int, float]]:
    rows: dict[int, dict[int, float]] = {}
    for (name, labels), v in samples.items():
        if name == "hybridlm:expert_routed_tokens_total":
            rows.setdefault(int(dict(labels)["layer"]), {})[int(dict(labels)["expert"])] = v
    return rows


def test_block_timer_counts_every_block_call_and_routed_token_of_a_generate_run(tmp_path):
    torch.manual_seed(0)
    model = HybridLM(get_preset(TINY)).eval()
    config = model.config
    metrics = EngineMetrics("tiny", config)
    with TraceStore(tmp_path / "t.duckdb") as store:  # the trace recorder as the inner observer
        tracer = Tracer(store, model=TINY).attach(model)
        model.block_observer = metrics.block_timer(inner=tracer, flush_every_forwards=2)
        generate(model, [[1, 2, 3, 4, 5], [6, 7]], max_new_tokens=6)  # 1 prefill forward (2 x 5), 5 decodes
        tracer.close()
    s = scrape(metrics)

    blocks_per_type: dict[str, int] = {}
    for block in model.layers:
        blocks_per_type[block.layer_type] = blocks_per_type.get(block.layer_type, 0) + 1
    assert block_counts(s, "prefill") == {t: n * 1 for t, n in blocks_per_type.items()}
    assert block_counts(s, "decode") == {t: n * 5 for t, n in blocks_per_type.items()}
    assert all(v > 0 for (name, _), v in s.items() if name == "hybridlm:block_seconds_sum")

    tokens = 2 * 5 + 5 * 2  # the left-padded prompt batch, then 5 decode steps of 2
    moe_blocks = [i for i, c in enumerate(config.pattern) if c == "E"]
    rows = expert_rows(s)
    assert sorted(rows) == moe_blocks
    for block_index in moe_blocks:
        assert len(rows[block_index]) == config.moe.num_experts
        assert sum(rows[block_index].values()) == tokens * config.moe.num_experts_per_tok
        counts = list(rows[block_index].values())
        imbalance = value(s, "hybridlm:expert_load_imbalance", layer=str(block_index))
        assert imbalance == pytest.approx(max(counts) / (sum(counts) / len(counts)))
    # the recorder, called through the timer, saw the same routing
    con = duckdb.connect(str(tmp_path / "t.duckdb"), read_only=True)
    traced = con.execute("SELECT layer, expert, sum(tokens) FROM routing GROUP BY layer, expert").fetchall()
    assert {(layer, expert): n for layer, expert, n in traced} == {
        (layer, expert): n for layer, row in rows.items() for expert, n in row.items()
    }
    assert con.execute("SELECT count(*) FROM events WHERE source = 'layer'").fetchone()[0] == 6 * len(config.pattern)


def test_phase_set_by_the_engine_wins_and_a_bad_phase_is_refused():
    torch.manual_seed(0)
    model = HybridLM(get_preset(TINY, pattern="*E")).eval()
    metrics = EngineMetrics("tiny", model.config)
    timer = metrics.block_timer()
    model.block_observer = timer
    cache = model.new_cache(3, 32)
    with torch.no_grad():
        timer.phase = "mixed"
        model(torch.randint(0, 256, (3, 4)), cache)
        timer.phase = "prefill"  # a one-token forward the engine calls prefill (the last token of a chunk)
        model.decode_step(torch.randint(0, 256, (3,)), cache)
        timer.phase = None  # inferred: one token per sequence is decode
        model.decode_step(torch.randint(0, 256, (3,)), cache)
    s = scrape(metrics)
    assert block_counts(s, "mixed") == {"attention": 1, "moe": 1}
    assert block_counts(s, "prefill") == {"attention": 1, "moe": 1}
    assert block_counts(s, "decode") == {"attention": 1, "moe": 1}
    with pytest.raises(ValueError, match="phase must be one of prefill, decode, mixed"):
        timer.phase = "train"


@pytest.mark.parametrize("over_the_limit", [False, True])
def test_expert_series_switch_to_per_layer_summaries_past_max_expert_series(over_the_limit):
    torch.manual_seed(0)
    model = HybridLM(get_preset(TINY)).eval()
    num_series = 2 * model.config.moe.num_experts  # 2 MoE blocks x 8 experts
    per_expert = EngineMetrics("tiny", model.config, max_expert_series=num_series)
    checked = EngineMetrics("tiny", model.config, max_expert_series=num_series - 1 if over_the_limit else num_series)
    model.block_observer = checked.block_timer(inner=per_expert.block_timer())  # both see the same forwards
    generate(model, [[5, 6, 7], [8, 9, 10]], max_new_tokens=4)

    rows = expert_rows(scrape(per_expert))
    s = scrape(checked)
    assert names(s) >= {"hybridlm:expert_load_imbalance"}
    if not over_the_limit:
        assert expert_rows(s) == rows
        assert "hybridlm:expert_routed_tokens_max" not in names(s)
        return
    assert "hybridlm:expert_routed_tokens_total" not in names(s)
    for block_index, row in rows.items():
        assert value(s, "hybridlm:expert_routed_tokens_max", layer=str(block_index)) == max(row.values())
        mean = sum(row.values()) / len(row)
        assert value(s, "hybridlm:expert_load_imbalance", layer=str(block_index)) == pytest.approx(
            max(row.values()) / mean
        )
    assert "max_expert_series" in metrics_help(checked, "hybridlm:expert_routed_tokens_max")


def metrics_help(metrics: EngineMetrics, family_name: str) -> str:
    body, _ = metrics.render()
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    return families[family_name].documentation
