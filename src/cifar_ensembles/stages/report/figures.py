"""The report's figures per experiment and across experiments: training curves, accuracy
against ensemble size, reliability diagrams, accuracy with intervals and cost per model.

Nothing here trains or predicts, so figures can be restyled and redrawn in seconds.
"""

from __future__ import annotations

import os

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from ...config.spec import PublishedSpec
from ...errors import UserError
from ...files.ensemble_summary import EnsembleSummary
from ...files.training_run import read_benchmark_seconds, read_history
from .plotting import COLORS, save_figure, style_axes


def history_columns(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """history.csv as float columns (epochs without validation become NaN)."""
    rows = read_history(path)
    return {k: np.array([np.nan if getattr(r, k) is None else getattr(r, k) for r in rows], dtype=float)
            for k in rows[0].__dataclass_fields__}


def _stack(histories, column):
    n = min(len(h[column]) for h in histories)
    return np.stack([h[column][:n] for h in histories]), np.arange(1, n + 1)


def _band(ax, x, values, color, label, linestyle="-"):
    """Mean over seeds with a min-max band, on the epochs that have values (validation may
    run every few epochs only: runtime.eval_every_epochs)."""
    measured = ~np.all(np.isnan(values), axis=0)
    x, values = x[measured], values[:, measured]
    mean = np.nanmean(values, axis=0)
    ax.plot(x, mean, color=color, linestyle=linestyle, label=label, linewidth=1.8,
            marker="o" if len(x) < len(measured) else None, markersize=3)
    if len(values) > 1:
        ax.fill_between(x, np.nanmin(values, axis=0), np.nanmax(values, axis=0), color=color,
                        alpha=0.18, linewidth=0)


def plot_training_curves(history_paths, experiment: str, out_paths, dpi: int) -> None:
    """Accuracy and loss per epoch, train and validation: mean over seeds, band = min..max."""
    histories = [history_columns(p) for p in history_paths]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4), dpi=dpi)
    n = len(histories)
    suffix = f" (mean of {n} seeds, band: min-max)" if n > 1 else ""
    for column, color, label, style in (("train_acc", COLORS["train"], "train", "--"),
                                        ("val_acc", COLORS["val"], "validation", "-"),
                                        ("ema_val_acc", COLORS["ema"], "validation (EMA)", "-")):
        values, x = _stack(histories, column)
        if np.all(np.isnan(values)):
            continue
        _band(ax_acc, x, 100 * values, color, label, style)
    for column, color, label, style in (("train_loss", COLORS["train"], "train", "--"),
                                        ("val_loss", COLORS["val"], "validation", "-"),
                                        ("ema_val_loss", COLORS["ema"], "validation (EMA)", "-")):
        values, x = _stack(histories, column)
        if np.all(np.isnan(values)):
            continue
        _band(ax_loss, x, values, color, label, style)
    style_axes(ax_acc, "epoch", "accuracy (%)")
    style_axes(ax_loss, "epoch", "loss")
    for ax in (ax_acc, ax_loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    best = np.nanmax(_stack(histories, "val_acc")[0], axis=1)
    ax_acc.set_title(f"best validation accuracy {100 * best.mean():.2f}%", fontsize=10)
    ax_acc.legend(frameon=False)
    ax_loss.legend(frameon=False)
    fig.suptitle(f"{experiment}: training curves{suffix}")
    save_figure(fig, out_paths)


def plot_ensemble_curve(ensemble_json, experiment: str, out_paths, published: PublishedSpec | None,
                        dpi: int) -> None:
    """Accuracy vs ensemble size on validation (left) and test (right): first k seeds with
    hard and soft votes, and the mean over random member subsets with a min-max band."""
    summary = EnsembleSummary.load(ensemble_json)
    m = len(summary.seeds)
    k = np.arange(1, m + 1)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=dpi, sharey=True)
    for ax, split in zip(axes, ("val", "test")):
        first, subsets = summary.first_k[split], summary.subsets[split]
        color = COLORS[split]
        mean = 100 * np.asarray(subsets.soft.mean)
        ax.fill_between(k, 100 * np.asarray(subsets.soft.min), 100 * np.asarray(subsets.soft.max),
                        color=color, alpha=0.12, linewidth=0, label="random subsets, soft: min-max")
        std = 100 * np.asarray(subsets.soft.std)
        ax.fill_between(k, mean - std, mean + std, color=color, alpha=0.22, linewidth=0,
                        label="random subsets, soft: mean ± std")
        ax.plot(k, mean, color=color, linewidth=1, linestyle=":", label="random subsets, soft: mean")
        ax.plot(k, 100 * np.asarray(first.soft), color=color, marker="o", markersize=4,
                label="first k seeds, soft vote")
        ax.plot(k, 100 * np.asarray(first.hard), color=color, marker="s", markersize=4, linestyle="--",
                alpha=0.8, label="first k seeds, hard vote")
        greedy = summary.greedy
        ax.plot([greedy.chosen_size], [100 * getattr(greedy, f"{split}_accuracy")], marker="D", markersize=7,
                    color="black", linestyle="none", label="greedy selection (val NLL)")
        ax.axvline(summary.chosen_k, color="black", alpha=0.35, linewidth=1)
        style_axes(ax, "ensemble size k", "accuracy (%)" if split == "val" else "")
        ax.set_xticks(k)
        ax.set_title("validation (k chosen here)" if split == "val" else "test (read once for the chosen k)",
                     fontsize=10)
    test_acc = 100 * summary.test_accuracy
    lo, hi = (100 * v for v in summary.test_ci)
    axes[1].annotate(f"chosen k={summary.chosen_k}: {test_acc:.2f}%\n95% CI {lo:.2f}-{hi:.2f}%",
                     xy=(summary.chosen_k, test_acc), xytext=(10, -40), textcoords="offset points",
                     fontsize=9, arrowprops=dict(arrowstyle="-", color="black", alpha=0.5),
                     bbox=dict(boxstyle="round,pad=0.3", facecolor="white", edgecolor="none", alpha=0.85))
    if published is not None:
        axes[1].plot([published.k], [100 * published.test_accuracy], marker="*", markersize=14,
                     color="goldenrod", linestyle="none",
                     label=f"the report: {100 * published.test_accuracy:.2f}% (k={published.k})")
    axes[1].legend(frameon=False, fontsize=8, loc="lower right")
    fig.suptitle(f"{experiment}: ensemble accuracy vs size ({summary.method} vote decides k)")
    save_figure(fig, out_paths)


