"""Plain-text tables for the terminal."""

from __future__ import annotations

from collections.abc import Sequence


def format_table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    align: str = "",
    footer: Sequence[Sequence[str]] = (),
) -> str:
    """Render cells as an aligned text table.

    The header, a rule of dashes, the rows, then (after a second rule) the footer rows, e.g.
    a mean. Columns are two spaces apart and as wide as their widest cell; lines carry no
    trailing spaces.

    Args:
        header: one title per column.
        rows: the body, each with one cell per column.
        align: one letter per column, ``l`` (left) or ``r`` (right); ``""`` aligns the first
            column left and the others right (a label, then numbers).
        footer: rows set apart below a second rule; none by default.

    Returns:
        The table, lines joined by newlines (no final newline).
    """
    align = align or "l" + "r" * (len(header) - 1)
    table = [header, *rows, *footer]
    widths = [max(len(row[c]) for row in table) for c in range(len(header))]
    rule = "  ".join("-" * w for w in widths)

    def line(row: Sequence[str]) -> str:
        cells = zip(row, widths, align, strict=True)
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in cells).rstrip()

    lines = [line(header), rule, *(line(r) for r in rows)]
    if footer:
        lines += [rule, *(line(r) for r in footer)]
    return "\n".join(lines)
