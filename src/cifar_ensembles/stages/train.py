"""The train stage: one model for one (experiment, seed) -> model.pt, history.csv, run.yaml."""

from __future__ import annotations

import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from .. import __version__
from ..config.convert import to_data
from ..config.spec import RuntimeSpec, TrainingSpec
from ..files.atomic import all_or_none, write_text
from ..files.training_run import save_members, write_history
from ..training import Trainer


def versions() -> dict:
    import torchvision

    out = {"python": platform.python_version(), "cifar_ensembles": __version__,
           "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
           "numpy": np.__version__}
    try:
        import albumentations

        out["albumentations"] = albumentations.__version__
    except ImportError:
        pass
    return out


def train_to_files(spec: TrainingSpec, runtime: RuntimeSpec, data: dict, seed: int,
                   out_dir: str | os.PathLike, checkpoint: str | os.PathLike | None, threads: int,
                   weights_file: str | None = None, log=None) -> Path:
    """Train, then write model.pt, history.csv and run.yaml into `out_dir` (atomically), and
    members.pt when the spec keeps snapshots or an SWA average."""
    out_dir = Path(out_dir)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    trainer = Trainer(spec, runtime, data, seed, threads, weights_file, log)
    if checkpoint is not None:  # first: a damaged checkpoint ends the job before anything is logged
        trainer.try_resume(checkpoint)
    trainer.log(f"training seed {seed} on {trainer.device} ({threads} threads): "
                f"{len(data['y_train'])} images, {trainer.steps_per_epoch} steps/epoch, "
                f"{spec.epochs} epochs; " + ", ".join(f"{k} {v}" for k, v in trainer.effective().items()
                                                      if k != "device"))
    history = trainer.fit(checkpoint, resume=False)
    members = trainer.member_records()
    keeps = spec.keeps_members
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = ["model.pt", "history.csv", "run.yaml"] + (["members.pt"] if keeps else [])
    # all or none: a failed write (a full disk) leaves no model.pt that looks finished
    with all_or_none(*(out_dir / name for name in outputs)):
        trainer.model_record().save(out_dir / "model.pt")
        if keeps:
            save_members(out_dir / "members.pt", members)
        write_history(out_dir / "history.csv", history)
        train_seconds = sum(t["seconds"] for t in trainer.timing)
        wait_seconds = sum(t["data_wait_seconds"] for t in trainer.timing)
        wait_fraction = round(wait_seconds / train_seconds, 4) if train_seconds else None
        info = {"seed": seed, "device": str(trainer.device), "threads": threads,
                "started": started, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "train_images": int(len(data["y_train"])), "steps_per_epoch": trainer.steps_per_epoch,
                "final_weights": "ema" if trainer.ema is not None else "raw",
                "members": list(members),
                # device-independent cost: forward-backward passes over images (SAM/ASAM: two per step)
                "train_passes": spec.cost.train_passes(len(data["y_train"])),
                "effective": trainer.effective(),
                # the epochs this process finished (a resumed run counts only its own)
                "timing": {"train_seconds": round(train_seconds, 3),
                           "data_wait_seconds": round(wait_seconds, 3),
                           "data_wait_fraction": wait_fraction},
                "versions": versions(), "training": to_data(spec), "runtime": to_data(runtime)}
        if trainer.device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(trainer.device)
        write_text(out_dir / "run.yaml", yaml.safe_dump(info, sort_keys=False))
    if checkpoint is not None and Path(checkpoint).exists():
        Path(checkpoint).unlink()
    last = history[-1]
    if last.val_loss is not None and not math.isfinite(last.val_loss):
        trainer.log("warning: final validation loss is not finite")
    return out_dir
