"""Plain-text tables for the terminal (runs, tune leaderboards): one cell formatter, one
column aligner."""
from __future__ import annotations


def fmt(v) -> str:
    """A table cell: "-" for missing, 4 significant digits, thousands separators."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def render(header: list[str], rows: list[list]) -> str:
    """Left-aligned columns, two spaces apart; cells already formatted (see fmt)."""
    rows = [[str(x) for x in row] for row in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths))
                     for line in [header, *rows])
