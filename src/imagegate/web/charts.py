"""Charts as inline SVG, drawn on the server: no script, nothing to load, readable in both
themes.

Every function is pure: data in, `Markup` out. Colours come from CSS classes (static/
charts.css) and `currentColor`, never from attributes, so the page's theme decides them and
the CSP's `style-src 'self'` holds. Each chart is an image to assistive technology
(`role="img"` with a `<title>` and a `<desc>` that says what it shows); each point and bar
carries its own `<title>`, the tooltip a pointer gets. Every caller-given string goes
through `_text` (markupsafe's escape) before it joins the markup; the SVG is assembled with
f-strings because `Markup.format` cost about 1 ms per 100 elements, a third of the
dashboard's time (bench/console.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from markupsafe import Markup, escape

WIDTH = 640
"""The viewBox's width; the SVG scales to its container (charts.css)."""
LINE_HEIGHT = 220
_LEFT, _RIGHT, _TOP, _BOTTOM = 52, 12, 40, 26
"""Margins of a line chart's plot: the title on the first line, the unit on its own below it."""
_X_LABELS = 6
"""At most this many labels under a line chart's x axis (every point has its tooltip)."""
_BAR_ROW, _BAR_LABEL, _BAR_LABEL_CHARS, _BAR_TOP = 24, 170, 24, 30


def line_chart(
    points: Sequence[tuple[str, float | None]], *, title: str, unit: str, empty: str = ""
) -> Markup:
    """One line over labelled points (None: no value there, the line breaks); `empty` is
    shown across the plot when no point has a value (pass it through the catalog)."""
    return lines_chart(
        [label for label, _ in points],
        [(title, [value for _, value in points])],
        title=title,
        unit=unit,
        empty=empty,
    )


def lines_chart(
    labels: Sequence[str],
    series: Sequence[tuple[str, Sequence[float | None]]],
    *,
    title: str,
    unit: str,
    empty: str = "",
) -> Markup:
    """Several lines over the same labelled x positions (e.g. p50 and p95), with a legend;
    `series` is (name, one value or None per label)."""
    values = [v for _, line in series for v in line if v is not None]
    top = _nice_ceiling(max(values, default=0.0))
    plot_w = WIDTH - _LEFT - _RIGHT
    plot_h = LINE_HEIGHT - _TOP - _BOTTOM
    step = plot_w / max(len(labels) - 1, 1)

    def x(i: int) -> float:
        return _LEFT + (i * step if len(labels) > 1 else plot_w / 2)

    def y(value: float) -> float:
        return _TOP + plot_h - (value / top) * plot_h

    parts = [_legend([name for name, _ in series]) if len(series) > 1 else ""]
    parts += [_grid(top, unit, y), _x_axis(labels, x)]
    if not values:
        parts.append(_empty(empty, LINE_HEIGHT))
    for n, (name, line) in enumerate(series, start=1):
        parts.append(_line(n, name, line, labels, unit, x, y))
    desc = _describe_lines(labels, series, unit)
    return _svg("chart-line", title, desc, LINE_HEIGHT, "".join(parts))


def bar_chart(
    items: Sequence[tuple[str, float]],
    *,
    title: str,
    unit: str,
    empty: str = "",
    caption: str | None = None,
) -> Markup:
    """Horizontal bars, one per labelled value, in the order given (long labels are cut on
    the chart and whole in the tooltip and description). `caption` is the line shown above
    the bars, the title by default: a page whose heading already names the chart passes what
    the heading does not say (the unit), and the title stays the chart's accessible name."""
    top = _nice_ceiling(max((v for _, v in items), default=0.0))
    height = _BAR_TOP + max(len(items), 1) * _BAR_ROW + 4
    span = WIDTH - _LEFT - _RIGHT - _BAR_LABEL - 60
    parts = [] if items else [_empty(empty, height)]
    label_x, bar_x = _LEFT + _BAR_LABEL - 6, _LEFT + _BAR_LABEL
    for i, (label, value) in enumerate(items):
        row_y = _BAR_TOP + i * _BAR_ROW
        width = max(value, 0.0) / top * span
        cut = label if len(label) <= _BAR_LABEL_CHARS else label[: _BAR_LABEL_CHARS - 1] + "…"
        parts.append(
            f'<g class="chart-bar-row"><title>{_text(_said(label, value, unit))}</title>'
            f'<text class="chart-label" x="{label_x}" y="{row_y + 16}" text-anchor="end">'
            f"{_text(cut)}</text>"
            f'<rect class="chart-bar" x="{bar_x}" y="{row_y + 4}" width="{width:.1f}" '
            f'height="{_BAR_ROW - 8}" rx="2"/>'
            f'<text class="chart-value" x="{bar_x + width + 6:.1f}" y="{row_y + 16}">'
            f"{_text(_number(value))}</text></g>"
        )
    desc = "; ".join(_said(label, value, unit) for label, value in items)
    return _svg("chart-bars", title, desc, height, "".join(parts), caption=caption)


def _text(value: str) -> str:
    """`value` escaped for an SVG text node or a double-quoted attribute."""
    return str(escape(value))


