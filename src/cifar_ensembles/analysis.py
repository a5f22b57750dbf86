"""The ensemble and comparison steps of the workflow: from prediction files to numbers.

Per experiment: accuracy vs ensemble size (first k seeds, as the report did; random
member subsets; greedy selection on validation), the size chosen on validation and read
once on test, calibration before and after temperature scaling fitted on validation, and
bootstrap confidence intervals. Across experiments: paired McNemar tests on shared seeds.
"""

from __future__ import annotations

import io
import itertools

import numpy as np

from .atomic import write_json, write_text
from .ensemble import choose_size, first_k_accuracy, greedy_selection, hard_vote, soft_vote, subset_curve
from .errors import UserError
from .metrics import bootstrap_ci, bootstrap_indices, calibration, fit_temperature, temperature_scale


def read_labels(path) -> tuple[np.ndarray, np.ndarray]:
    """Only the validation and test labels of data.npz (np.load reads arrays lazily, per key)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return npz["y_val"], npz["y_test"]
    except Exception as err:  # zip, pickle and key errors alike mean a damaged file
        raise UserError(f"{path}: not a prepared dataset: {err}") from None


def load_members(paths, n_images: int, where: str) -> np.ndarray:
    """Stack per-member probability files into (members, N, C), checking every shape."""
    arrays = []
    for path in paths:
        try:
            a = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise UserError(f"{path}: not a probability array: {err}") from None
        if a.ndim != 2 or a.shape[0] != n_images:
            raise UserError(f"{path}: expected {n_images} x classes probabilities for {where}, "
                            f"got shape {a.shape}")
        if arrays and a.shape != arrays[0].shape:
            raise UserError(f"{path}: shape {a.shape} differs from {paths[0]} ({arrays[0].shape})")
        arrays.append(a)
    return np.stack(arrays)


def _calibrated(val_probs, val_labels, test_probs, test_labels, n_bins) -> dict:
    """Calibration on test before and after a temperature fitted on validation."""
    t = fit_temperature(val_probs, val_labels)
    return {"temperature": t, "before": calibration(test_probs, test_labels, n_bins),
            "after": calibration(temperature_scale(test_probs, t), test_labels, n_bins)}


def _ci(correct, indices) -> list[float]:
    return list(bootstrap_ci(correct, indices))


def analyse(seeds, val, y_val, test, y_test, method="soft", max_subsets=500, subset_seed=0,
            bootstrap=1000, bootstrap_seed=0, ece_bins=15) -> dict:
    """Everything the report says about one experiment's members, as plain JSON data."""
    vote = soft_vote if method == "soft" else hard_vote
    first_k = {"val": first_k_accuracy(val, y_val), "test": first_k_accuracy(test, y_test)}
    k = choose_size(first_k["val"][method])
    boot = bootstrap_indices(len(y_test), bootstrap, bootstrap_seed)

    singles = []
    for i, seed in enumerate(seeds):
        correct = test[i].argmax(-1) == y_test
        singles.append({"seed": int(seed), "val_accuracy": float(np.mean(val[i].argmax(-1) == y_val)),
                        "test_accuracy": float(correct.mean()), "test_ci": _ci(correct, boot),
                        "calibration": _calibrated(val[i], y_val, test[i], y_test, ece_bins)})
    best = max(range(len(seeds)), key=lambda i: (singles[i]["val_accuracy"], -i))

    chosen_correct = vote(test[:k]) == y_test
    mean_val, mean_test = val[:k].mean(0), test[:k].mean(0)
    order, greedy_nll = greedy_selection(val, y_val)
    g = int(np.argmin(greedy_nll)) + 1
    greedy_members = sorted(order[:g])
    greedy_correct = soft_vote(test[greedy_members]) == y_test
    all_single_correct = (test.argmax(-1) == y_test[None, :]).mean(0)  # per image: share of seeds right
    return {
        "seeds": [int(s) for s in seeds], "method": method, "chosen_on": "val",
        "chosen_k": k, "members": [int(s) for s in seeds[:k]],
        "val_accuracy": float(np.mean(vote(val[:k]) == y_val)),
        "test_accuracy": float(chosen_correct.mean()), "test_ci": _ci(chosen_correct, boot),
        "calibration": _calibrated(mean_val, y_val, mean_test, y_test, ece_bins),
        "first_k": {split: {v: curve.tolist() for v, curve in c.items()} for split, c in first_k.items()},
        "subsets": {"val": subset_curve(val, y_val, max_subsets, subset_seed),
                    "test": subset_curve(test, y_test, max_subsets, subset_seed)},
        "greedy": {"order": [int(seeds[i]) for i in order], "val_nll": greedy_nll, "chosen_size": g,
                   "members": [int(seeds[i]) for i in greedy_members],
                   "val_accuracy": float(np.mean(soft_vote(val[greedy_members]) == y_val)),
                   "test_accuracy": float(greedy_correct.mean()), "test_ci": _ci(greedy_correct, boot)},
        "singles": singles, "best_single_seed": int(seeds[best]),
        "single_test_accuracy": {"mean": float(np.mean([s["test_accuracy"] for s in singles])),
                                 "std": float(np.std([s["test_accuracy"] for s in singles],
                                                     ddof=1 if len(singles) > 1 else 0)),
                                 "min": float(min(s["test_accuracy"] for s in singles)),
                                 "max": float(max(s["test_accuracy"] for s in singles)),
                                 "ci_of_mean": _ci(all_single_correct, boot)},
        "bootstrap": {"resamples": bootstrap, "seed": bootstrap_seed, "level": 0.95},
    }