def _reliability_panel(ax, probs, labels, temperature, n_bins, title):
    from ...analysis.metrics import expected_calibration_error, reliability_bins, temperature_scale

    width = 1.0 / n_bins
    for p, color, label, fill in ((probs, COLORS["test"], "as predicted", True),
                                  (temperature_scale(probs, temperature), "black",
                                   f"temperature-scaled (T={temperature:.2f})", False)):
        bins = reliability_bins(p, labels, n_bins)
        ece = 100 * expected_calibration_error(p, labels, n_bins)
        ok = bins["count"] > 0
        centers = bins["edges"][:-1] + width / 2
        if fill:
            ax.bar(centers[ok], bins["accuracy"][ok], width=width * 0.9, color=color, alpha=0.55,
                   label=f"{label}: ECE {ece:.2f}%")
        else:
            ax.step(np.r_[bins["edges"][:-1][ok], bins["edges"][1:][ok][-1:]],
                    np.r_[bins["accuracy"][ok], bins["accuracy"][ok][-1:]], where="post", color=color,
                    linewidth=1.2, label=f"{label}: ECE {ece:.2f}%")
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    style_axes(ax, "confidence (max probability)", "accuracy")
    ax.set_title(title, fontsize=10)
    ax.legend(frameon=False, fontsize=8, loc="upper left")


def plot_reliability(ensemble_json, data_path, test_paths, experiment: str, out_paths,
                     n_bins: int, dpi: int) -> None:
    """Reliability diagrams on test of the best single model (by validation accuracy) and of
    the chosen ensemble, before and after temperature scaling fitted on validation."""
    from ...files.arrays import load_members, read_labels

    summary = EnsembleSummary.load(ensemble_json)
    seeds = summary.seeds
    if len(test_paths) != len(seeds):
        raise UserError(f"reliability: {len(test_paths)} test probability files for the {len(seeds)} seeds "
                        f"of {ensemble_json}")
    _, y_test = read_labels(data_path)
    probs = load_members(test_paths, len(y_test), "the test split")
    best = seeds.index(summary.best_single_seed)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), dpi=dpi)
    single = summary.singles[best]
    _reliability_panel(axes[0], probs[best], y_test, single.calibration.temperature, n_bins,
                       f"best single model (seed {seeds[best]}), test")
    k = summary.chosen_k
    _reliability_panel(axes[1], probs[:k].mean(0), y_test, summary.calibration.temperature, n_bins,
                       f"chosen ensemble (mean of {k} members), test")
    fig.suptitle(f"{experiment}: reliability diagrams ({n_bins} equal-width bins)")
    save_figure(fig, out_paths)