def _svg(
    kind: str, title: str, desc: str, height: int, body: str, *, caption: str | None = None
) -> Markup:
    named = _text(title)
    shown = named if caption is None else _text(caption)
    svg = (
        f'<svg class="chart {kind}" viewBox="0 0 {WIDTH} {height}" role="img" '
        f'aria-label="{named}" xmlns="http://www.w3.org/2000/svg">'
        f"<title>{named}</title><desc>{_text(desc)}</desc>"
        f'<text class="chart-title" x="{_LEFT}" y="16">{shown}</text>{body}</svg>'
    )
    return Markup(svg)  # noqa: S704 -- every caller-given string in it went through _text


def _grid(top: float, unit: str, y: Callable[[float], float]) -> str:
    """Five horizontal lines from 0 to `top`, each with its value; the unit above them."""
    lines = []
    for i in range(5):
        value = top * i / 4
        at = y(value)
        lines.append(
            f'<line class="chart-gridline" x1="{_LEFT}" x2="{WIDTH - _RIGHT}" '
            f'y1="{at:.1f}" y2="{at:.1f}"/>'
            f'<text class="chart-axis" x="{_LEFT - 6}" y="{at + 4:.1f}" text-anchor="end">'
            f"{_number(value)}</text>"
        )
    if unit:
        lines.append(
            # Starts where the plot starts: a long unit ("requests") never runs off the left.
            f'<text class="chart-axis chart-unit" x="{_LEFT}" y="{_TOP - 12}">{_text(unit)}</text>'
        )
    return "".join(lines)


def _x_axis(labels: Sequence[str], x: Callable[[int], float]) -> str:
    every = max(1, math.ceil(len(labels) / _X_LABELS))
    return "".join(
        f'<text class="chart-axis" x="{x(i):.1f}" y="{LINE_HEIGHT - 8}" '
        f'text-anchor="middle">{_text(labels[i])}</text>'
        for i in range(0, len(labels), every)
    )


def _line(
    n: int,
    name: str,
    line: Sequence[float | None],
    labels: Sequence[str],
    unit: str,
    x: Callable[[int], float],
    y: Callable[[float], float],
) -> str:
    """A path through the values (broken where one is None) and a dot with a tooltip on each
    value (a lone value between gaps is visible only as its dot)."""
    path: list[str] = []
    dots: list[str] = []
    pen_down = False
    for i, value in enumerate(line):
        if value is None:
            pen_down = False
            continue
        at_x, at_y = x(i), y(value)
        path.append(f"{'L' if pen_down else 'M'}{at_x:.1f} {at_y:.1f}")
        pen_down = True
        tip = _said(f"{name} · {labels[i] if i < len(labels) else ''}", value, unit)
        dots.append(
            f'<circle class="chart-point" cx="{at_x:.1f}" cy="{at_y:.1f}" r="3">'
            f"<title>{_text(tip)}</title></circle>"
        )
    drawn = f'<path class="chart-stroke" d="{" ".join(path)}"/>' if path else ""
    return f'<g class="chart-series chart-series-{n}">{drawn}{"".join(dots)}</g>'


def _legend(names: Sequence[str]) -> str:
    items = []
    at = WIDTH - _RIGHT
    for n, name in reversed(list(enumerate(names, start=1))):
        at -= 18 + 7 * len(name)
        items.append(
            f'<g class="chart-series chart-series-{n}">'
            f'<rect class="chart-swatch" x="{at}" y="7" width="10" height="10" rx="2"/>'
            f'<text class="chart-legend" x="{at + 14}" y="16">{_text(name)}</text></g>'
        )
    return "".join(items)


def _empty(text: str, height: int) -> str:
    if not text:
        return ""
    return (
        f'<text class="chart-empty" x="{WIDTH // 2}" y="{height / 2 + 6:.0f}" '
        f'text-anchor="middle">{_text(text)}</text>'
    )


def _describe_lines(
    labels: Sequence[str], series: Sequence[tuple[str, Sequence[float | None]]], unit: str
) -> str:
    """What a sighted reader gets at a glance, in symbols rather than words (no catalog
    here): the span, and each line's highest value and where, e.g. "06:00 → 05:00; p95 ≤
    840 ms (13:00)"."""
    if not labels:
        return ""
    said = [f"{labels[0]} → {labels[-1]}"]
    for name, line in series:
        known = [(v, i) for i, v in enumerate(line) if v is not None]
        if known:
            value, i = max(known)
            said.append(f"{name} ≤ {_number(value)} {unit} ({labels[i]})".replace("  ", " "))
    return "; ".join(said)


def _said(label: str, value: float, unit: str) -> str:
    return f"{label}: {_number(value)} {unit}".rstrip() if unit else f"{label}: {_number(value)}"


def _nice_ceiling(value: float) -> float:
    """The smallest 1, 2, 2.5 or 5 times a power of ten at or above `value` (1 for nothing),
    so the grid's four steps fall on round numbers."""
    if value <= 0 or not math.isfinite(value):
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    return next(f * power for f in (1, 2, 2.5, 5, 10) if f * power >= value)


def _number(value: float) -> str:
    """Short and exact enough for an axis: 950, 12.5, 0.25, 3.75k, 1.2M."""
    size = abs(value)
    for bound, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if size >= bound:
            return f"{value / bound:.2f}".rstrip("0").rstrip(".") + suffix
    if value == int(value):
        return str(int(value))
    return f"{value:.1f}" if size >= 10 else f"{value:.2f}".rstrip("0").rstrip(".")
