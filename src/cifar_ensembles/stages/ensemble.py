"""The ensemble and compare stages: from prediction files to numbers.

Per experiment: accuracy vs ensemble size (first k seeds, as the report did; random
member subsets; greedy selection on validation), the size chosen on validation and read
once on test, calibration before and after temperature scaling fitted on validation, and
bootstrap confidence intervals. Across experiments: paired McNemar tests on shared seeds.
"""

from __future__ import annotations

import io
import itertools

import numpy as np

from ..analysis.metrics import (
    bootstrap_ci,
    bootstrap_indices,
    calibration,
    fit_temperature,
    mcnemar,
    temperature_scale,
)
from ..analysis.votes import (
    VOTES,
    choose_size,
    first_k_accuracy,
    greedy_selection,
    soft_vote,
    subset_curve,
)
from ..config.spec import EnsembleSpec
from ..errors import UserError
from ..files import splits
from ..files.arrays import load_members, read_labels
from ..files.atomic import all_or_none, write_text
from ..files.ensemble_summary import (
    Bootstrap,
    Calibrated,
    Calibration,
    Comparisons,
    EnsembleComparison,
    EnsembleSummary,
    Greedy,
    PairComparison,
    SeedComparison,
    SingleModel,
    SingleStats,
    Spread,
    SubsetCurves,
    VoteCurves,
)


def _calibrated(val_probs, val_labels, test_probs, test_labels, n_bins) -> Calibrated:
    """Calibration on test before and after a temperature fitted on validation."""
    t = fit_temperature(val_probs, val_labels)
    return Calibrated(temperature=t, before=Calibration(**calibration(test_probs, test_labels, n_bins)),
                      after=Calibration(**calibration(temperature_scale(test_probs, t), test_labels, n_bins)))


def _spread(curves: dict) -> Spread:
    return Spread(mean=curves["mean"], std=curves["std"], min=curves["min"], max=curves["max"])


def _subset_curves(probs, labels, spec: EnsembleSpec) -> SubsetCurves:
    c = subset_curve(probs, labels, spec.max_subsets, spec.subset_seed)
    return SubsetCurves(soft=_spread(c["soft"]), hard=_spread(c["hard"]), subsets=c["subsets"],
                        exhaustive=c["exhaustive"])


def _singles(seeds, val, y_val, test, y_test, boot, ece_bins) -> list[SingleModel]:
    singles = []
    for i, seed in enumerate(seeds):
        correct = test[i].argmax(-1) == y_test
        singles.append(SingleModel(seed=int(seed), val_accuracy=float(np.mean(val[i].argmax(-1) == y_val)),
                                   test_accuracy=float(correct.mean()), test_ci=bootstrap_ci(correct, boot),
                                   calibration=_calibrated(val[i], y_val, test[i], y_test, ece_bins)))
    return singles


def _greedy(seeds, val, y_val, test, y_test, boot) -> Greedy:
    order, val_nll = greedy_selection(val, y_val)
    size = int(np.argmin(val_nll)) + 1
    members = sorted(order[:size])
    correct = soft_vote(test[members]) == y_test
    return Greedy(order=[int(seeds[i]) for i in order], val_nll=val_nll, chosen_size=size,
                  members=[int(seeds[i]) for i in members],
                  val_accuracy=float(np.mean(soft_vote(val[members]) == y_val)),
                  test_accuracy=float(correct.mean()), test_ci=bootstrap_ci(correct, boot))


def _single_stats(singles: list[SingleModel], test, y_test, boot) -> SingleStats:
    accuracies = [s.test_accuracy for s in singles]
    share_right = (test.argmax(-1) == y_test[None, :]).mean(0)  # per image: share of seeds right
    return SingleStats(mean=float(np.mean(accuracies)),
                       std=float(np.std(accuracies, ddof=1 if len(accuracies) > 1 else 0)),
                       min=float(min(accuracies)), max=float(max(accuracies)),
                       ci_of_mean=bootstrap_ci(share_right, boot))


