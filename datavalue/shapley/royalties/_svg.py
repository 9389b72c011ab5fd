"""Tiny hand-written inline-SVG charts for self-contained HTML reports (no plotting library).

Three charts cover a royalty report: horizontal bars (owner shares), stacked columns (per-output
breakdown) and points with error bars (values with uncertainty). Every string that reaches the
SVG is escaped; the output is a single ``<svg>`` element with a ``<title>`` for accessibility.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

__all__ = ["PALETTE", "bar_chart", "error_bar_chart", "stacked_columns"]

PALETTE = (
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
    "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac",
)  # fmt: skip


def _fmt(x: float) -> str:
    return f"{x:.1f}"


def _open(width: int, height: int, title: str) -> list[str]:
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" font-family="sans-serif" font-size="12">',
        f"<title>{escape(title)}</title>",
        f'<text x="8" y="16" font-weight="bold">{escape(title)}</text>',
    ]


def bar_chart(
    labels: Sequence[str], values: Sequence[float], *, title: str, value_labels: Sequence[str]
) -> str:
    """Horizontal bars, one per label; ``value_labels`` are printed at the bar ends."""
    row, left, right, top = 22, 160, 120, 28
    width = 720
    height = top + row * max(len(labels), 1) + 10
    vmax = max([abs(v) for v in values] + [1e-300])
    span = width - left - right
    out = _open(width, height, title)
    for k, (label, v, text) in enumerate(zip(labels, values, value_labels, strict=True)):
        y = top + k * row
        w = span * max(v, 0.0) / vmax
        out.append(f'<text x="{left - 6}" y="{y + 14}" text-anchor="end">{escape(label)}</text>')
        out.append(
            f'<rect x="{left}" y="{y + 3}" width="{_fmt(w)}" height="{row - 6}" '
            f'fill="{PALETTE[k % len(PALETTE)]}"><title>{escape(label)}: {escape(text)}</title></rect>'
        )
        out.append(f'<text x="{_fmt(left + w + 6)}" y="{y + 14}">{escape(text)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def stacked_columns(
    categories: Sequence[str],
    series: Sequence[str],
    matrix: Sequence[Sequence[float]],
    *,
    title: str,
    unit: str = "",
) -> str:
    """One column per category, stacked by series (``matrix[category][series] >= 0``)."""
    left, top, bottom, legend_w = 56, 28, 40, 170
    plot_h = 220
    col = max(6, min(40, 560 // max(len(categories), 1)))
    width = left + col * len(categories) + legend_w + 20
    height = max(top + plot_h + bottom, top + 18 * len(series) + 10)
    totals = [sum(max(x, 0.0) for x in r) for r in matrix]
    vmax = max(totals + [1e-300])
    out = _open(width, height, title)
    base_y = top + plot_h
    out.append(
        f'<line x1="{left}" y1="{base_y}" x2="{left + col * len(categories)}" '
        f'y2="{base_y}" stroke="#333"/>'
    )
    out.append(
        f'<text x="{left - 4}" y="{top + 10}" text-anchor="end">{escape(_short(vmax))}{escape(unit)}</text>'
    )
    out.append(f'<text x="{left - 4}" y="{base_y}" text-anchor="end">0</text>')
    for c, (cat, r) in enumerate(zip(categories, matrix, strict=True)):
        x = left + c * col
        y = float(base_y)
        for s, value in enumerate(r):
            h = plot_h * max(value, 0.0) / vmax
            if h <= 0:
                continue
            y -= h
            out.append(
                f'<rect x="{x + 1}" y="{_fmt(y)}" width="{col - 2}" height="{_fmt(h)}" '
                f'fill="{PALETTE[s % len(PALETTE)]}"><title>{escape(cat)} / '
                f"{escape(series[s])}: {escape(_short(value))}{escape(unit)}</title></rect>"
            )
        if len(categories) <= 30:
            out.append(
                f'<text x="{x + col / 2:.1f}" y="{base_y + 14}" text-anchor="middle" '
                f'font-size="9">{escape(cat[:6])}</text>'
            )
    lx = left + col * len(categories) + 20
    for s, name in enumerate(series):
        y = top + 18 * s
        out.append(
            f'<rect x="{lx}" y="{y}" width="12" height="12" fill="{PALETTE[s % len(PALETTE)]}"/>'
        )
        out.append(f'<text x="{lx + 18}" y="{y + 11}">{escape(name[:22])}</text>')
    out.append("</svg>")
    return "\n".join(out)


def error_bar_chart(
    labels: Sequence[str], values: Sequence[float], errors: Sequence[float], *, title: str
) -> str:
    """A point per label with a ``value -/+ error`` whisker and a zero line."""
    row, left, right, top = 22, 160, 40, 28
    width = 720
    height = top + row * max(len(labels), 1) + 24
    finite_err = [e if math.isfinite(e) else 0.0 for e in errors]
    lo = min([v - e for v, e in zip(values, finite_err, strict=True)] + [0.0])
    hi = max([v + e for v, e in zip(values, finite_err, strict=True)] + [0.0])
    if hi - lo <= 0:
        hi, lo = lo + 1.0, lo - 1.0
    span = width - left - right
    sx = lambda x: left + span * (x - lo) / (hi - lo)  # noqa: E731
    out = _open(width, height, title)
    zx = sx(0.0)
    out.append(
        f'<line x1="{_fmt(zx)}" y1="{top}" x2="{_fmt(zx)}" y2="{height - 20}" '
        'stroke="#999" stroke-dasharray="4 3"/>'
    )
    out.append(f'<text x="{_fmt(zx)}" y="{height - 6}" text-anchor="middle">0</text>')
    for k, (label, v, e) in enumerate(zip(labels, values, errors, strict=True)):
        y = top + k * row + row / 2
        color = PALETTE[k % len(PALETTE)]
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{escape(label)}</text>')
        if math.isfinite(e) and e > 0:
            out.append(
                f'<line x1="{_fmt(sx(v - e))}" y1="{y:.1f}" x2="{_fmt(sx(v + e))}" y2="{y:.1f}" '
                f'stroke="{color}" stroke-width="2"/>'
            )
        out.append(
            f'<circle cx="{_fmt(sx(v))}" cy="{y:.1f}" r="4" fill="{color}"><title>'
            f"{escape(label)}: {_short(v)} \u00b1 {_short(e)}</title></circle>"
        )
    out.append("</svg>")
    return "\n".join(out)


def _short(x: float) -> str:
    if not math.isfinite(x):
        return "n/a"
    return f"{x:.4g}"
