"""Charts for the self-contained HTML report, drawn with matplotlib and inlined as SVG (the page
needs no file or network beside it). One colour per precision (FP32, INT8, unpruned) in every
chart; latency and throughput axes are logarithmic, since models span orders of magnitude."""

from __future__ import annotations

import io
import textwrap
import zlib
from html import escape

PALETTE = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#eeca3b", "#9d755d")
# The same stage always gets the same colour, in every chart of a report.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")  # one per model: colour says the stage
STAGE_COLORS = {"fp32": "#4c78a8", "int8": "#f58518", "unpruned": "#54a24b"}


def color_for(label: str) -> str:
    """A stage's colour when the label names one (FP32, INT8, unpruned), else one fixed by the label."""
    words = label.lower().replace("/", " ").split()
    for stage, color in STAGE_COLORS.items():
        if stage in words:
            return color
    return PALETTE[3 + zlib.crc32(label.encode()) % (len(PALETTE) - 3)]


def line_colors(labels: list[str]) -> dict[str, str]:
    """color_for each label, except that labels naming no stage never share a colour within one
    chart (a hash can give "prompt 8" and "prompt 40" the same): those take the palette's free
    colours in order. Stage colours may repeat: the marker tells those lines' models apart."""
    colors = {label: color_for(label) for label in labels}
    free = PALETTE[3:]
    plain = [label for label in labels if colors[label] in free]
    if len({colors[label] for label in plain}) < len(plain):
        colors |= {label: free[i % len(free)] for i, label in enumerate(plain)}
    return colors


def _wrap(label: str, width: int = 34) -> str:
    return "\n".join(textwrap.wrap(label, width, break_long_words=False, break_on_hyphens=False)) or label


def _figure(rows: int = 0, height: float | None = None):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        from edgepipe.errors import InputError

        raise InputError("report charts need matplotlib: pip install 'edgepipe[pipeline]'") from None

    return Figure(figsize=(8.0, height or max(2.4, 0.42 * rows + 1.2)), layout="constrained")


def _svg(fig, title: str) -> str:
    import matplotlib

    matplotlib.rcParams["svg.fonttype"] = "none"  # text stays text: searchable, small
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight")
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg"):]  # drop the XML prologue: the SVG sits inside HTML
    return f"<figure><figcaption>{escape(title)}</figcaption>{svg}</figure>"


def hbars(title: str, rows: list[tuple[str, float]], unit: str) -> str:
    """Horizontal bars: one per (label, value), largest first, full labels."""
    if not rows:
        return ""
    fig = _figure(len(rows))
    ax = fig.add_subplot()
    labels = [_wrap(label) for label, _ in rows][::-1]
    values = [value for _, value in rows][::-1]
    # one colour per model ("cnn: Conv" -> cnn), so a model's operators read as a group
    bars = ax.barh(labels, values, color=[color_for(label.split(":")[0]) for label, _ in rows][::-1])
    ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], padding=3, fontsize=8)
    ax.set_xlabel(unit)
    ax.margins(x=0.15)
    return _svg(fig, title)


def ranges(title: str, rows: list[tuple[str, dict]], unit: str = "ms") -> str:
    """Latency distribution per row: a line min..max, a box p50..p90, a tick at p99 (log axis)."""
    if not rows:
        return ""
    fig = _figure(len(rows))
    ax = fig.add_subplot()
    for i, (label, s) in enumerate(rows[::-1]):
        color = color_for(label)
        ax.hlines(i, s["min_ms"], s["max_ms"], color="#999", linewidth=1)
        ax.barh(i, max(s["p90_ms"] - s["p50_ms"], s["p50_ms"] * 0.02), left=s["p50_ms"], height=0.5, color=color)
        ax.vlines(s["p99_ms"], i - 0.3, i + 0.3, color="#000", linewidth=1)
        ax.annotate(f"p50 {s['p50_ms']:.3g}", (s["max_ms"], i), xytext=(4, -3), textcoords="offset points",
                    fontsize=8)
    ax.set_yticks(range(len(rows)), [_wrap(label) for label, _ in rows[::-1]])
    ax.set_xscale("log")
    ax.set_xlabel(f"{unit} per call (log): line min..max, box p50..p90, tick p99")
    ax.margins(x=0.12)
    return _svg(fig, title)


def scatter(title: str, points: list[tuple[str, float, float]], x_label: str, y_label: str) -> str:
    """Labelled points (label, x, y); x on a log scale (latencies span orders of magnitude)."""
    points = [p for p in points if p[1] > 0]
    if not points:
        return ""
    fig = _figure(height=4.2)
    ax = fig.add_subplot()
    for label, x, y in points:
        ax.scatter([x], [y], color=color_for(label), s=36, zorder=3)
        ax.annotate(label, (x, y), xytext=(5, 4), textcoords="offset points", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(f"{x_label} (log)")
    ax.set_ylabel(y_label)
    ax.grid(True, which="both", alpha=0.3)
    ax.margins(x=0.2, y=0.15)
    return _svg(fig, title)


def lines(title: str, series: dict[str, list[tuple[float, float]]], x_label: str, y_label: str) -> str:
    """One line per series over numeric x (e.g. throughput vs batch), both axes logarithmic."""
    series = {name: pts for name, pts in series.items() if pts}
    if not series:
        return ""
    fig = _figure(height=4.2)
    ax = fig.add_subplot()
    models = list(dict.fromkeys(name.split()[0] for name in series))  # "mlp int8" -> model "mlp"
    colors = line_colors(list(series))
    for name, pts in series.items():
        xs, ys = zip(*sorted(pts))
        ax.plot(xs, ys, marker=MARKERS[models.index(name.split()[0]) % len(MARKERS)], color=colors[name],
                label=name, linestyle="--" if "unpruned" in name.lower() else "-")
    ax.set_xscale("log", base=2)
    ticks = sorted({x for pts in series.values() for x, _ in pts})
    ax.set_xticks(ticks, [f"{x:g}" for x in ticks])  # the batch sizes measured, not powers of 2
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_xlabel(f"{x_label} (log)")
    ax.set_ylabel(f"{y_label} (log)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _svg(fig, title)
