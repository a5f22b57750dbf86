"""The predict stages: class probabilities, with accuracy and NLL, of a final model on one
split, of an extra member (snapshot, SWA, TTA) on val and test, and of an experiment's final
models or extra members on one corrupted or OOD set."""

from __future__ import annotations

import os

import numpy as np
import torch

from ..analysis.metrics import accuracy, nll
from ..compute.device import resolve_device
from ..compute.inference import predict_logits, softmax_np
from ..config.spec import MemberSpec, PredictSpec, TtaSpec
from ..errors import UserError
from ..files import splits
from ..files.arrays import load_shift_set
from ..files.atomic import all_or_none, save_npy, write_json
from ..files.records import DamagedFile
from ..files.training_run import ModelRecord, load_member
from ..models import build_model
from ..transforms.tta import View, tta_views

# Predictions are computed in float32 whatever precision training used: the probabilities
# are then the network's, not bf16's rounding of them, and cost one pass per split and view.
PREDICT_PRECISION = "fp32"


def load_model(path: str | os.PathLike, member: str | None = None) -> tuple[torch.nn.Module, ModelRecord]:
    """Rebuild the network saved by training (model.pt, or `member` of a members.pt); a damaged
    file is named in one line."""
    record = ModelRecord.load(path) if member is None else load_member(path, member)
    model = build_model(record.model, record.num_classes, record.in_channels)
    try:
        model.load_state_dict(record.state_dict)
    except RuntimeError as err:
        raise DamagedFile(path, f"weights do not fit the saved architecture "
                                f"({str(err).splitlines()[0]})") from None
    return model, record


def _probabilities(model_path, model: torch.nn.Module, record: ModelRecord, images: np.ndarray,
                   spec: PredictSpec, views: tuple[View, ...] | None = None) -> np.ndarray:
    """The model's class probabilities (float32) on images (N x H x W x C uint8), normalized
    as in training (with test-time `views`: their mean); non-finite ones (weights that are
    not finite) are an error."""
    device = resolve_device(spec.device)
    logits = predict_logits(model.to(device), images, np.asarray(record.mean, np.float32),
                            np.asarray(record.std, np.float32), device, spec.batch_size, PREDICT_PRECISION,
                            views=views)
    probs = softmax_np(logits)
    if not np.all(np.isfinite(probs)):
        raise UserError(f"{model_path}: the model predicts non-finite probabilities (its weights are not "
                        "finite); retrain it")
    return probs


def predict_to_files(model_path, data_path, split: str, probs_path, metrics_path, spec: PredictSpec,
                     threads: int) -> dict:
    torch.set_num_threads(max(int(threads), 1))
    model, record = load_model(model_path)
    data = splits.load(data_path, (f"x_{split}", f"y_{split}", "classes"))
    images, labels = data[f"x_{split}"], data[f"y_{split}"]
    if images.shape[-1] != record.in_channels or len(data["classes"]) != record.num_classes:
        raise UserError(f"{model_path}: model was trained on other data than {data_path}")
    probs = _probabilities(model_path, model, record, images, spec)
    metrics = {"split": split, "images": int(len(labels)), "accuracy": accuracy(probs, labels),
               "nll": nll(probs, labels)}
    with all_or_none(probs_path, metrics_path):
        save_npy(probs_path, probs)
        write_json(metrics_path, metrics)
    return metrics


def predict_member_to_files(member: MemberSpec, tta: TtaSpec | None, data_path, probs_paths: dict[str, str],
                            metrics_path, spec: PredictSpec, threads: int) -> dict:
    """One extra member (a snapshot, the SWA average, or a final model with test-time
    augmentation) on the validation and test splits -> probs per split and one metrics.json."""
    torch.set_num_threads(max(int(threads), 1))
    model, record = load_model(member.weights, member.member)
    keys = [k for split in probs_paths for k in (f"x_{split}", f"y_{split}")]
    data = splits.load(data_path, (*keys, "classes"))
    if data[keys[0]].shape[-1] != record.in_channels or len(data["classes"]) != record.num_classes:
        raise UserError(f"{member.weights}: model was trained on other data than {data_path}")
    views = _views(member, tta)
    metrics, probs = {"member": member.member or "model", "views": len(views or (None,))}, {}
    for split, path in probs_paths.items():
        probs[path] = _probabilities(member.weights, model, record, data[f"x_{split}"], spec, views)
        labels = data[f"y_{split}"]
        metrics[split] = {"images": int(len(labels)), "accuracy": accuracy(probs[path], labels),
                          "nll": nll(probs[path], labels)}
    with all_or_none(*probs, metrics_path):
        for path, p in probs.items():
            save_npy(path, p)
        write_json(metrics_path, metrics)
    return metrics


def _views(member: MemberSpec, tta: TtaSpec | None) -> tuple[View, ...] | None:
    if not member.tta:
        return None
    if tta is None or not tta.enabled:
        raise UserError(f"{member.weights}: a TTA member needs the tta spec with enabled: true")
    return tta_views(tta)


def _check_channels(member: MemberSpec, record: ModelRecord, images: np.ndarray, set_path) -> None:
    if images.shape[-1] != record.in_channels:
        raise UserError(f"{member.weights}: the model takes {record.in_channels} channels, {set_path} "
                        f"has {images.shape[-1]}; rebuild it with: snakemake --forcerun {set_path}")


def _as_member(model: str | os.PathLike | MemberSpec) -> MemberSpec:
    """A final model's path as a member (its model.pt, no TTA), or the member itself."""
    return model if isinstance(model, MemberSpec) else MemberSpec(weights=str(model), member=None, tta=False)


def _members_on(models: list, images: np.ndarray, set_path, spec: PredictSpec,
                tta: TtaSpec | None) -> np.ndarray:
    """Every member's probabilities on `images` (N x H x W x C of the set at `set_path`):
    members x N x C."""
    out = []
    for member in map(_as_member, models):
        model, record = load_model(member.weights, member.member)
        _check_channels(member, record, images, set_path)
        out.append(_probabilities(member.weights, model, record, images, spec, _views(member, tta)))
    return np.stack(out)


def predict_shift(models: list, set_path, out, spec: PredictSpec, threads: int,
                  tta: TtaSpec | None = None) -> np.ndarray:
    """One experiment's members on one corrupted set -> members x 5 x N x C probabilities in `out`
    (one job per experiment and corruption: retraining one experiment repredicts only its own).
    `models`: model.pt paths (the final models), or MemberSpecs (its extra members, another job)."""
    torch.set_num_threads(max(int(threads), 1))
    x = load_shift_set(set_path)["x"]  # severities x N x H x W x C
    probs = _members_on(models, x.reshape(-1, *x.shape[2:]), set_path, spec, tta)
    probs = probs.reshape(len(models), *x.shape[:2], -1)
    save_npy(out, probs)
    return probs


def predict_ood(models: list, set_path, out, spec: PredictSpec, threads: int,
                tta: TtaSpec | None = None) -> np.ndarray:
    """One experiment's members on one OOD set -> members x N x C probabilities in `out` (one job
    per experiment and OOD set: a new set predicts only itself); `models` as predict_shift's."""
    from ..files.ood_data import load_ood_set

    torch.set_num_threads(max(int(threads), 1))
    probs = _members_on(models, load_ood_set(set_path), set_path, spec, tta)  # the test split's shape
    save_npy(out, probs)
    return probs
