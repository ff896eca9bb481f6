"""The overview's charts as SVG made on the server with pygal, with no script in them."""

from __future__ import annotations

import re
import sys
from datetime import date

import pygal
from pygal.style import Style

# pygal installs an import hook for its map plugins that lacks find_spec, so every failed
# import anywhere in the process then warns (an error under -W error, which breaks optional
# imports in other libraries); these charts use no plugin
sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, pygal.PluginImportFixer)]

# pygal always embeds its tooltip configuration as a script; the charts work without it
_SCRIPT = re.compile(r"<script\b.*?</script>", re.DOTALL)
STYLE = Style(
    background="#ffffff",
    plot_background="#ffffff",
    foreground="#1f2937",
    foreground_strong="#111827",
    foreground_subtle="#6b7280",
    font_family="system-ui, sans-serif",
    colors=("#1d4ed8", "#b91c1c", "#047857", "#7c3aed", "#b45309", "#0e7490", "#be185d", "#4b5563"),
)
_OPTIONS = {"style": STYLE, "js": [], "disable_xml_declaration": True, "width": 900, "height": 360}


def _svg(chart: pygal.graph.graph.Graph) -> str:
    return _SCRIPT.sub("", chart.render(is_unicode=True))


def opt_outs_chart(days: list[date], series: dict[str, list[int]]) -> str:
    """Draw opt-outs per day, one line per topic."""
    chart = pygal.Line(
        **_OPTIONS,
        title="Opt-outs per day",
        show_dots=False,
        show_minor_x_labels=False,
        x_labels_major_every=14,
        truncate_label=-1,
        stroke_style={"width": 2},
        legend_at_bottom=True,
        include_x_axis=True,
        no_data_text="No opt-outs in this period",
    )
    chart.x_labels = [d.isoformat() for d in days]
    for name, values in series.items():
        chart.add(name, values)
    return _svg(chart)


def sources_chart(shares: dict[str, int]) -> str:
    """Draw each source's share of the opt-outs."""
    chart = pygal.Pie(
        **_OPTIONS,
        title="Opt-outs by source",
        inner_radius=0.45,
        legend_at_bottom=True,
        no_data_text="No opt-outs in this period",
    )
    for source, number in shares.items():
        chart.add(source, number)
    return _svg(chart)
