"""Server-rendered SVG charts for the dashboard: readable without JavaScript, no library.

Every number is escaped text inside the SVG (a ``<title>`` per bar or cell for the exact figure,
and the chart's summary in ``aria-label``); colours pass WCAG AA against white.
"""

from __future__ import annotations

from datetime import date

from markupsafe import Markup, escape

OPEN, CLICK = "#2457c5", "#0b7a4b"
WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


def daily_bars(days: list[tuple[date, int, int]]) -> Markup:
    """Human opens and clicks per day: two bars a day, a label every seventh day."""
    w, h, pad_l, pad_b, pad_t = 720, 200, 34, 24, 10
    top = max([o for _, o, _ in days] + [c for _, _, c in days] + [1])
    slot = (w - pad_l) / max(len(days), 1)
    bar = max(slot / 2 - 1, 1)
    inner = h - pad_b - pad_t
    total_o = sum(o for _, o, _ in days)
    total_c = sum(c for _, _, c in days)
    label = f"Human opens ({total_o}) and clicks ({total_c}) per day, last {len(days)} days"
    parts = [f'<svg class="chart" viewBox="0 0 {w} {h}" role="img" aria-label="{escape(label)}" '
             f'xmlns="http://www.w3.org/2000/svg">']
    for frac in ((0, 0.5, 1) if top >= 2 and top % 2 == 0 else (0, 1)):
        y = pad_t + inner * (1 - frac)
        parts.append(f'<line x1="{pad_l}" x2="{w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e4e7ec"/>'
                     f'<text x="{pad_l - 4}" y="{y + 4:.1f}" text-anchor="end" font-size="11" fill="#4b5563">'
                     f'{round(top * frac)}</text>')
    for i, (d, o, c) in enumerate(days):
        x = pad_l + i * slot
        for j, (n, colour, what) in enumerate(((o, OPEN, "opens"), (c, CLICK, "clicks"))):
            bh = inner * n / top
            parts.append(f'<rect x="{x + j * bar:.1f}" y="{pad_t + inner - bh:.1f}" width="{bar:.1f}" '
                         f'height="{bh:.1f}" fill="{colour}"><title>{d.isoformat()}: {n} {what}</title></rect>')
        if i % 7 == (len(days) - 1) % 7:
            parts.append(f'<text x="{x + bar:.1f}" y="{h - 6}" text-anchor="middle" font-size="11" fill="#4b5563">'
                         f'{d.strftime("%b %d")}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def week_heatmap(week: list[list[int]]) -> Markup:
    """Human opens and clicks by weekday and hour (the user's time zone): darker is more."""
    cell, pad_l, pad_t = 26, 40, 18
    w, h = pad_l + 24 * cell, pad_t + 7 * cell
    top = max([n for row in week for n in row] + [1])
    total = sum(n for row in week for n in row)
    parts = [f'<svg class="chart" viewBox="0 0 {w} {h}" role="img" '
             f'aria-label="Human opens and clicks by weekday and hour ({total} in all)" '
             f'xmlns="http://www.w3.org/2000/svg">']
    for hour in range(0, 24, 3):
        parts.append(f'<text x="{pad_l + hour * cell + cell / 2}" y="12" text-anchor="middle" font-size="11" '
                     f'fill="#4b5563">{hour:02d}</text>')
    for d, row in enumerate(week):
        y = pad_t + d * cell
        parts.append(f'<text x="{pad_l - 6}" y="{y + cell / 2 + 4}" text-anchor="end" font-size="11" '
                     f'fill="#4b5563">{WEEKDAYS[d]}</text>')
        for hour, n in enumerate(row):
            alpha = 0.06 + 0.94 * n / top if n else 0.04
            parts.append(f'<rect x="{pad_l + hour * cell + 1}" y="{y + 1}" width="{cell - 2}" height="{cell - 2}" '
                         f'rx="3" fill="{OPEN}" fill-opacity="{alpha:.2f}"><title>{WEEKDAYS[d]} {hour:02d}:00: '
                         f'{n}</title></rect>')
    parts.append("</svg>")
    return Markup("".join(parts))
