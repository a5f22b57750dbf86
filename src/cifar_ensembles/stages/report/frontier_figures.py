"""The accuracy-cost frontier: frontier.png (test accuracy, NLL and ECE against training cost,
every method of every experiment, the Pareto front drawn through) and its summary.md section
(the best method at each training budget, and what every method buys)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

from ...analysis.methods import VARIANTS, best_by_budget  # noqa: E402
from ...files.frontier_summary import FRONT_METRICS, Frontier, MethodsSummary  # noqa: E402
from .plotting import PALETTE, save_figure, style_axes  # noqa: E402

MARKERS = {"single": "o", "single_tta": "D", "swa": "s", "snapshot_ensemble": "^",
           "deep_ensemble": "o", "deep_ensemble_tta": "D", "deep_ensemble_swa": "s",
           "deep_snapshot_ensemble": "^"}
LABELS = {"single": "single", "single_tta": "single + TTA", "swa": "SWA",
          "snapshot_ensemble": "snapshot ensemble", "deep_ensemble": "deep ensemble (k seeds)",
          "deep_ensemble_tta": "deep ensemble + TTA", "deep_ensemble_swa": "deep ensemble of SWA",
          "deep_snapshot_ensemble": "deep ensemble of snapshots"}
POOLED_FROM = {pooled: one for one, pooled in VARIANTS.values()}
AXES = {"accuracy": ("test accuracy (%)", 100.0), "nll": ("test NLL", 1.0), "ece": ("test ECE (%)", 100.0)}


def _scale(points) -> float:
    """The cheapest single model's training passes: the unit of the cost axis."""
    singles = [p.train_passes for p in points if p.seeds == 1]
    return float(min(singles or [p.train_passes for p in points]))


def plot_frontier(frontier_json, out_paths, dpi: int) -> None:
    frontier = Frontier.load(frontier_json)
    points = frontier.points
    unit = _scale(points)
    experiments = list(dict.fromkeys(p.experiment for p in points))
    color = {e: PALETTE[i % len(PALETTE)] for i, e in enumerate(experiments)}
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.2), dpi=dpi)
    for ax, (metric, (label, scale)) in zip(axes, AXES.items()):
        for e in experiments:
            for method in MARKERS:
                own = sorted((p for p in points if p.experiment == e and p.method == method),
                             key=lambda p: p.train_passes)
                if not own:
                    continue
                first = [p for p in points if p.experiment == e and p.method == POOLED_FROM.get(method)]
                own = first + own  # a pooled method's line of k = 1..n starts at its method of one run
                x = [p.train_passes / unit for p in own]
                y = [getattr(p, f"test_{metric}") * scale for p in own]
                pooled = method.startswith("deep")
                ax.plot(x, y, marker=MARKERS[method], linestyle="-" if pooled else "none",
                        color=color[e], alpha=0.85, markersize=6 if pooled else 8,
                        markerfacecolor=color[e] if not pooled else "white", linewidth=1,
                        markevery=slice(len(first), None))
        front = sorted((p for p in points if p.pareto[metric]), key=lambda p: p.train_passes)
        fx = [p.train_passes / unit for p in front]
        fy = [getattr(p, f"test_{metric}") * scale for p in front]
        ax.step(fx, fy, where="post", color="black", linewidth=1.6, alpha=0.6, zorder=0)
        ax.scatter(fx, fy, s=160, facecolors="none", edgecolors="black", linewidths=1.2, zorder=3)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(sorted({p.train_passes / unit for p in points}))
        style_axes(ax, "training cost (x one run of the cheapest single model)", label)
        better = "higher" if FRONT_METRICS[metric] else "lower"
        ax.set_title(f"{label.split(' (')[0]}: {better} is better")
    handles = [plt.Line2D([], [], color=color[e], linewidth=3, label=e) for e in experiments]
    handles += [plt.Line2D([], [], color="gray", marker=MARKERS[m], label=LABELS[m],
                           linestyle="-" if m.startswith("deep") else "none",
                           markerfacecolor="white" if m.startswith("deep") else "gray")
                for m in MARKERS if any(p.method == m for p in points)]
    handles.append(plt.Line2D([], [], color="black", marker="o", markerfacecolor="none", markersize=11,
                              label="Pareto front (circled)"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), frameon=False,
               bbox_to_anchor=(0.5, -0.08))
    fig.suptitle("What each way of spending training compute buys (test split)")
    fig.tight_layout()
    save_figure(fig, out_paths)


