"""Bar charts of time ratios (variant over bare frozen linear), written as PNG with matplotlib."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path


def ratio_groups(rows: Sequence[Mapping], label: Callable[[Mapping], str], field: str) -> dict[str, dict[str, float]]:
    """`{case label: {variant: row[field]}}` over every row but bare `linear`'s: plot_ratios' input."""
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["variant"] != "linear":
            out.setdefault(label(r), {})[r["variant"]] = r[field]
    return out


def plot_ratios(groups: Mapping[str, Mapping[str, float]], path: Path, ylabel: str) -> bool:
    """One group of bars per case label, one bar per variant, a line at 1.0 (= bare linear).
    Returns False (and writes nothing) when matplotlib is not installed or there is nothing to plot."""
    if not groups:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cases = list(groups)
    variants = list(dict.fromkeys(v for ratios in groups.values() for v in ratios))
    fig, ax = plt.subplots(figsize=(max(6.0, len(cases) * 0.7), 4.5))
    width = 0.8 / max(1, len(variants))
    for i, v in enumerate(variants):
        heights = [groups[c].get(v, math.nan) for c in cases]
        ax.bar([c + i * width for c in range(len(cases))], heights, width, label=v)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(cases))])
    ax.set_xticklabels(cases, fontsize=6, rotation=90)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
