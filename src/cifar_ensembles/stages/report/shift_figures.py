"""Figures of the shift stage, drawn only from shift.json and diversity.json.

`plot_shift` follows Ovadia et al. (2019, Fig. 2): accuracy and ECE against the severity of
the corruption (0: the clean test images), one box per experiment and severity over the
corruptions, single models (their mean) next to the chosen ensemble. `plot_diversity` shows
where an experiment's ensemble gain comes from: how often its members disagree, how the
gain grows with the ensemble's size, and how disagreement and the NLL gain of averaging
grow under shift.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Patch

from ...files.ensemble_summary import EnsembleSummary
from ...files.shift_summary import DiversitySummary, ShiftSummary
from ...transforms.corruptions import SEVERITIES
from .plotting import PALETTE, save_figure, style_axes


def _values(summary: ShiftSummary, which: str, metric: str) -> list[np.ndarray]:
    """Per severity 0..5, the metric over corruptions (one value at severity 0, the clean set)."""
    out = [np.array([getattr(getattr(summary.clean, which), metric)])]
    for s in SEVERITIES:
        out.append(np.array([getattr(getattr(x, which), metric) for x in summary.sets if x.severity == s]))
    return out


def plot_shift(shift_jsons: dict, out_paths, dpi: int) -> None:
    """Accuracy (top) and ECE (bottom) against severity, boxes over corruptions, per experiment
    single models (light) and the chosen ensemble (dark)."""
    summaries = {name: ShiftSummary.load(path) for name, path in shift_jsons.items()}
    groups = [(name, which) for name in summaries for which in ("single_mean", "ensemble")]
    width = 0.8 / len(groups)
    fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 1.6 * len(groups) + 5), 7.5), dpi=dpi, sharex=True)
    for ax, metric, label in ((axes[0], "accuracy", "accuracy (%)"), (axes[1], "ece", "ECE (%)")):
        for g, (name, which) in enumerate(groups):
            color = PALETTE[list(summaries).index(name) % len(PALETTE)]
            positions = np.arange(len(SEVERITIES) + 1) + (g - (len(groups) - 1) / 2) * width
            values = [100 * v for v in _values(summaries[name], which, metric)]
            parts = ax.boxplot(
                values,
                positions=positions,
                widths=width * 0.85,
                patch_artist=True,
                showfliers=False,
                medianprops=dict(color="black", linewidth=1),
            )
            for box in parts["boxes"]:
                box.set(facecolor=color, alpha=0.35 if which == "single_mean" else 0.85, edgecolor=color)
        style_axes(ax, "", label)
    axes[1].set_xticks(np.arange(len(SEVERITIES) + 1), ["clean"] + [str(s) for s in SEVERITIES])
    axes[1].set_xlabel("corruption severity (boxes: spread over corruptions)")
    handles = [
        Patch(facecolor=PALETTE[i % len(PALETTE)], alpha=alpha, label=f"{name}: {kind}")
        for i, name in enumerate(summaries)
        for alpha, kind in ((0.35, "single models (mean)"), (0.85, "chosen ensemble"))
    ]
    axes[0].legend(handles=handles, frameon=False, fontsize=8, ncol=min(4, len(handles)), loc="lower center",
                   bbox_to_anchor=(0.5, 1.0))
    n = next(iter(summaries.values()))
    fig.suptitle(
        f"accuracy and calibration under shift: {len(n.corruptions)} corruptions x 5 severities, "
        f"{n.images} test images each"
    )
    save_figure(fig, out_paths)


def _matrix(ax, matrix: np.ndarray, seeds: list[int]) -> None:
    """Pairwise disagreement (%), the diagonal (a member with itself) left blank."""
    shown = np.where(np.eye(len(seeds), dtype=bool), np.nan, 100 * matrix)
    off = shown[~np.isnan(shown)]
    image = ax.imshow(shown, cmap="viridis", vmin=off.min() if off.size else 0,
                      vmax=off.max() if off.size else 1)
    if len(seeds) <= 12:
        for i in range(len(seeds)):
            for j in range(len(seeds)):
                if i != j:
                    ax.text(j, i, f"{shown[i, j]:.1f}", ha="center", va="center", fontsize=8, color="white")
    ax.set_xticks(range(len(seeds)), [str(s) for s in seeds])
    ax.set_yticks(range(len(seeds)), [str(s) for s in seeds])
    ax.set_xlabel("seed")
    ax.set_ylabel("seed")
    ax.set_title("test predictions that differ (%)", fontsize=10)
    plt.colorbar(image, ax=ax, fraction=0.046, pad=0.04)


def _gain_by_k(ax, ensemble: EnsembleSummary) -> None:
    m = len(ensemble.seeds)
    k = np.arange(1, m + 1)
    singles = np.array([s.test_accuracy for s in ensemble.singles])
    first_mean = np.cumsum(singles) / k  # mean single accuracy of the first k seeds
    test = ensemble.first_k["test"]
    ax.plot(
        k,
        100 * (np.asarray(test.soft) - first_mean),
        marker="o",
        markersize=4,
        color=PALETTE[0],
        label="soft vote of the first k",
    )
    ax.plot(
        k,
        100 * (np.asarray(test.hard) - first_mean),
        marker="s",
        markersize=4,
        linestyle="--",
        color=PALETTE[1],
        label="hard vote of the first k",
    )
    subsets = ensemble.subsets["test"].soft
    ax.plot(
        k,
        100 * (np.asarray(subsets.mean) - singles.mean()),
        linestyle=":",
        color="black",
        label="random subsets (soft, mean)",
    )
    ax.axhline(0, color="gray", linewidth=0.8)
    ax.set_xticks(k)
    style_axes(ax, "ensemble size k", "gain over its single models (points)")
    ax.set_title("test accuracy gain of the ensemble", fontsize=10)
    ax.legend(frameon=False, fontsize=8)


def _under_shift(ax, diversity: DiversitySummary) -> None:
    labels = ["clean"] + list(diversity.by_severity)
    stats = [diversity.test, *diversity.by_severity.values()]
    x = np.arange(len(labels))
    ax.bar(
        x - 0.2,
        [100 * s.disagreement for s in stats],
        0.4,
        color=PALETTE[0],
        alpha=0.8,
        label="pairwise disagreement (%)",
    )
    ax.bar(
        x + 0.2,
        [100 * s.gain for s in stats],
        0.4,
        color=PALETTE[2],
        alpha=0.8,
        label="NLL gain of averaging (nats x 100)",
    )
    ax.set_xticks(x, labels)
    style_axes(ax, "corruption severity", "")
    ax.set_title("diversity under shift", fontsize=10)
    ax.legend(frameon=False, fontsize=8)


def plot_diversity(diversity_json, ensemble_json, experiment: str, out_paths, dpi: int) -> None:
    diversity = DiversitySummary.load(diversity_json)
    ensemble = EnsembleSummary.load(ensemble_json)
    panels = 3 if diversity.by_severity else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.4 * panels, 4.8), dpi=dpi, layout="constrained")
    _matrix(axes[0], np.asarray(diversity.disagreement), diversity.seeds)
    _gain_by_k(axes[1], ensemble)
    if diversity.by_severity:
        _under_shift(axes[2], diversity)
    t = diversity.test
    fig.suptitle(
        f"{experiment}: member diversity (oracle accuracy {100 * t.oracle_accuracy:.2f}%, "
        f"mean member {100 * t.mean_member_accuracy:.2f}%; NLL {t.mean_member_nll:.3f} -> "
        f"{t.ensemble_nll:.3f} by averaging)"
    )
    save_figure(fig, out_paths)


# ------------------------------------------------------------------ summary.md sections
