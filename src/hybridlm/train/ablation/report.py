"""An ablation's results: per-variant summaries (mean and spread over seeds), a markdown table, a PNG.

The summary reads only the per-run records, so anyone can recompute it from the JSON: per variant
and task, the best learning rate of the seed-0 sweep (``runner.selection_key``), then over the runs at
that rate (seed 0's and the other seeds'): MQAR steps and tokens to the target recall over the seeds
that reached it, and final recall over all seeds; text perplexity over all seeds. Spread is the sample
standard deviation (n - 1), with min and max beside it in the JSON.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, BinaryIO

from hybridlm.train.ablation.runner import selection_key


def spread(values: list[float]) -> dict[str, float | int | None]:
    """n, mean, sample std (None below two values), min, max; all None but n when empty."""
    if not values:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"n": len(values), "mean": statistics.fmean(values), "std": std, "min": min(values), "max": max(values)}


def best_lr(runs: list[dict[str, Any]], variant: str, task: str) -> float:
    sweep = [r for r in runs if r["variant"] == variant and r["task"] == task and r["phase"] == "lr sweep"]
    return min(sweep, key=selection_key)["lr"]


def summarize(runs: list[dict[str, Any]], variants: list[str], tasks: list[str]) -> list[dict[str, Any]]:
    """One row per variant: its pattern and size per task, and the numbers described above."""
    rows = []
    for variant in variants:
        row: dict[str, Any] = {"variant": variant}
        for task in tasks:
            lr = best_lr(runs, variant, task)
            chosen = [r for r in runs if r["variant"] == variant and r["task"] == task and r["lr"] == lr]
            chosen = [r for r in chosen if r["phase"] == "seeds" or r["seed"] == 0]
            row["pattern"] = chosen[0]["pattern"]
            row[task] = {"lr": lr, "num_params": chosen[0]["num_params"], "hidden_size": chosen[0]["hidden_size"]}
            row[task]["seeds"] = sorted(r["seed"] for r in chosen)
            if task == "mqar":
                reached = [r for r in chosen if r["steps_to_target"] is not None]
                row[task]["reached"] = len(reached)
                row[task]["steps_to_target"] = spread([r["steps_to_target"] for r in reached])
                row[task]["tokens_to_target"] = spread([r["tokens_to_target"] for r in reached])
                row[task]["final_recall"] = spread([r["final_recall"] for r in chosen])
            else:
                row[task]["perplexity"] = spread([r["perplexity"] for r in chosen])
        rows.append(row)
    return rows


def _mean_std(stats: dict[str, Any], digits: int, scale: float = 1.0, suffix: str = "") -> str:
    if stats["mean"] is None:
        return "—"
    mean = f"{stats['mean'] / scale:.{digits}f}{suffix}"
    return mean if stats["std"] is None else f"{mean} ± {stats['std'] / scale:.{digits}f}{suffix}"


def markdown_table(rows: list[dict[str, Any]], tasks: list[str], target: float, num_seeds: int) -> str:
    header = ["variant", "pattern"]
    if "mqar" in tasks:
        header += ["params (MQAR)", "best lr", f"reached {target:.0%}", f"steps to {target:.0%}",
                   f"tokens to {target:.0%}", "final recall"]  # fmt: skip
    if "text" in tasks:
        header += ["params (text)", "best lr", "held-out perplexity"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["variant"], f"`{row['pattern']}`"]
        if "mqar" in tasks:
            m = row["mqar"]
            cells += [
                f"{m['num_params']:,} (w {m['hidden_size']})",
                f"{m['lr']:g}",
                f"{m['reached']}/{len(m['seeds'])}",
                _mean_std(m["steps_to_target"], 0),
                _mean_std(m["tokens_to_target"], 0, scale=1000, suffix="k"),
                _mean_std(m["final_recall"], 3),
            ]
        if "text" in tasks:
            t = row["text"]
            cells += [f"{t['num_params']:,} (w {t['hidden_size']})", f"{t['lr']:g}", _mean_std(t["perplexity"], 3)]
        lines.append("| " + " | ".join(cells) + " |")
    note = (
        f"Mean ± sample std over {num_seeds} seed(s) at each variant's best learning rate; steps and tokens to "
        f"{target:.0%} over the seeds that reached it; final recall where the run stopped (at {target:.0%} or "
        "at the step budget)."
    )
    return "\n".join(lines) + "\n\n" + note + "\n"


def plot(
    rows: list[dict[str, Any]], tasks: list[str], target: float, max_steps: int, title: str, path: Path | BinaryIO
) -> None:
    """Bars with seed spread: steps to the target (axis up to the ``max_steps`` budget) and final recall
    (MQAR), perplexity (text)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    if "mqar" in tasks:
        panels += [("mqar", "steps_to_target", f"MQAR steps to {target:.0%} recall"),
                   ("mqar", "final_recall", "MQAR final recall")]  # fmt: skip
    if "text" in tasks:
        panels.append(("text", "perplexity", "held-out perplexity (text)"))
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    labels = [row["variant"] for row in rows]
    for axis, (task, metric, label) in zip(axes[0], panels, strict=True):
        stats = [row[task][metric] for row in rows]
        means = [s["mean"] if s["mean"] is not None else 0.0 for s in stats]
        errors = [s["std"] or 0.0 for s in stats]
        axis.bar(range(len(rows)), means, yerr=errors, capsize=3, color="#4c72b0")
        for index, s in enumerate(stats):
            if s["mean"] is None:
                axis.text(index, 0, "not\nreached", ha="center", va="bottom", fontsize=7)
        if metric == "steps_to_target":
            axis.set_ylim(0, max_steps)
        axis.set_xticks(range(len(rows)), labels, rotation=35, ha="right", fontsize=8)
        axis.set_title(label, fontsize=9)
        if metric == "perplexity" and all(m > 0 for m in means):
            low = min(m - e for m, e in zip(means, errors, strict=True))
            axis.set_ylim(bottom=max(0.0, math.floor(low * 0.95)))
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110, format="png")
    plt.close(figure)
