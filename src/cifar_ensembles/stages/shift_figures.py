"""Figures and summary tables of the shift stage, drawn only from shift.json and diversity.json.

`plot_shift` follows Ovadia et al. (2019, Fig. 2): accuracy and ECE against the severity of
the corruption (0: the clean test images), one box per experiment and severity over the
corruptions, single models (their mean) next to the chosen ensemble. `plot_diversity` shows
where an experiment's ensemble gain comes from: how often its members disagree, how the
gain grows with the ensemble's size, and how disagreement and the NLL gain of averaging
grow under shift.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from ..corruptions import SEVERITIES  # noqa: E402
from ..formats import DiversitySummary, EnsembleSummary, ShiftSummary  # noqa: E402
from .report import _style, save_figure  # noqa: E402

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f")


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
        _style(ax, "", label)
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
    _style(ax, "ensemble size k", "gain over its single models (points)")
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
    _style(ax, "corruption severity", "")
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
def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def shift_lines(shift_jsons: dict) -> list[str]:
    if not shift_jsons:
        return []
    lines = [
        "",
        "## Distribution shift (corrupted test images)",
        "",
        "Accuracy of the mean single model → the chosen ensemble, averaged over corruptions; the "
        "gain's interval is a paired 95% bootstrap over images. mCE: corruption error relative to "
        "the baseline's mean single model (lower is better; the baseline's single models are 1).",
        "",
        "| experiment | clean | "
        + " | ".join(f"severity {s}" for s in SEVERITIES)
        + " | gain at severity 5 | ECE clean → severity 5 (ensemble) | mCE single / ensemble |",
        "|" + "---|" * (len(SEVERITIES) + 5),
    ]
    for name, path in shift_jsons.items():
        s = ShiftSummary.load(path)
        cells = [f"{100 * s.clean.single_mean.accuracy:.1f} → {100 * s.clean.ensemble.accuracy:.1f}"]
        cells += [f"{100 * g.single_accuracy:.1f} → {100 * g.ensemble_accuracy:.1f}" for g in s.by_severity]
        last = s.by_severity[-1]
        ece5 = np.mean([x.ensemble.ece for x in s.sets if x.severity == SEVERITIES[-1]])
        ce = s.corruption_error
        mce = f"{_number(ce.mce_single)} / {_number(ce.mce_ensemble)}" if ce else "-"
        lines.append(
            f"| {name} | "
            + " | ".join(cells)
            + f" | {100 * last.gain:+.2f} [{100 * last.ci[0]:+.2f}, {100 * last.ci[1]:+.2f}] | "
            f"{100 * s.clean.ensemble.ece:.2f}% → {100 * ece5:.2f}% | {mce} |"
        )
    return lines


def diversity_lines(diversity_jsons: dict) -> list[str]:
    if not diversity_jsons:
        return []
    lines = [
        "",
        "## Member diversity (test split)",
        "",
        "| experiment | pairwise disagreement | mean KL | oracle accuracy | mean member accuracy | "
        "NLL: mean member → averaged (gain) |",
        "|---|---|---|---|---|---|",
    ]
    for name, path in diversity_jsons.items():
        t = DiversitySummary.load(path).test
        lines.append(
            f"| {name} | {100 * t.disagreement:.2f}% | {t.kl:.3f} | {100 * t.oracle_accuracy:.2f}% | "
            f"{100 * t.mean_member_accuracy:.2f}% | {t.mean_member_nll:.3f} → {t.ensemble_nll:.3f} "
            f"({t.gain:.3f}) |"
        )
    return lines
