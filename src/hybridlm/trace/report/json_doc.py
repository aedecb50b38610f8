"""The report as one JSON document: the same data as the tables, NaN and infinity as null."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from hybridlm.trace.analysis import Change, DecompositionRow, RuleRow, RunSummary, finite_or_none
from hybridlm.trace.imbalance import ImbalanceRow
from hybridlm.trace.report.ranks import RankReport


def _plain(value: Any) -> Any:
    if isinstance(value, float):
        return finite_or_none(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def to_json(
    rows: Sequence[DecompositionRow],
    imbalance: Sequence[ImbalanceRow] = (),
    changes: Sequence[Change] | None = None,
    *,
    run: RunSummary | None = None,
    rules: Sequence[RuleRow] = (),
    ranks: RankReport | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """The same data as `tables.render_tables`, as a JSON document (``expert_parallel``: null for a run
    without expert-parallel MoE blocks)."""
    doc: dict[str, Any] = {}
    if run is not None:
        doc["run"] = {**dataclasses.asdict(run), "num_events": run.num_events, "complete": run.is_complete}
    doc["source"] = rows[0].source if rows else None
    doc["decomposition"] = [{**dataclasses.asdict(r), "is_aggregate": r.is_aggregate} for r in rows]
    doc["attribution_rules"] = [dataclasses.asdict(r) for r in rules]
    doc["moe_imbalance"] = [dataclasses.asdict(r) for r in imbalance]
    doc["expert_parallel"] = None if ranks is None else dataclasses.asdict(ranks)
    if changes is not None:
        doc["comparison"] = {
            "changes": [dataclasses.asdict(c) for c in changes],
            "regressions": [f"{c.layer_type}/{c.phase}" for c in changes if c.is_regression],
        }
    if extra:
        doc.update(extra)
    return json.dumps(_plain(doc), indent=2)
