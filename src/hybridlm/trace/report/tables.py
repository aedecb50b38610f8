"""The report as text tables: the run line, the per-layer-type decomposition (one table per phase),
the attribution rules, the MoE imbalance, an expert-parallel run's ranks and a comparison's changes."""

from __future__ import annotations

import io
from collections.abc import Sequence

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from hybridlm.trace import analysis
from hybridlm.trace.analysis import ALL_LAYERS, Change, DecompositionRow, RuleRow, RunSummary
from hybridlm.trace.imbalance import MIN_TREND_STEPS, QUARTILE_STEPS, ImbalanceRow
from hybridlm.trace.report.formats import change, ratio, share, us, wall
from hybridlm.trace.report.ranks import RankReport


def completeness(run: RunSummary) -> str | None:
    """'INCOMPLETE ...' for a run that never ended (killed, interrupted), else None."""
    if run.is_complete is False:
        steps = f"{run.num_steps:,} step{'s' * (run.num_steps != 1)}"
        return f"INCOMPLETE: no end recorded (killed or interrupted); holds {steps}, {run.num_events:,} events"
    return None


def run_line(run: RunSummary, source: str | None) -> str:
    created = run.created_at.isoformat(sep=" ", timespec="seconds") if run.created_at else "?"
    counts = ", ".join(f"{n:,} {s}" for s, n in sorted(run.events_by_source.items())) or "no events"
    parts = [f"run {run.run_id}", run.model or "unnamed model", f"{run.kind or '?'} {created}"]
    if run.device:
        parts.append(run.device)
    parts.append(counts)
    if source:
        parts.append(f"decomposed: {source!r} events")
    if (note := completeness(run)) is not None:
        parts.append(note)
    return " · ".join(parts)


def _aggregate_label(source: str) -> str:
    return f"{ALL_LAYERS} (aggregate)" if source == "layer" else f"all {source} events (aggregate)"


def _table(title: str, caption: str | None = None) -> Table:
    return Table(
        title=Text(title),
        title_justify="left",
        caption=Text(caption) if caption else None,
        caption_justify="left",
        box=box.SIMPLE_HEAD,
        header_style="bold",
    )


def decomposition_tables(rows: Sequence[DecompositionRow]) -> list[Table]:
    tables = []
    for phase in dict.fromkeys(r.phase for r in rows):
        group = [r for r in rows if r.phase == phase]
        wall_from = "forward steps" if group[0].wall_basis == "steps" else f"span of the {group[0].source} events"
        if group[0].ranks > 1:
            wall_from += f", summed over {group[0].ranks} ranks"
        table = _table(f"phase {phase}: wall time {wall(group[0].wall_us)} ({wall_from})")
        table.add_column("layer type", justify="left", no_wrap=True)
        for name in ("calls", "p50 µs", "p99 µs", "tail ratio p99/p50", "share of wall time"):
            table.add_column(name, justify="right", no_wrap=True)
        for row in group:
            if row.is_aggregate:
                table.add_section()
            table.add_row(
                Text(_aggregate_label(row.source) if row.is_aggregate else row.layer_type),
                f"{row.calls:,}",
                us(row.p50_us),
                us(row.p99_us),
                ratio(row.tail_ratio),
                share(row.share_of_wall),
                style="italic" if row.is_aggregate else None,
            )
        tables.append(table)
    return tables


def rules_table(rules: Sequence[RuleRow], source: str) -> Table:
    table = _table(
        f"which rule gave each {source} event its layer type (classify.py)",
        "share = the rule's summed event time / all summed event time. Rules, first that applies: the block range "
        "around the event or its launch, the name of the range that launched it, the event's own name.",
    )
    table.add_column("rule", no_wrap=True)
    table.add_column("layer types", no_wrap=True)
    for name in ("events", "time µs", "share of time"):
        table.add_column(name, justify="right", no_wrap=True)
    for rule in rules:
        table.add_row(
            Text(rule.rule), Text(", ".join(rule.layer_types)), f"{rule.events:,}", us(rule.total_us), share(rule.share)
        )
    return table


