"""The collectives traced on 2 gloo ranks: spans per MoE call, tokens per rank pair, the shared clock
and the rows rank 0 writes to the trace store."""

from __future__ import annotations

import duckdb
import pytest

from hybridlm.distributed import SPAN_LAYER_TYPES
from tests.distributed import workers
from tests.distributed.spawn import run_ranks

WORLD_SIZE = 2
MOE_LAYERS = [1, 3]  # in "ME*E"
CALLS = 3  # one prefill, two decode steps
EXPERTS_PER_RANK = 8 // WORLD_SIZE


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    store_path = tmp_path_factory.mktemp("trace") / "ep.duckdb"
    return run_ranks(WORLD_SIZE, workers.trace_worker, store_path), store_path


def _calls(spans: list[tuple]) -> list[dict[str, tuple]]:
    """The spans grouped by MoE block call: [{layer_type: span}], in call order."""
    assert len(spans) % len(SPAN_LAYER_TYPES) == 0
    calls = []
    for i in range(0, len(spans), len(SPAN_LAYER_TYPES)):
        group = spans[i : i + len(SPAN_LAYER_TYPES)]
        assert [span[1] for span in group] == list(SPAN_LAYER_TYPES)
        assert len({span[0] for span in group}) == 1, "the four spans of a call name one block"
        calls.append({span[1]: span for span in group})
    return calls


def test_every_moe_block_call_records_the_four_spans_on_every_rank(traced):
    results, _ = traced
    for rank, result in enumerate(results):
        calls = _calls(result["spans"])
        assert [call["moe_router"][0] for call in calls] == MOE_LAYERS * CALLS, f"rank {rank}"


def test_spans_follow_each_other_and_entry_lies_inside_the_collective_span(traced):
    results, _ = traced
    for result in results:
        for call in _calls(result["spans"]):
            ends = []
            for layer_type in SPAN_LAYER_TYPES:
                _, _, start, end, entered, _, _ = call[layer_type]
                assert start <= end
                if layer_type in ("moe_dispatch", "moe_combine"):
                    assert start <= entered <= end
                else:
                    assert entered is None
                ends.append((start, end))
            assert all(ends[i][1] == ends[i + 1][0] for i in range(len(ends) - 1)), "no gaps between spans"


def test_tokens_sent_match_the_routing_and_what_the_peer_received(traced):
    results, _ = traced
    calls = [_calls(result["spans"]) for result in results]
    for rank, result in enumerate(results):
        assert [layer for layer, _ in result["routing"]] == MOE_LAYERS * CALLS
        for call, (_, counts_E) in zip(calls[rank], result["routing"], strict=True):
            per_rank = counts_E.view(WORLD_SIZE, EXPERTS_PER_RANK).sum(dim=1).tolist()
            for layer_type in SPAN_LAYER_TYPES:
                assert call[layer_type][5] == per_rank, f"rank {rank} {layer_type}: sent"
    for a in range(WORLD_SIZE):
        for b in range(WORLD_SIZE):
            for call_a, call_b in zip(calls[a], calls[b], strict=True):
                sent = call_a["moe_dispatch"][5][b]
                received = call_b["moe_dispatch"][6][a]
                assert sent == received, f"rank {a} sent {sent} pairs to rank {b}, which received {received}"


def test_ranks_share_one_clock(traced):
    """Readings before a barrier on any rank precede readings after it on every rank: the clock is one
    clock across processes, so entry times can be compared between ranks."""
    results, _ = traced
    assert max(r["clock"][0] for r in results) <= min(r["clock"][1] for r in results)


def test_rank_0_stores_every_ranks_rows(traced):
    results, store_path = traced
    with duckdb.connect(str(store_path), read_only=True) as con:
        counts = con.execute(
            "SELECT source, rank, layer_type, count(*), count(DISTINCT step), sum(tokens) FROM events "
            "GROUP BY ALL ORDER BY ALL"
        ).fetchall()
        waits = con.execute(
            "SELECT max(start_us) OVER (PARTITION BY step, layer, layer_type) - start_us AS wait_us "
            "FROM events WHERE source = 'collective'"
        ).fetchall()
        phases = con.execute("SELECT DISTINCT step, phase FROM events ORDER BY step").fetchall()
    expected = []
    for rank, result in enumerate(results):
        calls = _calls(result["spans"])
        for layer_type in SPAN_LAYER_TYPES:
            column = 6 if layer_type == "moe_experts" else 5
            tokens = sum(sum(call[layer_type][column]) for call in calls)
            expected.append(("layer", rank, layer_type, len(calls), CALLS, tokens))
            if layer_type in ("moe_dispatch", "moe_combine"):
                expected.append(("collective", rank, layer_type, len(calls), CALLS, tokens))
    assert counts == sorted(expected)
    assert phases == [(0, "prefill"), (1, "decode"), (2, "decode")]
    assert len(waits) == 2 * WORLD_SIZE * len(MOE_LAYERS) * CALLS
    assert min(wait for (wait,) in waits) == 0.0  # the last rank in waits for no one


def test_a_model_without_sharded_experts_is_refused():
    from hybridlm import HybridLM
    from hybridlm.distributed import CollectiveTrace
    from tests.helpers import tiny_config

    with pytest.raises(ValueError, match=r"not sharded: call shard_experts\(model\) first"):
        CollectiveTrace(rank=0).attach(HybridLM(tiny_config("ME")))
