"""Class probabilities of one trained model on one split, plus its accuracy and NLL."""

from __future__ import annotations

import os

import numpy as np
import torch

from . import prepare
from .atomic import save_npy, write_json
from .errors import UserError
from .inference import predict_logits, resolve_device, softmax_np
from .metrics import accuracy, nll
from .models import build_model
from .train import MODEL_FORMAT


def load_model(path: str | os.PathLike) -> tuple[torch.nn.Module, dict]:
    """Rebuild the network saved by training; a damaged file is named in one line."""
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"{path}: not a readable model file ({err.__class__.__name__})") from None
    if not isinstance(record, dict) or record.get("format") != MODEL_FORMAT:
        raise UserError(f"{path}: not a cifar-ensembles model file")
    model = build_model(record["model"], record["num_classes"], record["in_channels"])
    try:
        model.load_state_dict(record["state_dict"])
    except RuntimeError as err:
        raise UserError(f"{path}: weights do not fit the saved architecture: "
                        f"{str(err).splitlines()[0]}") from None
    return model, record


def predict_to_files(model_path, data_path, split: str, probs_path, metrics_path,
                     batch_size: int = 512, device: str = "auto", threads: int = 1) -> dict:
    torch.set_num_threads(max(int(threads), 1))
    dev = resolve_device(device)
    model, record = load_model(model_path)
    data = prepare.load(data_path)
    images, labels = data[f"x_{split}"], data[f"y_{split}"]
    if images.shape[-1] != record["in_channels"] or len(data["classes"]) != record["num_classes"]:
        raise UserError(f"{model_path}: model was trained on other data than {data_path}")
    logits = predict_logits(model.to(dev), images, np.asarray(record["mean"], np.float32),
                            np.asarray(record["std"], np.float32), dev, batch_size)
    probs = softmax_np(logits)
    metrics = {"split": split, "images": int(len(labels)), "accuracy": accuracy(probs, labels),
               "nll": nll(probs, labels)}
    save_npy(probs_path, probs.astype(np.float32))
    write_json(metrics_path, metrics)
    return metrics
