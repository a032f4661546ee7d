"""``inkpipe info``: what a store holds, as a table."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .store import open_fragments
from .text import format_table
from .windows import INK_PX


@dataclass(frozen=True)
class FragmentSummary:
    """One row of ``inkpipe info``."""

    id: str
    split: str
    group: str | None
    layers: int
    height_px: int
    width_px: int
    positive_windows: int
    negative_windows: int
    stored_bytes: int
    volume_bytes: int
    volume_stored_bytes: int

    @property
    def compression_ratio(self) -> float:
        """Raw volume bytes / volume bytes on disk."""
        return self.volume_bytes / max(self.volume_stored_bytes, 1)


def summarize_store(path: Path) -> list[FragmentSummary]:
    """Summarise every complete fragment of a store."""
    rows = []
    for frag in open_fragments(path):
        w = frag.windows()
        pos = int((w[:, INK_PX] > 0).sum()) if len(w) else 0
        z, h, wd = frag.meta.shape
        rows.append(
            FragmentSummary(
                id=frag.id,
                split=frag.meta.split,
                group=frag.meta.group,
                layers=z,
                height_px=h,
                width_px=wd,
                positive_windows=pos,
                negative_windows=len(w) - pos,
                stored_bytes=frag.nbytes_stored(),
                volume_bytes=z * h * wd * 2,
                volume_stored_bytes=frag.volume_nbytes_stored(),
            )
        )
    return rows


def format_summaries(rows: list[FragmentSummary]) -> str:
    """Render summaries as an aligned text table with a total line."""
    header = (
        "fragment",
        "split",
        "group",
        "layers",
        "H x W",
        "pos win",
        "neg win",
        "on disk",
        "ratio",
    )
    body = [
        (
            r.id,
            r.split,
            r.group or "-",
            str(r.layers),
            f"{r.height_px} x {r.width_px}",
            str(r.positive_windows),
            str(r.negative_windows),
            _human(r.stored_bytes),
            f"{r.compression_ratio:.2f}",
        )
        for r in rows
    ]
    if rows:
        raw = sum(r.volume_bytes for r in rows)
        stored = sum(r.volume_stored_bytes for r in rows)
        body.append(
            (
                "total",
                "",
                "",
                "",
                "",
                str(sum(r.positive_windows for r in rows)),
                str(sum(r.negative_windows for r in rows)),
                _human(sum(r.stored_bytes for r in rows)),
                f"{raw / max(stored, 1):.2f}",
            )
        )
    return format_table(header, body, align="l" * len(header))


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1000
    return f"{n} B"