def _pct(value: float) -> str:
    return f"{100 * value:.2f}%"


def _name(point) -> str:
    return f"{point.experiment}/{point.method}, k={point.seeds}"


def frontier_lines(frontier_json, methods_jsons: dict) -> list[str]:
    """The best method at each budget (the front by accuracy, with NLL and ECE beside), then
    every method of every experiment with what the other stages measured of it."""
    if not frontier_json:
        return []
    points = Frontier.load(frontier_json).points
    unit = _scale(points)
    lines = ["", "## Accuracy against cost (every method, test split)", "",
             "Training cost counts forward-backward passes over images of every run a method needs "
             "(SAM/ASAM count two per step), in units of the cheapest single model's run; prediction "
             "cost counts forward passes per image (members x test-time views). Each row is the best "
             "test accuracy any method reaches within that training budget (the Pareto front of "
             "`results/report/frontier.png`); the best NLL and ECE within the same budget beside it.", "",
             "| training budget | best accuracy | method | seeds x members | predict passes | "
             "best NLL within budget | best ECE within budget |", "|---|---|---|---|---|---|---|"]
    costs = [p.train_passes for p in points]
    for i in best_by_budget(costs, [p.test_accuracy for p in points], True):
        p = points[i]
        within = [q for q in points if q.train_passes <= p.train_passes]
        best_nll = min(within, key=lambda q: (q.test_nll, q.train_passes))
        best_ece = min(within, key=lambda q: (q.test_ece, q.train_passes))
        lines.append(f"| {p.train_passes / unit:.3g}x ({p.train_seconds:.0f} s) | {_pct(p.test_accuracy)} "
                     f"[{_pct(p.test_ci[0])}, {_pct(p.test_ci[1])}] | {p.experiment}/{p.method} | "
                     f"{p.seeds} x {p.members // p.seeds} | {p.predict_passes} | "
                     f"{best_nll.test_nll:.4f} ({_name(best_nll)}) | "
                     f"{_pct(best_ece.test_ece)} ({_name(best_ece)}) |")
    lines += ["", "Every method of one run (mean over its seeds) and the deep ensembles of all seeds: ECE "
              "after temperature scaling (fitted on validation), mean accuracy over the corrupted sets, "
              "AUROC of the predictive entropy per OOD set, and the exact McNemar test against the first "
              "single model (b: images only the method gets right, c: only the single model).", "",
              "| experiment | method | k | test acc | NLL | ECE | ECE (T) | shift acc | OOD AUROC "
              "| b / c, p |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for experiment, path in methods_jsons.items():
        summary = MethodsSummary.load(path)
        n = len(summary.seeds)
        for m in summary.methods:
            if m.seeds not in (1, n):
                continue
            ood = ", ".join(f"{s} {v:.3f}" for s, v in m.ood_auroc.items()) or "-"
            shift = _pct(m.shift.accuracy) if m.shift else "-"
            lines.append(f"| {experiment} | {m.method} | {m.seeds} | {_pct(m.test_accuracy)} | "
                         f"{m.test_nll:.4f} | {_pct(m.test_ece)} | {_pct(m.test_ece_temperature)} | "
                         f"{shift} | {ood} | "
                         f"{m.vs_single.b} / {m.vs_single.c}, {m.vs_single.p_value:.2g} |")
    return lines