def imbalance_table(rows: Sequence[ImbalanceRow]) -> Table:
    table = _table(
        "MoE expert imbalance per step (max tokens on one expert / mean tokens per expert; 1.0 = even)",
        f"MoE block p50 latency in the least / most imbalanced steps (quartiles from {QUARTILE_STEPS} "
        f"steps, else halves), and Spearman's rho over all steps; '-' where a phase has fewer than "
        f"{MIN_TREND_STEPS} steps or imbalance does not vary.",
    )
    for name in ("layer", "phase"):
        table.add_column(name, justify="left", no_wrap=True)
    for name in ("steps", "experts", "tokens/expert", "imbalance p50", "p99", "max", "dropped"):
        table.add_column(name, justify="right", no_wrap=True)
    for name in ("low-imb. p50 µs", "high-imb. p50 µs", "high/low", "Spearman rho"):
        table.add_column(name, justify="right", no_wrap=True)
    for row in rows:
        trend = row.latency_vs_imbalance
        trend_cells = ["-"] * 4
        if trend is not None:
            rho = "-" if trend.spearman is None else f"{trend.spearman:+.2f}"
            trend_cells = [us(trend.low_p50_us), us(trend.high_p50_us), ratio(trend.ratio), rho]
        table.add_row(
            f"L{row.layer}",
            Text(row.phase or "-"),
            f"{row.steps:,}",
            str(row.num_experts),
            f"{row.mean_tokens_per_expert:.2f}",
            f"{row.p50:.2f}",
            f"{row.p99:.2f}",
            f"{row.max:.2f}",
            f"{row.dropped:,}",
            *trend_cells,
        )
    return table


def rank_part_tables(report: RankReport) -> list[Table]:
    """Per phase (the run's phases, not their union): each part of the expert-parallel MoE blocks per rank."""
    tables = []
    for phase in dict.fromkeys(r.phase for r in report.parts if r.phase != analysis.ALL_PHASES):
        table = _table(f"phase {phase}: MoE block parts per rank")
        table.add_column("part", no_wrap=True)
        table.add_column("rank", justify="right", no_wrap=True)
        for name in ("calls", "p50 µs", "p99 µs", "tail ratio p99/p50", "tokens"):
            table.add_column(name, justify="right", no_wrap=True)
        rows = [r for r in report.parts if r.phase == phase]
        for row, following in zip(rows, [*rows[1:], None], strict=True):
            cells = (str(row.rank), f"{row.calls:,}", us(row.p50_us), us(row.p99_us), ratio(row.tail_ratio))
            table.add_row(Text(row.layer_type), *cells, f"{row.tokens:,}")
            if following is not None and following.layer_type != row.layer_type:
                table.add_section()
        tables.append(table)
    return tables


RANK_NOTES = (
    "MoE block parts: {ranks}; the other layer types are pooled over the ranks above. tokens = (token, "
    "expert) pairs routed (router), sent (dispatch; combine brings the same rows back), computed (experts).",
    "load = pairs a rank's experts computed / the mean over ranks (1.0 = even); experts sit E / W contiguous per "
    "rank. The busiest rank sets the pace of every all-to-all.",
    "straggler: per MoE block call, the rank that entered the all-to-all last; each other rank waited last entry - "
    "own entry. hot experts: the straggler's, in the calls where it was last, tokens / mean tokens per expert of "
    "that layer. Ranks time-sharing cores also wait for the scheduler.",
)


def rank_tokens_table(report: RankReport) -> Table:
    table = _table("tokens per rank")
    for name in ("phase", "rank", "pairs sent", "pairs computed", "load"):
        table.add_column(name, justify="left" if name == "phase" else "right", no_wrap=True)
    for row in report.tokens:
        load = "-" if row.load is None else f"{row.load:.2f}"
        table.add_row(Text(row.phase), str(row.rank), f"{row.sent:,}", f"{row.received:,}", load)
    return table


