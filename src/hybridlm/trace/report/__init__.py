"""Reports of a trace database, one module per output:

| module | output |
|---|---|
| `tables` | rich text tables: decomposition per phase, attribution rules, MoE imbalance, comparison |
| `json_doc` | the same data as one JSON document |
| `plot` | a figure (PNG / PDF / SVG): latency distributions per layer type and a step's timeline |
| `perfetto` | a Chrome / Perfetto trace JSON |
| `main` | `hybridlm report` (`report_main`, the CI gate) and `print_profile_summary` |
"""

from hybridlm.trace.report.json_doc import to_json
from hybridlm.trace.report.main import print_profile_summary, report_main
from hybridlm.trace.report.perfetto import perfetto_events, write_perfetto
from hybridlm.trace.report.plot import LAYER_COLORS, build_figure, layer_color, write_plot
from hybridlm.trace.report.tables import render_tables

__all__ = [
    "LAYER_COLORS",
    "build_figure",
    "layer_color",
    "perfetto_events",
    "print_profile_summary",
    "render_tables",
    "report_main",
    "to_json",
    "write_perfetto",
    "write_plot",
]