def first_k_csv(first_k: dict) -> str:
    buf = io.StringIO()
    buf.write("k,val_hard,val_soft,test_hard,test_soft\n")
    for i in range(len(first_k["val"]["soft"])):
        buf.write(f"{i + 1},{first_k['val']['hard'][i]:.6f},{first_k['val']['soft'][i]:.6f},"
                  f"{first_k['test']['hard'][i]:.6f},{first_k['test']['soft'][i]:.6f}\n")
    return buf.getvalue()


def ensemble_to_files(data_path, seeds, val_paths, test_paths, method, csv_path, json_path,
                      **options) -> dict:
    if not (len(seeds) == len(val_paths) == len(test_paths)):
        raise UserError("ensemble: need one val and one test prediction file per seed")
    y_val, y_test = read_labels(data_path)
    val = load_members(val_paths, len(y_val), "the validation split")
    test = load_members(test_paths, len(y_test), "the test split")
    if val.shape[2] != test.shape[2]:
        raise UserError(f"{test_paths[0]}: {test.shape[2]} classes, but {val_paths[0]} has {val.shape[2]}")
    summary = analyse(list(seeds), val, y_val, test, y_test, method, **options)
    write_text(csv_path, first_k_csv(summary["first_k"]))
    write_json(json_path, summary)
    return summary


def compare_to_files(experiments: dict, data_path, out_json) -> dict:
    """Paired McNemar tests for every pair of experiments that share seeds.

    `experiments` maps a name to {seed: probs_test path}. For each shared seed the two
    single models are compared; the soft-vote ensembles of all shared seeds are compared too.
    """
    from .metrics import mcnemar

    _, y_test = read_labels(data_path)
    results = []
    for (a, files_a), (b, files_b) in itertools.combinations(experiments.items(), 2):
        shared = sorted(set(files_a) & set(files_b), key=int)
        if not shared:
            continue
        pa = load_members([files_a[s] for s in shared], len(y_test), f"experiment {a}")
        pb = load_members([files_b[s] for s in shared], len(y_test), f"experiment {b}")
        per_seed = []
        for i, seed in enumerate(shared):
            ca, cb = pa[i].argmax(-1) == y_test, pb[i].argmax(-1) == y_test
            per_seed.append({"seed": int(seed), "accuracy_a": float(ca.mean()),
                             "accuracy_b": float(cb.mean()), **mcnemar(ca, cb)})
        ea, eb = soft_vote(pa) == y_test, soft_vote(pb) == y_test
        results.append({"a": a, "b": b, "shared_seeds": [int(s) for s in shared], "per_seed": per_seed,
                        "ensemble": {"accuracy_a": float(ea.mean()), "accuracy_b": float(eb.mean()),
                                     **mcnemar(ea, eb)},
                        "mean_single_difference": float(np.mean([r["accuracy_a"] - r["accuracy_b"]
                                                                 for r in per_seed]))})
    write_json(out_json, {"test": "exact McNemar (two-sided binomial on discordant pairs)",
                          "pairs": results})
    return {"pairs": results}
