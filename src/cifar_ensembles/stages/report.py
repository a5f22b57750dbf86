"""Figures and tables of the report, drawn only from files earlier steps wrote.

Nothing here trains or predicts, so figures can be restyled and redrawn in seconds.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from ..atomic import atomic_write, write_text  # noqa: E402
from ..errors import UserError  # noqa: E402
from ..formats import Comparisons, EnsembleSummary, read_benchmark_seconds, read_history  # noqa: E402
from ..spec import PublishedSpec  # noqa: E402

COLORS = {"val": "#1f77b4", "test": "#d62728", "train": "#7f7f7f", "ema": "#2ca02c"}


def history_columns(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """history.csv as float columns (epochs without validation become NaN)."""
    rows = read_history(path)
    return {k: np.array([np.nan if getattr(r, k) is None else getattr(r, k) for r in rows], dtype=float)
            for k in rows[0].__dataclass_fields__}


def _style(ax, xlabel, ylabel):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)


def save_figure(fig, paths) -> None:
    for path in paths:
        with atomic_write(path) as tmp:
            fig.savefig(tmp, dpi=fig.dpi, bbox_inches="tight", format=Path(path).suffix[1:])
    plt.close(fig)


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
    _style(ax_acc, "epoch", "accuracy (%)")
    _style(ax_loss, "epoch", "loss")
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
        _style(ax, "ensemble size k", "accuracy (%)" if split == "val" else "")
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
    from ..metrics import expected_calibration_error, reliability_bins, temperature_scale

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
    _style(ax, "confidence (max probability)", "accuracy")
    ax.set_title(title, fontsize=10)
    ax.legend(frameon=False, fontsize=8, loc="upper left")


def plot_reliability(ensemble_json, data_path, test_paths, experiment: str, out_paths,
                     n_bins: int, dpi: int) -> None:
    """Reliability diagrams on test of the best single model (by validation accuracy) and of
    the chosen ensemble, before and after temperature scaling fitted on validation."""
    from .ensemble import load_members, read_labels

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
    _style(ax, "", "test accuracy (%)")
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
        _style(ax, "", label)
    fig.suptitle("cost per model (bars: mean, dots: seeds)")
    save_figure(fig, out_paths)


def _pct(v) -> str:
    return f"{100 * v:.2f}%"


def _mean_std(values, scale: float = 100.0, unit: str = "%", digits: int = 2) -> str:
    values = scale * np.asarray(values, dtype=float)
    if len(values) == 1:
        return f"{values[0]:.{digits}f}{unit}"
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}{unit}"


SUMMARY_HEADER = ["experiment", "seeds", "single: val acc", "single: test acc", "single: test NLL",
                  "single: ECE (→ temp. scaled)", "ensemble (chosen on val)", "ensemble: val acc",
                  "ensemble: test acc [95% CI]", "ensemble: ECE (→ temp. scaled)", "cost per model",
                  "the report"]


def _summary_row(name: str, s: EnsembleSummary, cost: dict, pub: PublishedSpec | None) -> list[str]:
    singles, cal = s.singles, s.calibration
    lo, hi = s.test_ci
    return [name, str(len(singles)), _mean_std([r.val_accuracy for r in singles]),
            _mean_std([r.test_accuracy for r in singles]),
            _mean_std([r.calibration.before.nll for r in singles], 1.0, "", 3),
            f"{_mean_std([r.calibration.before.ece for r in singles])} → "
            f"{_mean_std([r.calibration.after.ece for r in singles])}",
            f"{s.method}, k={s.chosen_k}", _pct(s.val_accuracy),
            f"{_pct(s.test_accuracy)} [{100 * lo:.2f}, {100 * hi:.2f}]",
            f"{_pct(cal.before.ece)} → {_pct(cal.after.ece)}",
            f"{np.mean(cost['seconds']):,.0f} s, {np.mean(cost['images_per_second']):,.0f} img/s",
            pub.note if pub else "-"]


def _csv_row(name: str, s: EnsembleSummary, cost: dict, pub: PublishedSpec | None) -> dict:
    test = [r.test_accuracy for r in s.singles]
    cal = s.calibration
    return {
        "experiment": name, "seeds": len(s.singles),
        "single_val_acc_mean": np.mean([r.val_accuracy for r in s.singles]),
        "single_test_acc_mean": np.mean(test),
        "single_test_acc_std": np.std(test, ddof=1) if len(test) > 1 else 0.0,
        "single_test_nll_mean": np.mean([r.calibration.before.nll for r in s.singles]),
        "single_test_ece_mean": np.mean([r.calibration.before.ece for r in s.singles]),
        "single_test_ece_scaled_mean": np.mean([r.calibration.after.ece for r in s.singles]),
        "ensemble_method": s.method, "ensemble_k": s.chosen_k,
        "ensemble_val_acc": s.val_accuracy, "ensemble_test_acc": s.test_accuracy,
        "ensemble_test_ci_low": s.test_ci[0], "ensemble_test_ci_high": s.test_ci[1],
        "ensemble_test_nll": cal.before.nll, "ensemble_test_ece": cal.before.ece,
        "ensemble_test_ece_scaled": cal.after.ece, "ensemble_temperature": cal.temperature,
        "greedy_members": " ".join(str(m) for m in s.greedy.members),
        "greedy_test_acc": s.greedy.test_accuracy,
        "seconds_per_model": np.mean(cost["seconds"]),
        "train_images_per_second": np.mean(cost["images_per_second"]),
        "published_test_acc": pub.test_accuracy if pub else "",
    }


def _comparison_lines(comparisons) -> list[str]:
    if not comparisons:
        return []
    lines = ["", "## Paired comparisons (test split, exact McNemar test)", "",
             "| A | B | shared seeds | mean single acc A − B | per-seed p-values | "
             "ensembles of shared seeds: A vs B | p-value |", "|---|---|---|---|---|---|---|"]
    for c in comparisons:
        per_seed = ", ".join(f"{r.p_value:.3g}" for r in c.per_seed)
        e = c.ensemble
        lines.append(f"| {c.a} | {c.b} | {len(c.shared_seeds)} | "
                     f"{100 * c.mean_single_difference:+.2f} points | {per_seed} | "
                     f"{_pct(e.accuracy_a)} vs {_pct(e.accuracy_b)} | {e.p_value:.3g} |")
    return lines


FIGURES = {  # file (beside summary.md) -> caption
    "accuracy.png": "Test accuracy of the mean single model and the chosen ensemble, with 95% bootstrap "
                    "intervals.",
    "cost.png": "Training cost per model: job wall time and images per second.",
    "shift.png": "Accuracy and ECE against corruption severity (boxes over corruptions): single models "
                 "(light) and the chosen ensemble (dark) of every experiment.",
}
EXPERIMENT_FIGURES = {
    "training_curves.png": "training curves (mean over seeds, band: min-max)",
    "ensemble_curve.png": "accuracy against ensemble size, validation and test",
    "reliability.png": "reliability diagrams of the best single model and the chosen ensemble",
    "diversity.png": "member disagreement, the ensemble's gain against its size, diversity under shift",
}


def _figure_lines(experiments: list[str], with_shift: bool) -> list[str]:
    """The figures beside summary.md, linked with their captions (Markdown viewers show them)."""
    lines = ["", "## Figures", ""]
    for name, caption in FIGURES.items():
        if name != "shift.png" or with_shift:
            lines += [f"![{caption}]({name})", "", f"*{caption}*", ""]
    for experiment in experiments:
        for name, caption in EXPERIMENT_FIGURES.items():
            lines += [f"![{experiment}: {caption}]({experiment}/{name})", "",
                      f"*{experiment}: {caption}*", ""]
    return lines


def _csv_text(rows: list[dict]) -> str:
    body = io.StringIO()
    writer = csv.DictWriter(body, fieldnames=list(rows[0]) if rows else ["experiment"], lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return body.getvalue()


def write_summary(ensemble_jsons: dict, runs: dict, comparisons_json,
                  published: dict[str, PublishedSpec] | None, out_md, out_csv,
                  shift: dict | None = None, diversity: dict | None = None) -> None:
    """summary.md (tables a reader can scan) and summary.csv (one row per experiment, numbers);
    `shift` and `diversity` ({experiment: json}) add their sections when given."""
    from .shift_figures import diversity_lines, shift_lines

    published = published or {}
    costs = cost_table(runs)
    comparisons = Comparisons.load(comparisons_json).pairs if comparisons_json else []
    summaries = {name: EnsembleSummary.load(path) for name, path in ensemble_jsons.items()}
    rows = [_summary_row(n, s, costs[n], published.get(n)) for n, s in summaries.items()]
    lines = ["# Summary", "",
             "Single models: mean ± standard deviation over seeds. The ensemble size is chosen on the "
             "validation split and its test accuracy is read once; the interval is a 95% percentile "
             "bootstrap over test images. Temperature scaling is fitted on validation.", "",
             "| " + " | ".join(SUMMARY_HEADER) + " |", "|" + "---|" * len(SUMMARY_HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += _comparison_lines(comparisons) + shift_lines(shift or {}) + diversity_lines(diversity or {})
    lines += _figure_lines(list(summaries), bool(shift))
    write_text(out_md, "\n".join(lines) + "\n")
    write_text(out_csv, _csv_text([_csv_row(n, s, costs[n], published.get(n)) for n, s in summaries.items()]))
