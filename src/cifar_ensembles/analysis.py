"""The ensemble step of the workflow: load member predictions, vote, choose k on validation."""

from __future__ import annotations

import io

import numpy as np

from .atomic import write_json, write_text
from .ensemble import choose_size, first_k_accuracy, hard_vote, soft_vote
from .errors import UserError
from .metrics import accuracy


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


def ensemble_to_files(data_path, seeds, val_paths, test_paths, method, csv_path, json_path) -> dict:
    if not (len(seeds) == len(val_paths) == len(test_paths)):
        raise UserError("ensemble: need one val and one test prediction file per seed")
    y_val, y_test = read_labels(data_path)
    val = load_members(val_paths, len(y_val), "the validation split")
    test = load_members(test_paths, len(y_test), "the test split")
    curves = {"val": first_k_accuracy(val, y_val), "test": first_k_accuracy(test, y_test)}
    k = choose_size(curves["val"][method])
    vote = soft_vote if method == "soft" else hard_vote
    singles = [accuracy(p, y_test) for p in test]
    summary = {
        "seeds": list(seeds), "method": method, "chosen_k": k, "chosen_on": "val",
        "members": list(seeds[:k]),
        "val_accuracy": float(np.mean(vote(val[:k]) == y_val)),
        "test_accuracy": float(np.mean(vote(test[:k]) == y_test)),
        "all_members_test_accuracy": {"soft": float(curves["test"]["soft"][-1]),
                                      "hard": float(curves["test"]["hard"][-1])},
        "single_test_accuracy": {"mean": float(np.mean(singles)), "min": float(np.min(singles)),
                                 "max": float(np.max(singles))},
    }
    buf = io.StringIO()
    buf.write("k,val_hard,val_soft,test_hard,test_soft\n")
    for i in range(len(seeds)):
        buf.write(f"{i + 1},{curves['val']['hard'][i]:.6f},{curves['val']['soft'][i]:.6f},"
                  f"{curves['test']['hard'][i]:.6f},{curves['test']['soft'][i]:.6f}\n")
    write_text(csv_path, buf.getvalue())
    write_json(json_path, summary)
    return summary


def read_labels(path) -> tuple[np.ndarray, np.ndarray]:
    """Only the validation and test labels of data.npz (np.load reads arrays lazily, per key)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return npz["y_val"], npz["y_test"]
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{path}: not a prepared dataset: {err}") from None