def plot_accuracy_bars(ensemble_jsons: dict, out_paths, dpi: int) -> None:
    """Per experiment: mean single-model and chosen-ensemble test accuracy with 95% bootstrap
    CIs (over test images); dots are the individual seeds."""
    names = list(ensemble_jsons)
    summaries = [EnsembleSummary.load(ensemble_jsons[n]) for n in names]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.8 * len(names) + 2), 4.5), dpi=dpi)
    width = 0.38
    for offset, key, color, label in ((-width / 2, "single", COLORS["val"], "single model (mean of seeds)"),
                                      (width / 2, "ensemble", COLORS["test"], "chosen ensemble")):
        values, lows, highs = [], [], []
        for s in summaries:
            if key == "single":
                v, (lo, hi) = s.single_test_accuracy.mean, s.single_test_accuracy.ci_of_mean
            else:
                v, (lo, hi) = s.test_accuracy, s.test_ci
            values.append(100 * v)
            lows.append(100 * (v - lo))
            highs.append(100 * (hi - v))
        ax.bar(x + offset, values, width * 0.95, color=color, alpha=0.75, label=label,
               yerr=[lows, highs], capsize=4, error_kw=dict(linewidth=1))
        for xi, v in zip(x + offset, values):
            ax.annotate(f"{v:.2f}%", (xi, 0), xytext=(0, 6), textcoords="offset points", ha="center",
                        fontsize=8, color="white", fontweight="bold", xycoords=("data", "axes fraction"))
    for xi, s in zip(x, summaries):
        seeds = [100 * r.test_accuracy for r in s.singles]
        ax.scatter(np.full(len(seeds), xi - width / 2), seeds, color="black", s=10, zorder=3)
    everything = [100 * r.test_accuracy for s in summaries for r in s.singles]
    everything += [100 * s.test_ci[0] for s in summaries]
    top = max(100 * s.test_ci[1] for s in summaries)
    ax.set_ylim(max(0.0, min(everything) - 2.0), min(100.0, top + 2.0))
    ax.set_xticks(x, names)
    style_axes(ax, "", "test accuracy (%)")
    ax.legend(frameon=False, fontsize=8)
    ax.set_title("test accuracy with 95% bootstrap confidence intervals (dots: single seeds)", fontsize=10)
    save_figure(fig, out_paths)


def cost_table(runs: dict) -> dict[str, dict[str, list[float]]]:
    """Per experiment: wall seconds per model (benchmark files) and mean training images/second."""
    out = {}
    for name, seeds in runs.items():
        seconds, speed = [], []
        for files in seeds.values():
            seconds.append(read_benchmark_seconds(files["benchmark"]))
            speed.append(float(np.nanmean(history_columns(files["history"])["images_per_second"])))
        out[name] = {"seconds": seconds, "images_per_second": speed}
    return out


def plot_cost(runs: dict, out_paths, dpi: int) -> None:
    """Training cost per model: wall-clock (GPU-)seconds and training images/second."""
    costs = cost_table(runs)
    names = list(costs)
    x = np.arange(len(names))
    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(max(8.0, 2.4 * len(names) + 4), 4), dpi=dpi)
    for ax, key, label, scale in ((ax_t, "seconds", "seconds per model (job wall time)", 1.0),
                                  (ax_s, "images_per_second", "training images / second", 1.0)):
        means = [np.mean(costs[n][key]) * scale for n in names]
        ax.bar(x, means, 0.6, color=COLORS["val"], alpha=0.7)
        for xi, n in zip(x, names):
            ax.scatter(np.full(len(costs[n][key]), xi), np.asarray(costs[n][key]) * scale, color="black",
                       s=10, zorder=3)
            ax.annotate(f"{np.mean(costs[n][key]) * scale:,.0f}", (xi, 0), xytext=(0, 6),
                        textcoords="offset points", ha="center", fontsize=8, color="white", fontweight="bold",
                        xycoords=("data", "axes fraction"))
        ax.set_xticks(x, names)
        style_axes(ax, "", label)
    fig.suptitle("cost per model (bars: mean, dots: seeds)")
    save_figure(fig, out_paths)
