"""Figures and tables of the report, drawn only from files earlier steps wrote.

Nothing here trains or predicts, so figures can be restyled and redrawn in seconds.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .atomic import atomic_path, write_text  # noqa: E402
from .errors import UserError  # noqa: E402

COLORS = {"val": "#1f77b4", "test": "#d62728", "train": "#7f7f7f", "ema": "#2ca02c"}


def read_csv(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Columns of a CSV file as float arrays (empty cells become NaN)."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as err:
        raise UserError(f"{path}: cannot read: {err}") from None
    if not rows:
        raise UserError(f"{path}: no rows")
    return {k: np.array([float(r[k]) if r[k] not in ("", None) else np.nan for r in rows])
            for k in rows[0]}


def _style(ax, xlabel, ylabel):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)


def save_figure(fig, paths) -> None:
    for path in paths:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=fig.dpi, bbox_inches="tight", format=Path(path).suffix[1:])
    plt.close(fig)


def _stack(histories, column):
    n = min(len(h[column]) for h in histories)
    return np.stack([h[column][:n] for h in histories]), np.arange(1, n + 1)


def _band(ax, x, values, color, label, linestyle="-"):
    mean = np.nanmean(values, axis=0)
    ax.plot(x, mean, color=color, linestyle=linestyle, label=label, linewidth=1.8)
    if len(values) > 1:
        ax.fill_between(x, np.nanmin(values, axis=0), np.nanmax(values, axis=0), color=color,
                        alpha=0.18, linewidth=0)


def plot_training_curves(history_paths, experiment: str, out_paths, dpi: int = 150) -> None:
    """Accuracy and loss per epoch, train and validation: mean over seeds, band = min..max."""
    histories = [read_csv(p) for p in history_paths]
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
    best = np.nanmax(_stack(histories, "val_acc")[0], axis=1)
    ax_acc.set_title(f"best validation accuracy {100 * best.mean():.2f}%", fontsize=10)
    ax_acc.legend(frameon=False)
    ax_loss.legend(frameon=False)
    fig.suptitle(f"{experiment}: training curves{suffix}")
    save_figure(fig, out_paths)


def plot_ensemble_curve(ensemble_csv, ensemble_json, experiment: str, out_paths,
                        published: dict | None = None, dpi: int = 150) -> None:
    """Accuracy of the first-k-seeds ensemble vs k: hard and soft, validation and test."""
    curve = read_csv(ensemble_csv)
    summary = json.loads(Path(ensemble_json).read_text())
    k = curve["k"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=dpi)
    for split in ("val", "test"):
        for method, style, marker in (("soft", "-", "o"), ("hard", "--", "s")):
            ax.plot(k, 100 * curve[f"{split}_{method}"], linestyle=style, marker=marker, markersize=4,
                    color=COLORS[split], label=f"{'validation' if split == 'val' else 'test'}, {method} vote")
    chosen = summary["chosen_k"]
    ax.axvline(chosen, color="black", alpha=0.4, linewidth=1)
    ax.annotate(f"k={chosen} chosen on validation\ntest {100 * summary['test_accuracy']:.2f}%",
                xy=(chosen, 100 * summary["test_accuracy"]), xytext=(8, -30),
                textcoords="offset points", fontsize=9,
                arrowprops=dict(arrowstyle="-", color="black", alpha=0.5))
    if published and published.get("test_accuracy") is not None:
        pk = published.get("k", k[-1])
        ax.plot([pk], [100 * published["test_accuracy"]], marker="*", markersize=13, color="goldenrod",
                linestyle="none", label=f"report: {100 * published['test_accuracy']:.2f}% (k={pk})")
    ax.set_xticks(k)
    _style(ax, "ensemble size k (first k seeds)", "accuracy (%)")
    ax.legend(frameon=False, fontsize=8, loc="lower right")
    ax.set_title(f"{experiment}: ensemble accuracy vs size ({summary['method']} vote chosen)")
    save_figure(fig, out_paths)


def _fmt_pct(values) -> str:
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.2f}%"
    return f"{100 * values.mean():.2f} ± {100 * values.std(ddof=1):.2f}%"


def write_summary(experiments: dict, published: dict, out_md, out_csv) -> None:
    """One row per experiment: single models (mean ± std over seeds), chosen ensemble, report.

    `experiments` maps a name to {"metrics": {seed: {"val": path, "test": path}},
    "ensemble": path of ensemble.json}.
    """
    rows = []
    for name, files in experiments.items():
        val = [json.loads(Path(m["val"]).read_text())["accuracy"] for m in files["metrics"].values()]
        test = [json.loads(Path(m["test"]).read_text())["accuracy"] for m in files["metrics"].values()]
        ens = json.loads(Path(files["ensemble"]).read_text())
        pub = (published or {}).get(name, {}) or {}
        rows.append({
            "experiment": name, "seeds": len(test),
            "single_val_acc": _fmt_pct(val), "single_test_acc": _fmt_pct(test),
            "ensemble": f"{ens['method']} vote, k={ens['chosen_k']}",
            "ensemble_val_acc": f"{100 * ens['val_accuracy']:.2f}%",
            "ensemble_test_acc": f"{100 * ens['test_accuracy']:.2f}%",
            "report": pub.get("note", "-"),
            "single_test_acc_mean": float(np.mean(test)), "ensemble_test_acc_value": ens["test_accuracy"],
        })
    header = ["experiment", "seeds", "single model, val", "single model, test",
              "ensemble (chosen on val)", "ensemble, val", "ensemble, test", "the report"]
    keys = ["experiment", "seeds", "single_val_acc", "single_test_acc", "ensemble",
            "ensemble_val_acc", "ensemble_test_acc", "report"]
    lines = ["# Summary", "",
             "Single-model accuracy is mean ± standard deviation over seeds. The ensemble size "
             "is chosen on the validation split; its test accuracy is read once.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    write_text(out_md, "\n".join(lines) + "\n")
    csv_keys = ["experiment", "seeds", "single_test_acc_mean", "ensemble", "ensemble_test_acc_value"]
    body = [",".join(csv_keys)] + [",".join(f'"{r[k]}"' if k == "ensemble" else str(r[k])
                                            for k in csv_keys) for r in rows]
    write_text(out_csv, "\n".join(body) + "\n")
