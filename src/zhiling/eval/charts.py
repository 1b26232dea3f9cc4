"""Grouped bar charts as PNG bytes (matplotlib's Agg renderer, no display needed)."""

from __future__ import annotations

import io
import warnings
from typing import Sequence

_CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "Source Han Sans CN", "WenQuanYi Micro Hei",
              "WenQuanYi Zen Hei", "SimHei", "Microsoft YaHei", "PingFang SC", "Heiti SC", "AR PL UMing CN")


def _font_families() -> list[str]:
    """A CJK-capable font first when one is installed, so Chinese labels render; DejaVu Sans otherwise."""
    from matplotlib import font_manager

    installed = {font.name for font in font_manager.fontManager.ttflist}
    return [name for name in _CJK_FONTS if name in installed][:1] + ["DejaVu Sans"]


def grouped_bar_chart(groups: Sequence[str], series: dict[str, Sequence[float | None]], *, title: str,
                      ylabel: str, ymax: float | None = None) -> bytes:
    """One cluster of bars per group, one bar colour per series; missing values are left out."""
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend

    with matplotlib.rc_context({"font.family": _font_families(), "axes.unicode_minus": False}), \
            warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from")  # no CJK font installed
        width = max(6.0, min(18.0, 1.0 + 0.45 * len(groups) * max(1, len(series))))
        fig = Figure(figsize=(width, 4.2), dpi=100)
        ax = fig.subplots()
        count = max(1, len(series))
        bar = 0.8 / count
        for index, (name, values) in enumerate(series.items()):
            xs = [g + (index - (count - 1) / 2) * bar for g, v in enumerate(values) if v is not None]
            ys = [v for v in values if v is not None]
            bars = ax.bar(xs, ys, width=bar, label=name)
            ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, rotation=30 if len(groups) > 5 else 0, ha="right" if len(groups) > 5 else "center")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if ymax is not None:
            ax.set_ylim(0, ymax * 1.08)
        if len(series) > 1:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.spines[["top", "right"]].set_visible(False)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
    return buffer.getvalue()
