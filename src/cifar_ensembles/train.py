"""Train one model for one (experiment, seed): deterministic on CPU, resumable, preemptible.

All randomness derives from the seed: model init from torch's generator, data order and
augmentation from (seed, epoch, index). A checkpoint (model, optimizer, scheduler, EMA,
RNG state, position, history) is written after every epoch and on SIGTERM/SIGUSR1, to a
path Snakemake does not own; rerunning the same job resumes from it and ends with the
weights an uninterrupted run gives.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import platform
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from . import __version__
from .atomic import torch_save, write_text
from .augment import EpochBatches, SeededImages, build_train_transform, normalization
from .ema import make_ema
from .errors import UserError
from .gpu_augment import AUGMENT_DEVICES, BatchedAugment, DeviceBatches
from .inference import autocast, predict_logits, resolve_device, to_channels_last
from .losses import build_loss
from .models import build_model, load_pretrained
from .optim import SAM, build_optimizer, frozen_bn_stats
from .schedules import build_scheduler

HISTORY_FIELDS = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc",
                  "ema_val_loss", "ema_val_acc", "seconds", "images_per_second")
MODEL_FORMAT = "cifar-ensembles/model-1"
CHECKPOINT_FORMAT = "cifar-ensembles/checkpoint-1"
NONFINITE_CHECK_EVERY = 16  # steps between host syncs that look for a NaN/inf loss
# Settings that change speed, not results (beyond floating-point rounding): a checkpoint
# written with other values of these is still resumed.
SPEED_ONLY_KEYS = ("loader", "device", "seeds", "channels_last", "compile", "cudnn_benchmark",
                   "jobs_per_gpu", "eval_batch_size")


class Preempted(Exception):
    """SIGTERM or SIGUSR1 arrived; the checkpoint is written and the job should exit non-zero."""


class Diverged(UserError):
    pass


@dataclass
class EpochStats:
    """Running sums of one epoch, kept in the checkpoint so a mid-epoch resume continues them."""

    loss_sum: float = 0.0
    correct: int = 0
    images: int = 0
    seconds: float = 0.0
    lr: float | None = None  # learning rate at the start of the epoch (the history's `lr`)
    data_wait: float = 0.0  # seconds of `seconds` spent waiting for the next batch

    def as_dict(self):
        return dict(loss_sum=self.loss_sum, correct=self.correct, images=self.images,
                    seconds=self.seconds, lr=self.lr, data_wait=self.data_wait)


@dataclass
class Position:
    epoch: int = 0  # epochs completed
    batch: int = 0  # batches completed within the current epoch
    history: list = field(default_factory=list)
    stats: EpochStats = field(default_factory=EpochStats)


def fingerprint(spec: dict, seed: int, data: dict) -> str:
    """What a checkpoint must match to be resumed: the training config (less loader, device
    and speed settings, which do not change results), the seed and the prepared data."""
    relevant = {k: v for k, v in spec.items() if k not in SPEED_ONLY_KEYS}
    augment = relevant.get("augment")
    if isinstance(augment, dict) and augment.get("device", "cpu") == "cpu":
        # the default input path: fingerprints match those written before the key existed
        relevant["augment"] = {k: v for k, v in augment.items() if k != "device"}
    h = hashlib.sha256(json.dumps([relevant, seed], sort_keys=True, default=str).encode())
    for key in ("y_train", "y_val", "train_index", "val_index"):
        if key in data:
            h.update(np.ascontiguousarray(data[key]).tobytes())
    return h.hexdigest()


class _StopFlag:
    """Turns SIGTERM / SIGUSR1 (SLURM's warning before a kill) into a flag checked per step."""

    SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s)

    def __init__(self):
        self.received = None
        self._old = {}

    def __enter__(self):
        try:
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._old = {}
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGTERM/SIGUSR1 to the main process, which checkpoints and exits."""
    for s in _StopFlag.SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def resolve_compile(value, device: torch.device) -> str | None:
    """`training.compile` -> the torch.compile mode to use (None: eager).

    `true` is inductor's default mode; `reduce-overhead` adds CUDA graphs (worth it for small
    batches, where kernel launches dominate) and on a CPU falls back to the default mode.
    On a CPU inductor compiles C++, so a missing compiler is reported here, in one line.
    """
    if value is False or value is None:
        return None
    if value is True:
        mode = "default"
    elif value == "reduce-overhead":
        mode = "reduce-overhead" if device.type == "cuda" else "default"
    else:
        raise UserError(f"compile: unknown value {value!r}; choose false, true or reduce-overhead")
    if device.type == "cpu" and not (os.environ.get("CXX") or shutil.which("g++")
                                     or shutil.which("c++") or shutil.which("clang++")):
        raise UserError("compile: torch.compile on the CPU needs a C++ compiler (g++, c++ or clang++) "
                        "and none is on PATH; install one or set compile: false")
    return mode


class Trainer:
    def __init__(self, spec: dict, data: dict, seed: int, threads: int = 1,
                 weights_file: str | None = None, log=None):
        self.spec, self.data, self.seed = spec, data, seed
        self.log = log if log is not None else (lambda msg: print(msg, file=sys.stderr, flush=True))
        torch.set_num_threads(max(int(threads), 1))
        self.device = resolve_device(spec.get("device", "auto"))
        self.precision = spec.get("precision", "fp32")
        autocast(self.device, self.precision)  # validates the name early
        self.channels_last = bool(spec.get("channels_last", False))
        self.compile_mode = resolve_compile(spec.get("compile", False), self.device)
        self.cudnn_benchmark = bool(spec.get("cudnn_benchmark", True))
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = self.cudnn_benchmark
        self.epochs, self.batch_size = int(spec["epochs"]), int(spec["batch_size"])
        if self.batch_size > len(data["y_train"]):
            raise UserError(f"batch_size: {self.batch_size} is larger than the training set "
                            f"({len(data['y_train'])} images)")
        x = data["x_train"]
        self.num_classes, self.in_channels, self.image_size = len(data["classes"]), x.shape[-1], x.shape[1]
        self.mean, self.std = normalization(spec.get("augment", {}), data["mean"], data["std"],
                                            self.in_channels)

        torch.manual_seed(seed)
        self.model = build_model(spec["model"], self.num_classes, self.in_channels)
        if spec["model"].get("pretrained"):
            if not weights_file:
                raise UserError("model.pretrained: pretrained weights need a weights file (the "
                                "download_weights rule or pretrained_weights.file); training never downloads")
            load_pretrained(self.model, weights_file)
        self.model.to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        # the module that runs training steps: the model itself, or its compiled wrapper (which
        # shares its parameters; self.model keeps the plain state_dict keys)
        self.step_model = self.model
        if self.compile_mode is not None:
            self.step_model = torch.compile(self.model, mode=self.compile_mode)
        self._compile_checked = self.compile_mode is None
        self.optimizer = build_optimizer(self.model, spec["optimizer"])
        self.sam = isinstance(self.optimizer, SAM)
        self.loss_fn = build_loss(spec["loss"])
        self.steps_per_epoch = len(x) // self.batch_size
        self.scheduler, self.interval = build_scheduler(self.optimizer, spec.get("scheduler", {}),
                                                        self.epochs, self.steps_per_epoch)
        ema_spec = spec.get("ema", {}) or {}
        self.ema = (make_ema(self.model, float(ema_spec.get("decay", 0.999)),
                             int(ema_spec.get("warmup_steps", 0)))
                    if ema_spec.get("enabled") else None)

        augment = spec.get("augment", {}) or {}
        self.augment_device = augment.get("device", "cpu")
        if self.augment_device not in AUGMENT_DEVICES:
            raise UserError(f"augment.device: unknown value {self.augment_device!r}; choose cpu or gpu")
        loader = spec.get("loader", {}) or {}
        if self.augment_device == "gpu":
            # the data lives on the training device and batches are augmented there
            batched = BatchedAugment(augment, self.image_size, self.mean, self.std, self.device,
                                     self.channels_last)
            self.loader = DeviceBatches(x, data["y_train"], batched, self.batch_size, seed, self.device)
            self.sampler = self.loader
            self.num_workers, self.pin_memory, self.persistent_workers = 0, False, False
        else:
            transform = build_train_transform(augment, self.image_size, self.mean, self.std)
            self.sampler = EpochBatches(len(x), self.batch_size, seed, 0, drop_last=True)
            workers = loader.get("num_workers")
            self.num_workers = max(int(threads), 1) if workers is None else int(workers)
            self.pin_memory = bool(loader.get("pin_memory", True)) and self.device.type == "cuda"
            self.persistent_workers = bool(loader.get("persistent_workers", True)) and self.num_workers > 0
            self.loader = torch.utils.data.DataLoader(
                SeededImages(x, data["y_train"], transform), batch_sampler=self.sampler,
                num_workers=self.num_workers, pin_memory=self.pin_memory,
                persistent_workers=self.persistent_workers,
                worker_init_fn=_ignore_stop_signals if self.num_workers > 0 else None,
            )
        self.timing: list[dict] = []  # per epoch run in this process: seconds, data-wait seconds
        self.position = Position()
        self.fingerprint = fingerprint(spec, seed, data)

    def effective(self) -> dict:
        """The settings this run resolved to (run.yaml's `effective` section)."""
        return {"device": str(self.device), "precision": self.precision,
                "channels_last": self.channels_last,
                "compile": self.compile_mode if self.compile_mode is not None else False,
                "cudnn_benchmark": self.cudnn_benchmark if self.device.type == "cuda" else None,
                "augment_device": self.augment_device, "num_workers": self.num_workers,
                "pin_memory": self.pin_memory, "persistent_workers": self.persistent_workers,
                "torch_threads": torch.get_num_threads()}

    # ------------------------------------------------------------------ steps
    def _forward_backward(self, x, y):
        with autocast(self.device, self.precision):
            logits = self.step_model(x)
            loss = self.loss_fn(logits.float(), y)
        loss.backward()
        return loss.detach(), logits.detach()

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One full optimizer step (two passes for SAM/ASAM); returns loss and logits of pass one."""
        if self._compile_checked:
            return self._train_step(x, y)
        try:  # the first compiled step compiles: report a failure as a config problem
            out = self._train_step(x, y)
        except (UserError, KeyboardInterrupt, torch.OutOfMemoryError):  # not compile's fault
            raise
        except Exception as err:
            first = (str(err).strip().splitlines() or [""])[0][:300]
            raise UserError(f"compile: torch.compile (mode {self.compile_mode}) failed on the first "
                            f"training step on {self.device} ({err.__class__.__name__}: {first}); "
                            "set compile: false to train without it") from err
        self._compile_checked = True
        return out

    def _train_step(self, x, y):
        if self.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        self.optimizer.zero_grad(set_to_none=True)
        loss, logits = self._forward_backward(x, y)
        if self.compile_mode == "reduce-overhead":  # CUDA graph outputs are overwritten by the next replay
            loss, logits = loss.clone(), logits.clone()
        if self.sam:
            def perturbed_pass():
                with frozen_bn_stats(self.model):
                    self._forward_backward(x, y)

            self.optimizer.step(perturbed_pass)
        else:
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        if self.interval == "step":
            self.scheduler.step()
        return loss, logits

    # ------------------------------------------------------------- checkpoint
    def state(self) -> dict:
        p = self.position
        return {
            "format": CHECKPOINT_FORMAT, "fingerprint": self.fingerprint,
            "epoch": p.epoch, "batch": p.batch, "history": p.history, "stats": p.stats.as_dict(),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
        }

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        torch_save(path, self.state())

    def try_resume(self, path: str | os.PathLike) -> bool:
        """Resume from `path` if it exists and belongs to this run; say why not otherwise."""
        path = Path(path)
        if not path.exists():
            return False
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            self.log(f"checkpoint {path} is unreadable ({err.__class__.__name__}); starting afresh")
            return False
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            self.log(f"checkpoint {path} has an unknown format; starting afresh")
            return False
        if ckpt.get("fingerprint") != self.fingerprint:
            self.log(f"checkpoint {path} was written with another config, seed or dataset; starting afresh")
            return False
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(ckpt["ema"])
        torch.set_rng_state(ckpt["torch_rng"])
        if ckpt.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
        self.position = Position(ckpt["epoch"], ckpt["batch"], list(ckpt["history"]),
                                 EpochStats(**ckpt["stats"]))
        self.log(f"resumed from {path}: epoch {ckpt['epoch'] + 1}, batch {ckpt['batch']}")
        return True

    # ------------------------------------------------------------------- loop
    def evaluate(self, model) -> tuple[float, float]:
        logits = predict_logits(model, self.data["x_val"], self.mean, self.std, self.device,
                                int(self.spec.get("eval_batch_size", 512)), self.precision)
        y = torch.as_tensor(self.data["y_val"])
        loss = float(self.loss_fn(logits, y))
        return loss, float((logits.argmax(1) == y).float().mean())

    def fit(self, checkpoint: str | os.PathLike | None = None) -> list[dict]:
        """Train to the last epoch; returns the history rows."""
        if checkpoint is not None:
            self.try_resume(checkpoint)
        self.model.train()
        with _StopFlag() as stop:
            while self.position.epoch < self.epochs:
                self._run_epoch(stop, checkpoint)
        return self.position.history

    def _run_epoch(self, stop: _StopFlag, checkpoint) -> None:
        p = self.position
        epoch, stats = p.epoch, p.stats
        self.sampler.epoch, self.sampler.start_batch = epoch, p.batch
        if stats.lr is None:
            stats.lr = self.optimizer.param_groups[0]["lr"]
        losses = torch.zeros(self.steps_per_epoch, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        first_batch, checked = p.batch, p.batch
        tty = sys.stderr.isatty()
        start = time.perf_counter()
        non_blocking = self.device.type == "cuda"
        batches, wait = iter(self.loader), 0.0
        while True:
            t0 = time.perf_counter()
            try:
                x, y = next(batches)
            except StopIteration:
                break
            wait += time.perf_counter() - t0  # data wait: time the loop stood still for a batch
            x = x.to(self.device, non_blocking=non_blocking)
            y = y.to(self.device, non_blocking=non_blocking)
            if self.channels_last:
                x = to_channels_last(x)
            loss, logits = self.train_step(x, y)
            losses[p.batch] = loss
            correct += (logits.argmax(1) == y).sum()
            p.batch += 1
            if p.batch - checked >= NONFINITE_CHECK_EVERY or p.batch == self.steps_per_epoch:
                self._check_finite(losses, checked, p.batch, epoch)
                checked = p.batch
                if tty:
                    print(f"\repoch {epoch + 1}/{self.epochs} batch {p.batch}/{self.steps_per_epoch} "
                          f"loss {float(losses[p.batch - 1]):.4f}", end="", file=sys.stderr, flush=True)
            if stop.received is not None:
                self._check_finite(losses, checked, p.batch, epoch)
                self._fold(stats, losses, correct, first_batch, p.batch, start, wait)
                if checkpoint is not None:
                    self.save_checkpoint(checkpoint)
                raise Preempted(f"signal {stop.received} at epoch {epoch + 1}, batch {p.batch}: "
                                f"checkpoint written to {checkpoint}")
        if tty:
            print(file=sys.stderr)
        self._fold(stats, losses, correct, first_batch, p.batch, start, wait)
        if self.interval == "epoch":
            self.scheduler.step()
        val_loss, val_acc = self.evaluate(self.model)
        ema_loss, ema_acc = self.evaluate(self.ema.module) if self.ema is not None else (None, None)
        row = dict(epoch=epoch + 1, lr=stats.lr, train_loss=stats.loss_sum / max(stats.images, 1),
                   train_acc=stats.correct / max(stats.images, 1), val_loss=val_loss, val_acc=val_acc,
                   ema_val_loss=ema_loss, ema_val_acc=ema_acc, seconds=stats.seconds,
                   images_per_second=stats.images / max(stats.seconds, 1e-9))
        p.history.append(row)
        self.timing.append({"epoch": epoch + 1, "seconds": stats.seconds,
                            "data_wait_seconds": stats.data_wait})
        self.position = Position(epoch + 1, 0, p.history, EpochStats())
        if checkpoint is not None:  # before the log line: a dying log pipe must not cost the epoch
            self.save_checkpoint(checkpoint)
        self.log(format_row(row, self.epochs)
                 + f"  data wait {100 * stats.data_wait / max(stats.seconds, 1e-9):.1f}%")

    def _check_finite(self, losses, lo, hi, epoch):
        window = losses[lo:hi]
        bad = (~torch.isfinite(window)).nonzero()
        if len(bad):
            step = lo + int(bad[0]) + 1
            raise Diverged(f"training diverged: loss is {float(window[int(bad[0])])} at epoch "
                           f"{epoch + 1}, step {step}")

    def _fold(self, stats, losses, correct, first, last, start, wait=0.0):
        n = (last - first) * self.batch_size
        stats.loss_sum += float(losses[first:last].sum()) * self.batch_size
        stats.correct += int(correct)
        stats.images += n
        stats.seconds += time.perf_counter() - start
        stats.data_wait += wait

    def final_model(self) -> torch.nn.Module:
        """The weights to save and evaluate: the EMA weights when EMA is on."""
        return self.ema.module if self.ema is not None else self.model

    def model_record(self) -> dict:
        """What `model.pt` holds: weights plus what predict needs to rebuild the network."""
        state = {k: v.detach().cpu().contiguous() for k, v in self.final_model().state_dict().items()}
        return {"format": MODEL_FORMAT, "model": self.spec["model"], "num_classes": self.num_classes,
                "in_channels": self.in_channels, "mean": [float(m) for m in self.mean],
                "std": [float(s) for s in self.std], "ema": self.ema is not None, "state_dict": state}


def format_row(row: dict, epochs: int) -> str:
    text = (f"epoch {row['epoch']}/{epochs}  lr {row['lr']:.2e}  train loss {row['train_loss']:.4f} "
            f"acc {100 * row['train_acc']:.2f}%  val loss {row['val_loss']:.4f} "
            f"acc {100 * row['val_acc']:.2f}%")
    if row.get("ema_val_acc") is not None:
        text += f"  ema val acc {100 * row['ema_val_acc']:.2f}%"
    return text + f"  {row['seconds']:.1f}s  {row['images_per_second']:.0f} img/s"


def history_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in HISTORY_FIELDS})
    return buf.getvalue()


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


def train_to_files(spec: dict, data: dict, seed: int, out_dir: str | os.PathLike,
                   checkpoint: str | os.PathLike | None, threads: int = 1,
                   weights_file: str | None = None, log=None) -> Path:
    """Train, then write model.pt, history.csv and run.yaml into `out_dir` (atomically)."""
    out_dir = Path(out_dir)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    trainer = Trainer(spec, data, seed, threads, weights_file, log)
    trainer.log(f"training seed {seed} on {trainer.device} ({threads} threads): "
                f"{len(data['y_train'])} images, {trainer.steps_per_epoch} steps/epoch, "
                f"{trainer.epochs} epochs; " + ", ".join(f"{k} {v}" for k, v in trainer.effective().items()
                                                          if k not in ("device",)))
    history = trainer.fit(checkpoint)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch_save(out_dir / "model.pt", trainer.model_record())
    write_text(out_dir / "history.csv", history_csv(history))
    train_seconds = sum(t["seconds"] for t in trainer.timing)
    wait_seconds = sum(t["data_wait_seconds"] for t in trainer.timing)
    wait_fraction = round(wait_seconds / train_seconds, 4) if train_seconds else None
    info = {"seed": seed, "device": str(trainer.device), "threads": threads,
            "started": started, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "train_images": int(len(data["y_train"])), "steps_per_epoch": trainer.steps_per_epoch,
            "final_weights": "ema" if trainer.ema is not None else "raw",
            "effective": trainer.effective(),
            # the epochs this process finished (a resumed run counts only its own)
            "timing": {"train_seconds": round(train_seconds, 3),
                       "data_wait_seconds": round(wait_seconds, 3),
                       "data_wait_fraction": wait_fraction},
            "versions": versions(), "config": spec}
    if trainer.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(trainer.device)
    write_text(out_dir / "run.yaml", yaml.safe_dump(info, sort_keys=False))
    if checkpoint is not None and Path(checkpoint).exists():
        Path(checkpoint).unlink()
    final = history[-1] if history else {}
    if final and not math.isfinite(final["val_loss"]):
        trainer.log("warning: final validation loss is not finite")
    return out_dir

