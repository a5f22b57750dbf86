"""The epoch loop: deterministic on a CPU for a fixed seed, resumable, preemptible.

All randomness derives from the seed: model init from torch's generator, data order and
augmentation from (seed, epoch, index). A checkpoint (model, optimizer, scheduler, EMA,
RNG state, position in the epoch, its per-step losses, history) is written on the
cadence `runtime` sets, on SIGTERM/SIGUSR1 and after the last epoch, to a path Snakemake
does not own; rerunning the same job resumes from it and ends with the weights and the
history an uninterrupted run gives, bit for bit.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..compute.device import autocast, resolve_device
from ..compute.inference import predict_logits
from ..config.spec import RuntimeSpec, TrainingSpec
from ..errors import Preempted, UserError
from ..files.records import DamagedFile
from ..files.training_run import Checkpoint, Divergence, EpochProgress, HistoryRow, ModelRecord
from ..transforms.augment import normalization
from .checkpoint import Diverged, fingerprint, read_checkpoint
from .components import build_components, build_network
from .inputs import build_inputs
from .kept_weights import KeptWeights
from .signals import StopFlag
from .step import TrainStep

NONFINITE_CHECK_EVERY = 16  # steps between host syncs that look for a NaN/inf loss


@dataclass
class Position:
    """Where the run stands: epochs done, batches done in the current one, and its running sums
    on the device (read back only at the end of the epoch or for a checkpoint)."""

    epoch: int = 0
    batch: int = 0
    history: list[HistoryRow] = field(default_factory=list)
    losses: torch.Tensor | None = None  # per step of the current epoch
    correct: torch.Tensor | None = None
    seconds: float = 0.0
    data_wait: float = 0.0
    lr: float | None = None


class Trainer:
    def __init__(self, spec: TrainingSpec, runtime: RuntimeSpec, data: dict, seed: int, threads: int,
                 weights_file: str | None = None, log=None):
        self.spec, self.runtime, self.data, self.seed = spec, runtime, data, seed
        self.log = log if log is not None else (lambda msg: print(msg, file=sys.stderr, flush=True))
        torch.set_num_threads(max(int(threads), 1))
        self.device = resolve_device(runtime.device)
        autocast(self.device, spec.precision)  # validates the name early
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = runtime.cudnn_benchmark
        x, y = data["x_train"], data["y_train"]
        if spec.batch_size > len(y):
            raise UserError(f"batch_size: {spec.batch_size} is larger than the training set "
                            f"({len(y)} images)")
        self.num_classes, self.in_channels = len(data["classes"]), x.shape[-1]
        self.mean, self.std = normalization(spec.augment.normalize, data["mean"], data["std"],
                                            self.in_channels)
        self.steps_per_epoch = len(y) // spec.batch_size
        model = build_network(spec, self.num_classes, self.in_channels, seed, weights_file)
        self.parts = build_components(spec, runtime, model, self.device, self.steps_per_epoch)
        self.step = TrainStep(self.parts, self.device, spec.precision, spec.scheduler.interval == "step")
        self.kept = KeptWeights(spec, model, self.parts.optimizer)
        self.inputs = build_inputs(spec.augment, runtime.loader, x, y, self.mean, self.std, spec.batch_size,
                                   seed, self.device, runtime.channels_last, threads)
        self.fingerprint = fingerprint(spec, seed, data)
        self.position = Position()
        self.timing: list[dict] = []  # per epoch run in this process: seconds, data-wait seconds
        self._last_save = time.monotonic()

    @property
    def model(self) -> torch.nn.Module:
        return self.parts.model

    @property
    def ema(self):
        return self.parts.ema

    def effective(self) -> dict:
        """The settings this run resolved to (run.yaml's `effective` section)."""
        return {"device": str(self.device), "precision": self.spec.precision,
                "channels_last": self.runtime.channels_last,
                "compile": self.parts.compile_mode if self.parts.compile_mode is not None else False,
                "cudnn_benchmark": self.runtime.cudnn_benchmark if self.device.type == "cuda" else None,
                **self.inputs.settings, "torch_threads": torch.get_num_threads()}

    # ------------------------------------------------------------- checkpoint
    def checkpoint(self, divergence: Divergence | None = None) -> Checkpoint:
        p, parts = self.position, self.parts
        losses = p.losses.cpu() if p.losses is not None else torch.zeros(self.steps_per_epoch)
        progress = EpochProgress(losses=losses, correct=int(p.correct) if p.correct is not None else 0,
                                 seconds=p.seconds, data_wait=p.data_wait, lr=p.lr)
        return Checkpoint(
            fingerprint=self.fingerprint, epoch=p.epoch, batch=p.batch, history=list(p.history),
            progress=progress, model=parts.model.state_dict(), optimizer=parts.optimizer.state_dict(),
            scheduler=parts.scheduler.state_dict(), ema=parts.ema.state_dict() if parts.ema else None,
            torch_rng=torch.get_rng_state(), divergence=divergence, kept=self.kept.state_dict())

    def save_checkpoint(self, path: str | os.PathLike, divergence: Divergence | None = None) -> None:
        self.checkpoint(divergence).save(path)
        self._last_save = time.monotonic()

    def restore(self, ckpt: Checkpoint, path: str | os.PathLike = "checkpoint") -> None:
        parts = self.parts
        losses = ckpt.progress.losses
        if not (isinstance(losses, torch.Tensor) and losses.shape == (self.steps_per_epoch,)
                and 0 <= ckpt.batch <= self.steps_per_epoch and 0 <= ckpt.epoch <= self.spec.epochs):
            raise DamagedFile(path, "damaged checkpoint (its position does not fit this run)",
                              "delete it to train this model afresh")
        misfit = self.kept.misfit(ckpt.kept, ckpt.epoch)
        if misfit:
            raise DamagedFile(path, f"damaged checkpoint ({misfit})", "delete it to train this model afresh")
        parts.model.load_state_dict(ckpt.model)
        self.kept.prepare_restore(ckpt.kept)
        parts.optimizer.load_state_dict(ckpt.optimizer)
        parts.scheduler.load_state_dict(ckpt.scheduler)
        if parts.ema is not None:
            parts.ema.load_state_dict(ckpt.ema)
        try:
            self.kept.load_state_dict(ckpt.kept)
        except (RuntimeError, KeyError, TypeError, ValueError) as err:
            first = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
            raise DamagedFile(path, f"damaged checkpoint (its kept weights: {first})",
                              "delete it to train this model afresh") from None
        torch.set_rng_state(ckpt.torch_rng)
        progress = ckpt.progress
        if ckpt.batch == 0:  # at an epoch boundary: the next epoch starts afresh (its lr, its sums)
            self.position = Position(ckpt.epoch, 0, list(ckpt.history))
            return
        self.position = Position(
            ckpt.epoch, ckpt.batch, list(ckpt.history),
            losses=progress.losses.to(self.device, torch.float32),
            correct=torch.tensor(progress.correct, dtype=torch.int64, device=self.device),
            seconds=progress.seconds, data_wait=progress.data_wait, lr=progress.lr)

    def try_resume(self, path: str | os.PathLike) -> bool:
        """Resume from `path` when it holds this run's checkpoint; say why not otherwise."""
        ckpt = read_checkpoint(path, self.fingerprint, self.log)
        if ckpt is None:
            return False
        self.restore(ckpt, path)
        self.log(f"resumed from {path}: epoch {ckpt.epoch + 1}, batch {ckpt.batch}")
        return True

    # ------------------------------------------------------------------- loop
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.step(x, y)

    def evaluate(self, model) -> tuple[float, float]:
        logits = predict_logits(model, self.data["x_val"], self.mean, self.std, self.device,
                                self.runtime.eval_batch_size, self.spec.precision)
        y = torch.as_tensor(self.data["y_val"])
        loss = float(self.parts.loss_fn(logits, y))
        return loss, int((logits.argmax(1) == y).sum()) / len(y)

    def fit(self, checkpoint: str | os.PathLike | None = None, resume: bool = True) -> list[HistoryRow]:
        """Train to the last epoch, saving to `checkpoint` (first resuming from it, unless the
        caller did already: `resume=False`); returns the history rows."""
        if checkpoint is not None and resume:
            self.try_resume(checkpoint)
        self.model.train()
        with StopFlag() as stop:
            while self.position.epoch < self.spec.epochs:
                self._train_epoch(stop, checkpoint)
                self._end_epoch(checkpoint)
        return self.position.history

    def _start_epoch(self) -> None:
        p = self.position
        self.kept.start_epoch(p.epoch)  # SWALR takes over the schedule from swa.start_epoch (swa.lr set)
        self.step.per_step_schedule = (self.spec.scheduler.interval == "step"
                                       and not self.kept.swa_lr_from(p.epoch))
        if p.losses is None:  # a fresh epoch (a resumed one keeps its sums)
            p.losses = torch.zeros(self.steps_per_epoch, device=self.device)
            p.correct = torch.zeros((), dtype=torch.int64, device=self.device)
            p.seconds, p.data_wait = 0.0, 0.0
            p.lr = self.parts.optimizer.param_groups[0]["lr"]

    def _train_epoch(self, stop: StopFlag, checkpoint) -> None:
        """The epoch's remaining batches; checks the loss, stop signals and the time cadence."""
        self._start_epoch()
        p = self.position
        checked, start, wait = p.batch, time.perf_counter(), 0.0
        batches = self.inputs.epoch(p.epoch, p.batch)
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            wait += time.perf_counter() - t0  # data wait: time the loop stood still for a batch
            x, y = batch
            loss, logits = self.train_step(x, y)
            p.losses[p.batch] = loss
            p.correct += (logits.argmax(1) == y).sum()
            p.batch += 1
            if p.batch - checked >= NONFINITE_CHECK_EVERY or p.batch == self.steps_per_epoch:
                self._check_finite(checked, p.batch, checkpoint)
                checked = p.batch
                self._progress_line()
            if stop.received is not None or self._time_to_save(checkpoint):
                self._check_finite(checked, p.batch, checkpoint)
                checked = p.batch
                self._add_time(start, wait)
                start, wait = time.perf_counter(), 0.0
                if checkpoint is not None:
                    self.save_checkpoint(checkpoint)
                if stop.received is not None:
                    saved = f"checkpoint written to {checkpoint}" if checkpoint else "no checkpoint"
                    raise Preempted(f"signal {stop.received} at epoch {p.epoch + 1}, "
                                    f"batch {p.batch}: {saved}")
        self._add_time(start, wait)
        if sys.stderr.isatty():
            print(file=sys.stderr)

    def _time_to_save(self, checkpoint) -> bool:
        minutes = self.runtime.checkpoint_every_minutes
        return (checkpoint is not None and minutes is not None
                and time.monotonic() - self._last_save >= 60.0 * minutes)

    def _add_time(self, start: float, wait: float) -> None:
        self.position.seconds += time.perf_counter() - start
        self.position.data_wait += wait

    def _progress_line(self) -> None:
        p = self.position
        if sys.stderr.isatty():
            print(f"\repoch {p.epoch + 1}/{self.spec.epochs} batch {p.batch}/{self.steps_per_epoch} "
                  f"loss {float(p.losses[p.batch - 1]):.4f}", end="", file=sys.stderr, flush=True)

    def _end_epoch(self, checkpoint) -> None:
        """Schedule, validation (on its cadence), the history row, the checkpoint and the log line."""
        p, epochs = self.position, self.spec.epochs
        if self.spec.scheduler.interval == "epoch" and not self.kept.swa_lr_from(p.epoch):
            self.parts.scheduler.step()
        self.kept.end_epoch(p.epoch + 1, self.model, self.final_model())
        last = p.epoch + 1 == epochs
        val = ema = (None, None)
        if last or (p.epoch + 1) % self.runtime.eval_every_epochs == 0:
            val = self.evaluate(self.model)
            ema = self.evaluate(self.ema.module) if self.ema is not None else (None, None)
        images = self.steps_per_epoch * self.spec.batch_size
        row = HistoryRow(epoch=p.epoch + 1, lr=p.lr,
                         train_loss=float(p.losses.cpu().double().mean()),
                         train_acc=int(p.correct) / images, val_loss=val[0], val_acc=val[1],
                         ema_val_loss=ema[0], ema_val_acc=ema[1], seconds=p.seconds,
                         images_per_second=images / max(p.seconds, 1e-9))
        self.timing.append({"epoch": row.epoch, "seconds": p.seconds, "data_wait_seconds": p.data_wait})
        wait_share = 100 * p.data_wait / max(p.seconds, 1e-9)
        self.position = Position(p.epoch + 1, 0, [*p.history, row])
        if checkpoint is not None and (last or (p.epoch + 1) % self.runtime.checkpoint_every_epochs == 0
                                       or self._time_to_save(checkpoint)):
            self.save_checkpoint(checkpoint)  # before the log line: a dying log pipe must not cost the epoch
        self.log(format_row(row, epochs) + f"  data wait {wait_share:.1f}%")

    def _check_finite(self, lo: int, hi: int, checkpoint) -> None:
        """One host sync for a window of steps; a non-finite loss is recorded and stops the run."""
        window = self.position.losses[lo:hi]
        bad = (~torch.isfinite(window)).nonzero()
        if len(bad):
            first = int(bad[0])
            divergence = Divergence(epoch=self.position.epoch + 1, step=lo + first + 1,
                                    loss=str(float(window[first])))
            if checkpoint is not None:
                self.save_checkpoint(checkpoint, divergence)
            raise Diverged(divergence.message())

    # ------------------------------------------------------------------ results
    def final_model(self) -> torch.nn.Module:
        """The weights to save and evaluate: the EMA weights when EMA is on."""
        return self.ema.module if self.ema is not None else self.model

    def model_record(self, state: dict | None = None, ema: bool | None = None) -> ModelRecord:
        """What `model.pt` holds: weights (by default the final model's) plus what predict needs
        to rebuild the network."""
        if state is None:
            state = self.final_model().state_dict()
        return ModelRecord(model=self.spec.model, num_classes=self.num_classes, in_channels=self.in_channels,
                           mean=tuple(float(m) for m in np.asarray(self.mean)),
                           std=tuple(float(s) for s in np.asarray(self.std)),
                           ema=self.ema is not None if ema is None else ema,
                           state_dict={k: v.detach().cpu().contiguous() for k, v in state.items()})

    def member_records(self) -> dict[str, ModelRecord]:
        """The run's extra members (members.pt): its snapshots (`epochN`, the weights model.pt would
        have held then) and, with SWA, the average (`swa`, BatchNorm statistics recomputed)."""
        members = {name: self.model_record(state) for name, state in self.kept.members().items()}
        if self.kept.average is not None:
            # at the training batch size (a result setting: BatchNorm's batch statistics depend on it)
            swa = self.kept.swa_model(self.data["x_train"], self.mean, self.std, self.device,
                                      self.spec.batch_size, self.runtime.channels_last)
            members["swa"] = self.model_record(swa.state_dict(), ema=False)
        return members


def format_row(row: HistoryRow, epochs: int) -> str:
    text = (f"epoch {row.epoch}/{epochs}  lr {row.lr:.2e}  train loss {row.train_loss:.4f} "
            f"acc {100 * row.train_acc:.2f}%")
    if row.val_loss is not None:
        text += f"  val loss {row.val_loss:.4f} acc {100 * row.val_acc:.2f}%"
    if row.ema_val_acc is not None:
        text += f"  ema val acc {100 * row.ema_val_acc:.2f}%"
    return text + f"  {row.seconds:.1f}s  {row.images_per_second:.0f} img/s"


__all__ = ["Diverged", "Preempted", "Trainer", "format_row"]