def analyse(seeds, val, y_val, test, y_test, spec: EnsembleSpec) -> EnsembleSummary:
    """Everything the report says about one experiment's members."""
    vote = VOTES[spec.method]
    first_k = {"val": first_k_accuracy(val, y_val), "test": first_k_accuracy(test, y_test)}
    k = choose_size(first_k["val"][spec.method])
    boot = bootstrap_indices(len(y_test), spec.bootstrap, spec.bootstrap_seed)
    singles = _singles(seeds, val, y_val, test, y_test, boot, spec.ece_bins)
    best = max(range(len(seeds)), key=lambda i: (singles[i].val_accuracy, -i))
    chosen_correct = vote(test[:k]) == y_test
    return EnsembleSummary(
        seeds=[int(s) for s in seeds], method=spec.method, chosen_on="val", chosen_k=k,
        members=[int(s) for s in seeds[:k]], val_accuracy=float(np.mean(vote(val[:k]) == y_val)),
        test_accuracy=float(chosen_correct.mean()), test_ci=bootstrap_ci(chosen_correct, boot),
        calibration=_calibrated(val[:k].mean(0), y_val, test[:k].mean(0), y_test, spec.ece_bins),
        first_k={split: VoteCurves(hard=c["hard"].tolist(), soft=c["soft"].tolist())
                 for split, c in first_k.items()},
        subsets={"val": _subset_curves(val, y_val, spec), "test": _subset_curves(test, y_test, spec)},
        greedy=_greedy(seeds, val, y_val, test, y_test, boot), singles=singles,
        best_single_seed=int(seeds[best]), single_test_accuracy=_single_stats(singles, test, y_test, boot),
        bootstrap=Bootstrap(resamples=spec.bootstrap, seed=spec.bootstrap_seed, level=0.95))


def first_k_csv(first_k: dict[str, VoteCurves]) -> str:
    buf = io.StringIO()
    buf.write("k,val_hard,val_soft,test_hard,test_soft\n")
    for i in range(len(first_k["val"].soft)):
        buf.write(f"{i + 1},{first_k['val'].hard[i]:.6f},{first_k['val'].soft[i]:.6f},"
                  f"{first_k['test'].hard[i]:.6f},{first_k['test'].soft[i]:.6f}\n")
    return buf.getvalue()


def ensemble_to_files(data_path, seeds, val_paths, test_paths, spec: EnsembleSpec, csv_path,
                      json_path) -> EnsembleSummary:
    if not (len(seeds) == len(val_paths) == len(test_paths)):
        raise UserError("ensemble: need one val and one test prediction file per seed")
    data = splits.load(data_path, ("y_val", "y_test", "classes"))
    y_val, y_test, n_classes = data["y_val"], data["y_test"], len(data["classes"])
    val = load_members(val_paths, len(y_val), "the validation split")
    test = load_members(test_paths, len(y_test), "the test split")
    if val.shape[2] != n_classes:
        raise UserError(f"{val_paths[0]}: {val.shape[2]} classes, but {data_path} has {n_classes}")
    if test.shape[2] != val.shape[2]:
        raise UserError(f"{test_paths[0]}: {test.shape[2]} classes, but {val_paths[0]} has {val.shape[2]}")
    summary = analyse(list(seeds), val, y_val, test, y_test, spec)
    with all_or_none(csv_path, json_path):
        write_text(csv_path, first_k_csv(summary.first_k))
        summary.save(json_path)
    return summary


def compare_to_files(experiments: dict, data_path, out_json) -> Comparisons:
    """Paired McNemar tests for every pair of experiments that share seeds.

    `experiments` maps a name to {seed: probs_test path}. For each shared seed the two
    single models are compared; the soft-vote ensembles of all shared seeds are compared too.
    """
    _, y_test = read_labels(data_path)
    pairs = []
    for (a, files_a), (b, files_b) in itertools.combinations(experiments.items(), 2):
        shared = sorted(set(files_a) & set(files_b), key=int)
        if not shared:
            continue
        pa = load_members([files_a[s] for s in shared], len(y_test), f"experiment {a}")
        pb = load_members([files_b[s] for s in shared], len(y_test), f"experiment {b}")
        per_seed = []
        for i, seed in enumerate(shared):
            ca, cb = pa[i].argmax(-1) == y_test, pb[i].argmax(-1) == y_test
            per_seed.append(SeedComparison(seed=int(seed), accuracy_a=float(ca.mean()),
                                           accuracy_b=float(cb.mean()), **mcnemar(ca, cb)))
        ea, eb = soft_vote(pa) == y_test, soft_vote(pb) == y_test
        pairs.append(PairComparison(
            a=a, b=b, shared_seeds=[int(s) for s in shared], per_seed=per_seed,
            ensemble=EnsembleComparison(accuracy_a=float(ea.mean()), accuracy_b=float(eb.mean()),
                                        **mcnemar(ea, eb)),
            mean_single_difference=float(np.mean([r.accuracy_a - r.accuracy_b for r in per_seed]))))
    comparisons = Comparisons(test="exact McNemar (two-sided binomial on discordant pairs)", pairs=pairs)
    comparisons.save(out_json)
    return comparisons
