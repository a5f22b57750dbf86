"""What every report figure shares: the axes style, the colours and an
atomic save of PNG and SVG together."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from ...files.atomic import atomic_write

COLORS = {"val": "#1f77b4", "test": "#d62728", "train": "#7f7f7f", "ema": "#2ca02c"}
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f")


def style_axes(ax, xlabel, ylabel):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)


def save_figure(fig, paths) -> None:
    for path in paths:
        with atomic_write(path) as tmp:
            fig.savefig(tmp, dpi=fig.dpi, bbox_inches="tight", format=Path(path).suffix[1:])
    plt.close(fig)