def straggler_table(report: RankReport) -> Table:
    table = _table("stragglers: the rank the others waited for in each all-to-all")
    for name in ("collective", "phase"):
        table.add_column(name, no_wrap=True)
    for name in ("calls", "straggler", "last per rank", "wait p50 µs", "wait p99 µs", "wait max µs"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("hot experts on it (layer:expert load)", no_wrap=True)
    for row in report.stragglers:
        counts = " ".join(f"r{rank}:{n}" for rank, n in row.last_counts.items())
        hot = ", ".join(f"L{layer}:e{expert} {load:.1f}x" for layer, expert, load in row.hot_experts) or "-"
        table.add_row(
            Text(row.layer_type),
            Text(row.phase),
            f"{row.calls:,}",
            f"rank {row.rank} ({row.share:.0%})",
            counts,
            us(row.wait_p50_us),
            us(row.wait_p99_us),
            us(row.wait_max_us),
            Text(hot),
        )
    return table


def change_table(changes: Sequence[Change], title: str) -> Table:
    flagged = sum(c.is_regression for c in changes)
    table = _table(f"{title}: {flagged} regression{'s' * (flagged != 1)}")
    table.add_column("", no_wrap=True)
    table.add_column("layer type", no_wrap=True)
    table.add_column("phase", no_wrap=True)
    for name in ("calls base/cand", "p50 base", "p50 cand", "Δ p50", "p99 base", "p99 cand", "Δ p99"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    for c in changes:
        table.add_row(
            "!!" if c.is_regression else "",
            Text(c.layer_type),
            Text(c.phase),
            f"{c.calls_a:,}/{c.calls_b:,}",
            us(c.p50_a),
            us(c.p50_b),
            change(c.p50_change),
            us(c.p99_a),
            us(c.p99_b),
            change(c.p99_change),
            Text(f"REGRESSION: {c.reason}" if c.is_regression else c.reason),
            style="bold red" if c.is_regression else ("italic" if c.layer_type == ALL_LAYERS else None),
        )
    return table


def render_tables(
    rows: Sequence[DecompositionRow],
    imbalance: Sequence[ImbalanceRow] = (),
    changes: Sequence[Change] | None = None,
    *,
    run: RunSummary | None = None,
    rules: Sequence[RuleRow] = (),
    ranks: RankReport | None = None,
    comparison_title: str = "baseline vs candidate (µs)",
    color: bool = False,
    width: int = 200,
) -> str:
    """The decomposition (one table per phase, the aggregate row set apart), the attribution rules
    of imported events, the MoE imbalance table when there are MoE layers, an expert-parallel run's
    parts, tokens and stragglers per rank, and the change table of a comparison, as text. Flagged
    changes are marked `!!` and `REGRESSION` (and red with `color`).

    Names from the trace (layer types, kernel names, phases) are printed literally, never as markup."""
    buffer = io.StringIO()
    console = Console(
        file=buffer,
        width=width,
        force_terminal=color,
        color_system="standard" if color else None,
        highlight=False,
        emoji=False,
    )
    if run is not None:
        console.print(run_line(run, rows[0].source if rows else None), markup=False)
        if not rows:
            console.print(f"run {run.run_id} holds no events to decompose", markup=False)
    for table in decomposition_tables(rows):
        console.print(table)
    if rows:
        console.print(
            "share of wall time = time that layer type's calls cover / the phase's wall time (overlapping calls count "
            "once). The aggregate row pools every call of the phase: it hides the per-type tails above it.",
            markup=False,
        )
    if rules and not (len(rules) == 1 and rules[0].rule == analysis.RULE_RECORDED):
        console.print()
        console.print(rules_table(rules, rows[0].source if rows else "imported"))
    if imbalance:
        console.print()
        console.print(imbalance_table(imbalance))
    if ranks is not None:
        tables = [*rank_part_tables(ranks), rank_tokens_table(ranks)]
        tables += [straggler_table(ranks)] if ranks.stragglers else []
        for table in tables:
            console.print()
            console.print(table)
        notes = RANK_NOTES if ranks.stragglers else RANK_NOTES[:-1]
        for note in notes:
            console.print(note.format(ranks=f"{ranks.ranks} rank{'s' * (ranks.ranks != 1)}"), markup=False)
    if changes is not None:
        console.print()
        console.print(change_table(changes, comparison_title))
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines()) + "\n"
