"""Figures and summary.md sections of the OOD stage, drawn only from ood.json and selective.json.

`plot_ood`: per experiment and OOD set, the ROC curve of detecting OOD images (in-distribution
positive: TPR is the share of test images kept, FPR the share of OOD images kept) of the
single models (their mean) against the chosen ensemble, and AUROC against ensemble size per
score (first k seeds, and the mean and range of random k-subsets). `plot_selective`: the
risk-coverage curves of one experiment on clean and corrupted test images.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from ...files.ood_summary import OodSummary, SelectiveSummary
from .plotting import PALETTE, save_figure, style_axes

SCORE_LABELS = {"msp": "MSP", "entropy": "entropy", "aleatoric": "aleatoric",
                "epistemic": "mutual information", "disagreement": "disagreement"}
METRIC_LABELS = {"auroc": "AUROC", "aupr_in": "AUPR-In", "aupr_out": "AUPR-Out", "fpr95": "FPR95"}


def _roc(ax, s, experiment: str) -> None:
    fpr = np.asarray(s.roc.fpr)
    entropy = s.scores["entropy"]
    ax.plot(fpr, s.roc.single["entropy"], color=PALETTE[0], linestyle="--",
            label=f"single, entropy ({entropy.single['auroc'].mean:.3f})")
    ax.plot(fpr, s.roc.ensemble["entropy"], color=PALETTE[1],
            label=f"ensemble, entropy ({entropy.ensemble['auroc'].value:.3f})")
    ax.plot(fpr, s.roc.ensemble["epistemic"], color=PALETTE[2], linestyle=":",
            label=f"ensemble, mutual inf. ({s.scores['epistemic'].ensemble['auroc'].value:.3f})")
    ax.plot([0, 1], [0, 1], color="gray", linewidth=0.8)
    style_axes(ax, f"OOD images kept (FPR), {s.images} images", "test images kept (TPR)")
    ax.set_title(f"{experiment} vs {s.set}", fontsize=10)
    ax.legend(frameon=False, fontsize=7, loc="lower right", title="(AUROC)", title_fontsize=7)


def _by_size(ax, s, experiment: str) -> None:
    for i, (name, curve) in enumerate(s.by_size.items()):
        k = np.arange(1, len(curve.first_k) + 1)
        color = PALETTE[i % len(PALETTE)]
        ax.plot(k, curve.first_k, marker="o", markersize=3, color=color, label=SCORE_LABELS.get(name, name))
        ax.plot(k, curve.subsets.mean, linestyle="--", color=color, linewidth=0.9)
        ax.fill_between(k, curve.subsets.min, curve.subsets.max, color=color, alpha=0.12)
    ax.axhline(0.5, color="gray", linewidth=0.8)
    ax.set_xticks(np.arange(1, len(next(iter(s.by_size.values())).first_k) + 1))
    style_axes(ax, "ensemble size k", "AUROC")
    ax.set_title(f"{experiment} vs {s.set}: AUROC by ensemble size", fontsize=10)
    ax.legend(frameon=False, fontsize=7, title="first k (solid); random subsets\n(dashed: mean, band: range)",
              title_fontsize=7)


def plot_ood(ood_jsons: dict, out_paths, dpi: int) -> None:
    summaries = {name: OodSummary.load(path) for name, path in ood_jsons.items()}
    sets = list(dict.fromkeys(s.set for summary in summaries.values() for s in summary.sets))
    rows, cols = 2 * len(summaries), max(len(sets), 1)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 4.0 * rows), dpi=dpi, squeeze=False,
                             layout="constrained")
    for r, (experiment, summary) in enumerate(summaries.items()):
        by_name = {s.set: s for s in summary.sets}
        for c, name in enumerate(sets):
            if name in by_name:
                _roc(axes[2 * r, c], by_name[name], experiment)
                _by_size(axes[2 * r + 1, c], by_name[name], experiment)
            else:
                axes[2 * r, c].axis("off")
                axes[2 * r + 1, c].axis("off")
    first = next(iter(summaries.values()))
    fig.suptitle(f"out-of-distribution detection against {first.in_images} test images "
                 "(in-distribution positive)")
    save_figure(fig, out_paths)


def plot_selective(selective_json, experiment: str, out_paths, dpi: int) -> None:
    summary = SelectiveSummary.load(selective_json)
    n = len(summary.curves)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 4.0), dpi=dpi, squeeze=False, layout="constrained")
    grid = 100 * np.asarray(summary.grid)
    for ax, c in zip(axes[0], summary.curves):
        ax.plot(grid, 100 * np.asarray(c.single.risk), color=PALETTE[0], linestyle="--",
                label=f"single models, mean (AURC {100 * c.single.aurc.mean:.2f})")
        ax.plot(grid, 100 * np.asarray(c.ensemble.risk), color=PALETTE[1],
                label=f"chosen ensemble (AURC {100 * c.ensemble.aurc:.2f}; optimal "
                      f"{100 * c.ensemble.optimal_aurc:.2f})")
        style_axes(ax, "coverage (%)", "risk: error of the images kept (%)")
        ax.set_title(f"{c.set}: {c.images} images", fontsize=10)
        ax.legend(frameon=False, fontsize=7, loc="upper left")
    fig.suptitle(f"{experiment}: risk-coverage (the most confident images kept first)")
    save_figure(fig, out_paths)


# ------------------------------------------------------------------ summary.md sections
def _single(metric) -> str:
    return f"{metric.mean:.3f} ± {metric.std:.3f}"


def _ensemble(metric) -> str:
    return f"{metric.value:.3f} [{metric.ci[0]:.3f}, {metric.ci[1]:.3f}]"


def ood_lines(ood_jsons: dict) -> list[str]:
    if not ood_jsons:
        return []
    lines = ["", "## Out-of-distribution detection", "",
             "In-distribution (the test split) is the positive class: AUROC and AUPR-In rank by "
             "confidence, AUPR-Out ranks OOD images by uncertainty, FPR95 is the share of OOD images "
             "kept at the threshold that keeps 95% of the test images (lower is better). Single models: "
             "mean ± std over seeds; the chosen ensemble: [95% bootstrap interval], in- and "
             "out-of-distribution images resampled independently. Mutual information and disagreement "
             "need several members (ensemble only). Last column: AUROC of the first k seeds, k = 1..M.",
             "",
             "| experiment | OOD set | score | AUROC single | AUROC ensemble | AUPR-In ensemble | "
             "AUPR-Out ensemble | FPR95 single | FPR95 ensemble | AUROC, first k |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, path in ood_jsons.items():
        summary = OodSummary.load(path)
        for s in summary.sets:
            for score in ("msp", "entropy", "epistemic", "disagreement"):
                r, e = s.scores[score], s.scores[score].ensemble
                single = r.single
                lines.append(
                    f"| {name} | {s.set} ({s.images}) | {SCORE_LABELS[score]} | "
                    f"{_single(single['auroc']) if single else '-'} | {_ensemble(e['auroc'])} | "
                    f"{_ensemble(e['aupr_in'])} | {_ensemble(e['aupr_out'])} | "
                    f"{_single(single['fpr95']) if single else '-'} | {_ensemble(e['fpr95'])} | "
                    + " → ".join(f"{v:.3f}" for v in s.by_size[score].first_k) + " |")
    return lines


def selective_lines(selective_jsons: dict) -> list[str]:
    if not selective_jsons:
        return []
    first = SelectiveSummary.load(next(iter(selective_jsons.values())))
    coverages = list(first.curves[0].ensemble.accuracy_at)
    lines = ["", "## Selective prediction (risk-coverage)", "",
             "Single models (mean ± std over seeds) → the chosen ensemble. The most confident images are "
             "kept first (single models: MSP; ensemble: the mean probability of the class it votes for). "
             "AURC: mean error over all coverages (lower is better; optimal: every error ranked last). "
             "Corrupted sets pool all corruptions at one severity.", "",
             "| experiment | images | accuracy (all) | AURC (%) | optimal AURC (%) | "
             + " | ".join(f"accuracy at {100 * float(c):g}% coverage" for c in coverages) + " |",
             "|---|---|---|---|---|" + "---|" * len(coverages)]
    for name, path in selective_jsons.items():
        for c in SelectiveSummary.load(path).curves:
            s, e = c.single, c.ensemble
            cells = [f"{100 * s.accuracy_at[k].mean:.2f} ± {100 * s.accuracy_at[k].std:.2f} → "
                     f"{100 * e.accuracy_at[k]:.2f}%" for k in coverages]
            lines.append(f"| {name} | {c.set} ({c.images}) | {100 * s.accuracy.mean:.2f} → "
                         f"{100 * e.accuracy:.2f}% | {100 * s.aurc.mean:.2f} ± {100 * s.aurc.std:.2f} → "
                         f"{100 * e.aurc:.2f} | {100 * e.optimal_aurc:.2f} | " + " | ".join(cells) + " |")
    return lines


OOD_CAPTION = ("ROC curves of OOD detection, single models (mean) against the chosen ensemble, per OOD "
               "set; below each, AUROC against ensemble size per score.")
SELECTIVE_CAPTION = "risk-coverage curves of the single models and the chosen ensemble, clean and corrupted"


def ood_figure_lines(experiments: list[str], with_ood: bool, with_selective: bool) -> list[str]:
    lines = []
    if with_ood:
        lines += [f"![{OOD_CAPTION}](ood.png)", "", f"*{OOD_CAPTION}*", ""]
    if with_selective:
        for experiment in experiments:
            lines += [f"![{experiment}: {SELECTIVE_CAPTION}]({experiment}/selective.png)", "",
                      f"*{experiment}: {SELECTIVE_CAPTION}*", ""]
    return lines
