"""Tiny inline-SVG charts for self-contained HTML reports (no plotting dependency)."""

from __future__ import annotations

from html import escape

PALETTE = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#eeca3b", "#9d755d")
WIDTH = 640


def _frame(height: int, title: str, body: str) -> str:
    return (f'<figure><figcaption>{escape(title)}</figcaption>'
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
            f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="11">{body}</svg></figure>')


def hbars(title: str, rows: list[tuple[str, float]], unit: str) -> str:
    """Horizontal bars: one per (label, value)."""
    if not rows:
        return ""
    top = max(v for _, v in rows) or 1.0
    left, bar_h = 190, 18
    body = []
    for i, (label, value) in enumerate(rows):
        y = 8 + i * (bar_h + 6)
        w = (WIDTH - left - 90) * value / top
        body.append(f'<text x="{left - 6}" y="{y + 13}" text-anchor="end">{escape(label[:30])}</text>'
                    f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{PALETTE[0]}"/>'
                    f'<text x="{left + w + 4:.1f}" y="{y + 13}">{value:.3g} {escape(unit)}</text>')
    return _frame(16 + len(rows) * (bar_h + 6), title, "".join(body))


def ranges(title: str, rows: list[tuple[str, dict]], unit: str = "ms") -> str:
    """Latency distribution per row: a line min..max, a box p50..p90, a tick at p99."""
    if not rows:
        return ""
    top = max(s["max_ms"] for _, s in rows) or 1.0
    left, row_h = 190, 24
    scale = (WIDTH - left - 70) / top
    body = []
    for i, (label, s) in enumerate(rows):
        y = 10 + i * row_h
        x = {k: left + s[k] * scale for k in ("min_ms", "p50_ms", "p90_ms", "p99_ms", "max_ms")}
        color = PALETTE[i % len(PALETTE)]
        body.append(
            f'<text x="{left - 6}" y="{y + 12}" text-anchor="end">{escape(label[:30])}</text>'
            f'<line x1="{x["min_ms"]:.1f}" x2="{x["max_ms"]:.1f}" y1="{y + 8}" y2="{y + 8}" stroke="#999"/>'
            f'<rect x="{x["p50_ms"]:.1f}" y="{y + 2}" width="{max(1.5, x["p90_ms"] - x["p50_ms"]):.1f}" '
            f'height="12" fill="{color}"/>'
            f'<line x1="{x["p99_ms"]:.1f}" x2="{x["p99_ms"]:.1f}" y1="{y}" y2="{y + 16}" stroke="#000"/>'
            f'<text x="{x["max_ms"] + 4:.1f}" y="{y + 12}">p50 {s["p50_ms"]:.3g} {unit}</text>')
    legend = (f'<text x="{left}" y="{14 + len(rows) * row_h}" fill="#555">line: min..max, box: p50..p90, '
              f'tick: p99 ({escape(unit)})</text>')
    return _frame(22 + len(rows) * row_h, title, "".join(body) + legend)


def scatter(title: str, points: list[tuple[str, float, float]], x_label: str, y_label: str) -> str:
    """Labelled points (label, x, y); x on a log scale (latencies span orders of magnitude)."""
    import math

    points = [p for p in points if p[1] > 0]
    if not points:
        return ""
    height, pad = 320, 50
    xs, ys = [p[1] for p in points], [p[2] for p in points]
    x0, x1 = min(xs) / 1.5, max(xs) * 1.5
    y0, y1 = min(ys) - 0.02, max(ys) + 0.01
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 0.01, y1 + 0.01

    def px(x):
        return pad + (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0)) * (WIDTH - 2 * pad - 80)

    def py(y):
        return height - pad - (y - y0) / (y1 - y0) * (height - 2 * pad)

    body = [f'<line x1="{pad}" y1="{height - pad}" x2="{WIDTH - pad}" y2="{height - pad}" stroke="#333"/>',
            f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#333"/>',
            f'<text x="{WIDTH / 2}" y="{height - 12}" text-anchor="middle">{escape(x_label)}</text>',
            f'<text x="14" y="{height / 2}" transform="rotate(-90 14 {height / 2})" text-anchor="middle">'
            f'{escape(y_label)}</text>',
            f'<text x="{pad - 4}" y="{py(y1) + 4:.1f}" text-anchor="end">{y1:.3f}</text>',
            f'<text x="{pad - 4}" y="{py(y0) + 4:.1f}" text-anchor="end">{y0:.3f}</text>',
            f'<text x="{px(x0):.1f}" y="{height - pad + 14}">{x0:.3g} (log)</text>',
            f'<text x="{px(x1):.1f}" y="{height - pad + 14}" text-anchor="end">{x1:.3g}</text>']
    placed: list[tuple[float, float]] = []
    for i, (label, x, y) in enumerate(sorted(points, key=lambda p: (p[1], p[2]))):
        color = PALETTE[i % len(PALETTE)]
        lx, ly = px(x) + 7, py(y) - 6
        while any(abs(ly - oy) < 12 and abs(lx - ox) < 90 for ox, oy in placed):
            ly += 12  # keep labels of nearby points apart
        placed.append((lx, ly))
        body.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="5" fill="{color}"/>'
                    f'<text x="{lx:.1f}" y="{ly:.1f}" fill="{color}">{escape(label)}</text>')
    return _frame(height, title, "".join(body))


def lines(title: str, series: dict[str, list[tuple[float, float]]], x_label: str, y_label: str) -> str:
    """One polyline per series over shared numeric x (e.g. throughput vs batch)."""
    series = {k: v for k, v in series.items() if v}
    if not series:
        return ""
    height, pad = 280, 50
    xs = sorted({x for pts in series.values() for x, _ in pts})
    y1 = max(y for pts in series.values() for _, y in pts) * 1.1 or 1.0

    def px(x):
        return pad + (xs.index(x) / max(1, len(xs) - 1)) * (WIDTH - 2 * pad - 120)

    def py(y):
        return height - pad - y / y1 * (height - 2 * pad)

    body = [f'<line x1="{pad}" y1="{height - pad}" x2="{WIDTH - pad - 120}" y2="{height - pad}" stroke="#333"/>',
            f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#333"/>',
            f'<text x="{(WIDTH - 120) / 2}" y="{height - 12}" text-anchor="middle">{escape(x_label)}</text>',
            f'<text x="14" y="{height / 2}" transform="rotate(-90 14 {height / 2})" text-anchor="middle">'
            f'{escape(y_label)}</text>',
            f'<text x="{pad - 4}" y="{py(y1) + 4:.1f}" text-anchor="end">{y1:.3g}</text>']
    body += [f'<text x="{px(x):.1f}" y="{height - pad + 14}" text-anchor="middle">{x:g}</text>' for x in xs]
    for i, (name, pts) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in sorted(pts))
        body.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        body += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}"/>' for x, y in pts]
        body.append(f'<text x="{WIDTH - pad - 110}" y="{pad + 14 * i}" fill="{color}">{escape(name[:22])}</text>')
    return _frame(height, title, "".join(body))
