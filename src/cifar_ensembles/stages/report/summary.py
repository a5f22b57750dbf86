"""summary.md and summary.csv: the tables a reader scans first, from the ensemble, shift,
diversity and comparison files, with every figure linked beside its caption."""

from __future__ import annotations

import csv
import io

import numpy as np

from ...config.spec import PublishedSpec
from ...files.atomic import write_text
from ...files.ensemble_summary import Comparisons, EnsembleSummary
from ...files.shift_summary import DiversitySummary, ShiftSummary
from ...transforms.corruptions import SEVERITIES
from .figures import cost_table
from .frontier_figures import frontier_lines
from .ood_figures import ood_figure_lines, ood_lines, selective_lines


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
                  shift: dict | None = None, diversity: dict | None = None, ood: dict | None = None,
                  selective: dict | None = None, frontier=None, methods: dict | None = None) -> None:
    """summary.md (tables a reader can scan) and summary.csv (one row per experiment, numbers);
    `shift`, `diversity`, `ood` and `selective` ({experiment: json}) add their sections when given,
    `frontier` (frontier.json) with `methods` ({experiment: methods.json}) the cost section."""
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
    lines += ood_lines(ood or {}) + selective_lines(selective or {})
    lines += frontier_lines(frontier, methods or {})
    lines += _figure_lines(list(summaries), bool(shift))
    lines += ood_figure_lines(list(summaries), bool(ood), bool(selective))
    write_text(out_md, "\n".join(lines) + "\n")
    write_text(out_csv, _csv_text([_csv_row(n, s, costs[n], published.get(n)) for n, s in summaries.items()]))


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
