"""The trainer: determinism, bit-exact resume (in-process and across killed or signalled CLI
runs), checkpoint hygiene and cadence, damaged checkpoints, output files, divergence, SAM's
BatchNorm handling and device errors."""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from conftest import (
    ENV,
    Log,
    assert_states_equal,
    cli,
    load_state,
    make_data,
    quiet,
    result_cells,
    states_differ,
    tiny_runtime,
    tiny_spec,
)

from cifar_ensembles.config.convert import to_data, to_json
from cifar_ensembles.errors import UserError
from cifar_ensembles.files import splits
from cifar_ensembles.files.records import DamagedFile
from cifar_ensembles.files.training_run import (
    CHECKPOINT_FORMAT,
    MODEL_FORMAT,
    RESULT_FIELDS,
    Checkpoint,
    Divergence,
    ModelRecord,
    read_history,
)
from cifar_ensembles.stages import train as train_stage
from cifar_ensembles.stages.train import train_to_files
from cifar_ensembles.training import Diverged, Preempted, Trainer

HISTORY_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc",
                   "ema_val_loss", "ema_val_acc", "seconds", "images_per_second"]
TIMING = ("seconds", "images_per_second")
VAL_COLUMNS = ("val_loss", "val_acc", "ema_val_loss", "ema_val_acc")
RESUME_AFRESH = "delete it to train this model afresh"


# ----------------------------------------------------------------------------- helpers
def train(spec, data, seed, out_dir, checkpoint, runtime=None, log=quiet) -> Path:
    """train_to_files on one thread, with the tiny runtime unless told otherwise."""
    return train_to_files(spec, runtime or tiny_runtime(), data, seed, out_dir, checkpoint, 1, log=log)


def trainer(spec, data, seed, runtime=None, cls=Trainer, log=quiet, **kwargs) -> Trainer:
    return cls(spec, runtime or tiny_runtime(), data, seed, 1, log=log, **kwargs)


def csv_cells(path) -> list[dict]:
    """history.csv as the text of its cells."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def header(path) -> list[str]:
    return Path(path).read_text().splitlines()[0].split(",")


class Scripted(Trainer):
    """Records where it writes checkpoints and, after `signal_at` optimizer steps in this
    process, sends itself `signum` (as SLURM would, mid-epoch)."""

    def __init__(self, *args, signal_at: int | None = None, signum: int = signal.SIGTERM, **kwargs):
        super().__init__(*args, **kwargs)
        self.signal_at, self.signum, self.steps, self.saves = signal_at, signum, 0, []

    def train_step(self, x, y):
        out = super().train_step(x, y)
        self.steps += 1
        if self.steps == self.signal_at:
            signal.raise_signal(self.signum)
        return out

    def save_checkpoint(self, path, divergence=None):
        super().save_checkpoint(path, divergence)
        self.saves.append((self.position.epoch, self.position.batch))


class StopAfterEpoch(Trainer):
    """Simulates a kill right after the checkpoint of epoch `stop_epoch` is written."""

    stop_epoch = 2

    def save_checkpoint(self, path, divergence=None):
        super().save_checkpoint(path, divergence)
        if self.position.epoch == self.stop_epoch and self.position.batch == 0:
            raise KeyboardInterrupt("simulated kill")


# ------------------------------------------------------------------------- determinism
DETERMINISM_CASES = {
    "sgd-torchvision": {},
    "asam-albumentations-ema": dict(optimizer={"name": "asam", "rho": 0.5},
                                    augment={"name": "albumentations"}, ema={"enabled": True, "decay": 0.9}),
    "adam-none": dict(optimizer={"name": "adam", "lr": 1e-3, "weight_decay": 0.0}, augment={"name": "none"},
                      scheduler={"name": "cosine", "interval": "epoch"}),
}


@pytest.mark.parametrize("case", list(DETERMINISM_CASES))
def test_same_seed_gives_identical_weights_and_history(case, tmp_path):
    spec, data = tiny_spec(**DETERMINISM_CASES[case]), make_data()
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        train(spec, data, seed, tmp_path / name, None)
    a, b, c = (load_state(tmp_path / n / "model.pt") for n in "abc")
    assert_states_equal(a, b)
    assert states_differ(a, c), "another seed must give other weights"
    ha, hb = read_history(tmp_path / "a" / "history.csv"), read_history(tmp_path / "b" / "history.csv")
    assert len(ha) == spec.epochs
    assert result_cells(ha) == result_cells(hb)
    assert all(getattr(row, col) > 0 for row in ha for col in TIMING)


# ------------------------------------------------------------------------ output files
def test_outputs_without_ema_and_checkpoint_is_deleted(tmp_path):
    spec, runtime = tiny_spec(), tiny_runtime()
    ckpt = tmp_path / "ckpt" / "train.ckpt"
    out = train_to_files(spec, runtime, make_data(), 5, tmp_path / "out", ckpt, 1, log=quiet)
    assert out == tmp_path / "out"
    assert not ckpt.exists(), "the checkpoint must be removed after a successful run"
    assert not list(ckpt.parent.iterdir()), "temporary checkpoint files left behind"
    raw = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    assert raw["format"] == MODEL_FORMAT
    record = ModelRecord.load(out / "model.pt")
    assert record.ema is False
    assert record.num_classes == 10 and record.in_channels == 3
    assert record.model == spec.model
    assert isinstance(record.state_dict, dict) and "fc.weight" in record.state_dict

    assert header(out / "history.csv") == HISTORY_COLUMNS
    rows = read_history(out / "history.csv")
    assert [r.epoch for r in rows] == [1, 2]
    for row in rows:
        assert row.ema_val_loss is None and row.ema_val_acc is None
        assert 0.0 <= row.val_acc <= 1.0 and np.isfinite(row.train_loss)
    assert all(r["ema_val_loss"] == "" and r["ema_val_acc"] == "" for r in csv_cells(out / "history.csv"))

    info = yaml.safe_load((out / "run.yaml").read_text())
    assert info["seed"] == 5 and info["threads"] == 1
    assert info["device"] == "cpu"
    assert info["versions"]["torch"] == str(torch.__version__)
    assert "cifar_ensembles" in info["versions"]
    assert info["training"] == to_data(spec)
    assert info["runtime"] == to_data(runtime)
    assert info["final_weights"] == "raw"
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temporary files left behind: {leftovers}"


def test_model_pt_holds_ema_weights(tmp_path, monkeypatch):
    trainers = []

    class Recording(Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)

    monkeypatch.setattr(train_stage, "Trainer", Recording)
    spec = tiny_spec(ema={"enabled": True, "decay": 0.9}, augment={"name": "none"})
    out = train(spec, make_data(), 0, tmp_path / "out", tmp_path / "ckpt")
    (recorded,) = trainers
    saved = ModelRecord.load(out / "model.pt")
    assert saved.ema is True
    assert_states_equal(saved.state_dict, recorded.ema.module.state_dict())
    assert states_differ(saved.state_dict, recorded.model.state_dict()), "raw weights were saved"
    assert header(out / "history.csv") == HISTORY_COLUMNS
    for row in read_history(out / "history.csv"):
        assert 0.0 <= row.ema_val_acc <= 1.0
        assert np.isfinite(row.ema_val_loss)
    assert yaml.safe_load((out / "run.yaml").read_text())["final_weights"] == "ema"


# --------------------------------------------------------------------- in-process resume
@pytest.mark.parametrize("optimizer", ["sgd", "sam"])
def test_resume_at_epoch_boundary_is_bit_exact(tmp_path, optimizer):
    spec, data = tiny_spec(epochs=4, optimizer={"name": optimizer}), make_data()
    reference = trainer(spec, data, 1)
    reference_history = reference.fit()

    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(KeyboardInterrupt):
        trainer(spec, data, 1, cls=StopAfterEpoch).fit(ckpt)
    saved = Checkpoint.load(ckpt)
    assert (saved.epoch, saved.batch) == (2, 0)
    assert len(saved.history) == 2 and saved.divergence is None

    log = Log()
    resumed = trainer(spec, data, 1, log=log)
    history = resumed.fit(ckpt)
    assert f"resumed from {ckpt}: epoch 3, batch 0" in log.text()
    assert_states_equal(resumed.model.state_dict(), reference.model.state_dict())
    opt, ref_opt = resumed.parts.optimizer, reference.parts.optimizer
    if optimizer == "sam":
        opt, ref_opt = opt.base_optimizer, ref_opt.base_optimizer
    assert_states_equal(opt.state_dict()["state"][0], ref_opt.state_dict()["state"][0])
    assert result_cells(history) == result_cells(reference_history)


@pytest.mark.parametrize("batch,signum", [(1, signal.SIGTERM), (3, signal.SIGUSR1), (6, signal.SIGTERM)],
                         ids=["first-batch", "middle", "last-batch"])
def test_resume_mid_epoch_after_signal_is_bit_exact(tmp_path, batch, signum):
    """ASAM + EMA + albumentations + per-step cosine: every piece of state must survive, and the
    history (the interrupted epoch's loss too) equals the uninterrupted run's, bit for bit."""
    spec = tiny_spec(epochs=3, optimizer={"name": "asam"}, augment={"name": "albumentations"},
                     ema={"enabled": True, "decay": 0.9})
    data = make_data()
    steps = len(data["y_train"]) // spec.batch_size
    assert batch <= steps == 6
    reference = trainer(spec, data, 2)
    reference_history = reference.fit()

    ckpt = tmp_path / "run.ckpt"
    old_handler = signal.getsignal(signum)
    stopped = trainer(spec, data, 2, cls=Scripted, signal_at=steps + batch, signum=signum)
    with pytest.raises(Preempted, match=f"signal {int(signum)} at epoch 2, batch {batch}"):
        stopped.fit(ckpt)
    assert signal.getsignal(signum) == old_handler, "signal handlers must be restored"
    assert stopped.saves == [(1, 0), (1, batch)]
    saved = Checkpoint.load(ckpt)
    assert (saved.epoch, saved.batch) == (1, batch)
    assert len(saved.history) == 1
    losses = saved.progress.losses
    assert losses.shape == (steps,) and bool(torch.isfinite(losses).all())
    assert bool((losses[:batch] != 0).all()) and bool((losses[batch:] == 0).all())

    log = Log()
    resumed = trainer(spec, data, 2, log=log)
    history = resumed.fit(ckpt)
    assert f"resumed from {ckpt}: epoch 2, batch {batch}" in log.text()
    assert_states_equal(resumed.model.state_dict(), reference.model.state_dict())
    assert_states_equal(resumed.ema.module.state_dict(), reference.ema.module.state_dict())
    assert result_cells(history) == result_cells(reference_history)


def test_checkpoint_of_another_config_is_not_resumed(tmp_path):
    data = make_data()
    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(KeyboardInterrupt):
        trainer(tiny_spec(epochs=3), data, 0, cls=StopAfterEpoch).fit(ckpt)
    assert ckpt.exists()

    other = tiny_spec(epochs=3, optimizer={"lr": 0.02})
    log = Log()
    out = train(other, data, 0, tmp_path / "resumed", ckpt, log=log)
    assert "another training spec" in log.text() and "starting afresh" in log.text()
    assert "resumed from" not in log.text()
    fresh = train(other, data, 0, tmp_path / "fresh", None)
    assert_states_equal(load_state(out / "model.pt"), load_state(fresh / "model.pt"))
    assert not ckpt.exists()


def test_checkpoint_of_another_seed_is_not_resumed(tmp_path):
    spec, data = tiny_spec(epochs=3), make_data()
    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(KeyboardInterrupt):
        trainer(spec, data, 0, cls=StopAfterEpoch).fit(ckpt)
    log = Log()
    assert trainer(spec, data, 1, log=log).try_resume(ckpt) is False
    assert "starting afresh" in log.text()


# ------------------------------------------------------------------- damaged checkpoints
class RunsCode:
    """Unpickling this would create a file: a checkpoint must never be read that way."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def damage(kind: str, ckpt: Path, valid: Checkpoint) -> None:
    """Write a damaged checkpoint of `kind` to `ckpt` (`valid` is a real one of this run)."""
    valid.save(ckpt)
    if kind == "random-bytes":
        ckpt.write_bytes(np.random.default_rng(0).bytes(300))
    elif kind == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    elif kind == "not-plain-data":
        runs_code = RunsCode(ckpt.with_name("ran"))
        torch.save({"format": CHECKPOINT_FORMAT, **to_data(valid), "model": runs_code}, ckpt)
    elif kind == "another-format":
        torch.save({"format": MODEL_FORMAT, **to_data(valid)}, ckpt)
    elif kind == "missing-field":
        body = to_data(valid)
        del body["progress"]
        torch.save({"format": CHECKPOINT_FORMAT, **body}, ckpt)
    elif kind == "position-out-of-range":
        dataclasses.replace(valid, batch=999).save(ckpt)
    else:
        raise ValueError(kind)


DAMAGE = {"random-bytes": "not a readable checkpoint", "truncated": "not a readable checkpoint",
          "not-plain-data": "not a readable checkpoint", "another-format": "not a cifar-ensembles checkpoint",
          "missing-field": "progress: missing", "position-out-of-range": "position does not fit"}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_checkpoint_is_a_one_line_error_naming_it(kind, tmp_path, monkeypatch):
    spec, data = tiny_spec(epochs=1), make_data()
    ckpt = tmp_path / "run.ckpt"
    damage(kind, ckpt, trainer(spec, data, 0).checkpoint())
    damaged = ckpt.read_bytes()

    def no_training(self, x, y):
        raise AssertionError("a damaged checkpoint must stop the run before any step")

    monkeypatch.setattr(Trainer, "train_step", no_training)
    with pytest.raises(DamagedFile) as info:
        train(spec, data, 0, tmp_path / "out", ckpt)
    message = str(info.value)
    assert isinstance(info.value, UserError)
    assert "\n" not in message
    assert message.startswith(f"{ckpt}: ") and DAMAGE[kind] in message, message
    assert message.endswith(RESUME_AFRESH)
    assert ckpt.read_bytes() == damaged, "the damaged file is left for the user to look at"
    assert not (tmp_path / "out" / "model.pt").exists()
    assert not ckpt.with_name("ran").exists(), "reading a checkpoint ran code"


# -------------------------------------------------------------------------- cadence
def test_eval_every_epochs_leaves_empty_cells_but_validates_the_last_epoch(tmp_path):
    spec = tiny_spec(epochs=4, ema={"enabled": True, "decay": 0.9}, augment={"name": "none"})
    data = make_data()
    every = train(spec, data, 0, tmp_path / "every", None)
    sparse = train(spec, data, 0, tmp_path / "sparse", None, runtime=tiny_runtime(eval_every_epochs=3))

    cells = csv_cells(sparse / "history.csv")
    assert [r["epoch"] for r in cells] == ["1", "2", "3", "4"]
    for row in cells:
        validated = row["epoch"] in ("3", "4")  # every third epoch, and the last one
        assert all((row[k] != "") == validated for k in VAL_COLUMNS), row
    # validation is only looked at: the weights and every other cell are those of a run that
    # validates each epoch
    assert_states_equal(load_state(sparse / "model.pt"), load_state(every / "model.pt"))
    got = [dict(zip(RESULT_FIELDS, r)) for r in result_cells(read_history(sparse / "history.csv"))]
    want = [dict(zip(RESULT_FIELDS, r)) for r in result_cells(read_history(every / "history.csv"))]
    for g, w in zip(got, want):
        if g["val_loss"]:  # validated: every cell as in the run that validates each epoch
            assert g == w
        else:
            assert {k: v for k, v in g.items() if k not in VAL_COLUMNS} == \
                {k: v for k, v in w.items() if k not in VAL_COLUMNS}
    assert len(got) == len(want) == 4


@pytest.mark.parametrize("epoch,saves", [(1, [(0, 3)]), (3, [(2, 0), (2, 3)])],
                         ids=["before-the-first", "after-one"])
def test_checkpoint_every_epochs_writes_only_every_nth_epoch_and_on_sigterm(tmp_path, epoch, saves):
    spec, data = tiny_spec(epochs=5, augment={"name": "none"}), make_data()
    runtime = tiny_runtime(checkpoint_every_epochs=2)
    steps = len(data["y_train"]) // spec.batch_size
    reference = trainer(spec, data, 0)
    reference_history = reference.fit()
    run = trainer(spec, data, 0, runtime=runtime, cls=Scripted)
    run.fit(tmp_path / "full.ckpt")
    assert run.saves == [(2, 0), (4, 0), (5, 0)]  # every second epoch, and after the last one

    # SIGTERM at batch 3 of `epoch`: a checkpoint is written there, between the cadence's ones
    ckpt = tmp_path / "run.ckpt"
    stopped = trainer(spec, data, 0, runtime=runtime, cls=Scripted, signal_at=(epoch - 1) * steps + 3)
    with pytest.raises(Preempted):
        stopped.fit(ckpt)
    assert stopped.saves == saves
    resumed = trainer(spec, data, 0, runtime=runtime, cls=Scripted)
    history = resumed.fit(ckpt)
    assert resumed.saves == [s for s in [(2, 0), (4, 0), (5, 0)] if s > saves[-1]]
    assert_states_equal(resumed.model.state_dict(), reference.model.state_dict())
    assert result_cells(history) == result_cells(reference_history)


def test_checkpoint_every_minutes_saves_within_the_epoch(tmp_path):
    spec, data = tiny_spec(epochs=1, augment={"name": "none"}), make_data()
    steps = len(data["y_train"]) // spec.batch_size
    run = trainer(spec, data, 0, runtime=tiny_runtime(checkpoint_every_minutes=1e-9), cls=Scripted)
    run.fit(tmp_path / "run.ckpt")
    assert run.saves == [(0, b) for b in range(1, steps + 1)] + [(1, 0)]


# -------------------------------------------------------------------------- divergence
def test_divergence_is_recorded_and_a_rerun_fails_at_once_until_the_spec_changes(tmp_path, monkeypatch):
    spec, data = tiny_spec(optimizer={"lr": 1e12, "weight_decay": 0.0}, augment={"name": "none"}), make_data()
    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(Diverged, match=r"^training diverged: loss is \w+ at epoch 1, step \d+$") as first:
        train(spec, data, 0, tmp_path / "out", ckpt)
    assert isinstance(first.value, UserError)
    assert not (tmp_path / "out" / "model.pt").exists()
    saved = Checkpoint.load(ckpt)
    assert saved.divergence is not None and saved.divergence.message() == str(first.value)
    recorded = ckpt.read_bytes()

    def no_training(self, x, y):
        raise AssertionError("a recorded divergence must stop the rerun before any step")

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train_step", no_training)
        # the same spec, under the same and under other speed settings: the same one line
        for runtime in (tiny_runtime(), tiny_runtime(channels_last=False, eval_every_epochs=2)):
            with pytest.raises(Diverged) as again:
                train(spec, data, 0, tmp_path / "out", ckpt, runtime=runtime)
            message = str(again.value)
            assert message.startswith(str(first.value) + " (") and "\n" not in message
            assert str(ckpt) in message
            assert ckpt.read_bytes() == recorded
            assert not (tmp_path / "out" / "model.pt").exists()

    changed = tiny_spec(optimizer={"lr": 0.05, "weight_decay": 0.0}, augment={"name": "none"})
    log = Log()
    out = train(changed, data, 0, tmp_path / "out", ckpt, log=log)
    assert "starting afresh" in log.text() and "resumed from" not in log.text()
    fresh = train(changed, data, 0, tmp_path / "fresh", None)
    assert_states_equal(load_state(out / "model.pt"), load_state(fresh / "model.pt"))
    assert not ckpt.exists()


class NanAtStep(torch.nn.Module):
    """A loss that turns NaN at the given training step (validation passes no gradient)."""

    def __init__(self, loss: torch.nn.Module, step: int):
        super().__init__()
        self.loss, self.step, self.calls = loss, step, 0

    def forward(self, logits, y):
        loss = self.loss(logits, y)
        if logits.requires_grad:  # training steps only, not validation
            self.calls += 1
            if self.calls == self.step:
                return loss * float("nan")
        return loss


def test_diverged_names_the_first_bad_epoch_and_step(tmp_path):
    spec = tiny_spec(epochs=3, augment={"name": "none"})
    data = make_data()
    steps = len(data["y_train"]) // spec.batch_size
    run = trainer(spec, data, 0)
    # the loss the training step runs sits inside the network module (compiled together)
    run.parts.step_model.loss_fn = NanAtStep(run.parts.loss_fn, steps + 3)
    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(Diverged, match=r"\bepoch 2, step 3\b"):
        run.fit(ckpt)
    assert Checkpoint.load(ckpt).divergence == Divergence(epoch=2, step=3, loss="nan")


# ------------------------------------------------------------------- SAM and BatchNorm
def bn_buffers(model: torch.nn.Module) -> dict:
    return {name: buf.clone() for name, buf in model.named_buffers()
            if "running" in name or "num_batches" in name}


@pytest.mark.parametrize("name", ["sam", "asam"])
def test_sam_step_updates_batchnorm_stats_once(name):
    spec = tiny_spec(optimizer={"name": name, "rho": 0.5}, augment={"name": "none"})
    run = trainer(spec, make_data(), 0)
    initial = copy.deepcopy(run.model)
    x, y = next(iter(run.inputs.epoch(0, 0)))
    run.model.train()
    run.train_step(x, y)

    once = copy.deepcopy(initial).train()
    with torch.no_grad():
        once(x)
    got, want = bn_buffers(run.model), bn_buffers(once)
    assert got and list(got) == list(want)
    assert_states_equal(got, want)
    assert states_differ(got, bn_buffers(initial)), "the first pass must update the running stats"
    assert states_differ(run.model.state_dict(), initial.state_dict())
    # sensitivity: a second (perturbed) pass that tracked statistics would change them
    with torch.no_grad():
        once(x + 0.5)
    assert states_differ(got, bn_buffers(once))


# -------------------------------------------------------------------------- user errors
def test_cuda_device_without_cuda_is_a_user_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="device"):
        trainer(tiny_spec(), make_data(), 0, runtime=tiny_runtime(device="cuda"))


def test_pretrained_without_weights_file_is_a_user_error():
    spec = tiny_spec(model={"name": "resnet18", "pretrained": True})
    with pytest.raises(UserError, match="model.pretrained"):
        trainer(spec, make_data(), 0)


def test_pretrained_weights_are_loaded_from_the_file(tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(123)
    state = resnet18().state_dict()
    torch.save(state, tmp_path / "resnet18.pth")
    spec = tiny_spec(model={"name": "resnet18", "pretrained": True, "input_size": 32})
    run = trainer(spec, make_data(), 0, weights_file=str(tmp_path / "resnet18.pth"))
    own = run.model.net.state_dict()
    assert_states_equal({k: own[k] for k in state if not k.startswith("fc.")},
                        {k: v for k, v in state.items() if not k.startswith("fc.")})
    assert own["fc.weight"].shape == (10, 512)


def test_batch_larger_than_training_set_is_a_user_error():
    with pytest.raises(UserError, match="batch_size"):
        trainer(tiny_spec(batch_size=1000), make_data(), 0)


# ------------------------------------------------------------------------------ the CLI
# 256 images at batch 8: 32 steps per epoch, 3 epochs. Interrupted runs pause inside a chosen
# step (the hook below) until the test's signal has been handled, so a signal lands at an exact
# point of the epoch however slow the machine is; nothing here waits a fixed time.
CLI_STEPS = 32
CLI_TRAINING = dict(epochs=3, batch_size=8, augment={"name": "none"}, ema={"enabled": True, "decay": 0.9})
PROCESS_TIMEOUT = 600.0  # seconds; the CPUs may be shared with other work

# `cifar-ensembles ARGS`, paused right after optimizer step PAUSE_AT_STEP of this process: it
# writes "epoch batch" (the step's 1-based batch) to PAUSE_MARKER and waits until a stop
# signal has been handled (SIGTERM/SIGUSR1) or it is killed; the loop then goes on as usual.
PAUSING_CLI = """
import os, sys, time
from pathlib import Path
from cifar_ensembles import cli
from cifar_ensembles.training import Trainer, signals

pause_at, marker = int(os.environ["PAUSE_AT_STEP"]), Path(os.environ["PAUSE_MARKER"])
real_step, real_handle, steps, handled = Trainer.train_step, signals.StopFlag._handle, [0], []

def handle(self, signum, frame):
    real_handle(self, signum, frame)
    handled.append(signum)

def train_step(self, x, y):
    out = real_step(self, x, y)
    steps[0] += 1
    if steps[0] == pause_at:
        tmp = marker.with_name(marker.name + ".tmp")
        tmp.write_text(f"{self.position.epoch} {self.position.batch + 1}")
        os.replace(tmp, marker)
        deadline = time.monotonic() + 900
        while not handled:
            if time.monotonic() > deadline:
                os._exit(3)  # the test is gone: do not linger
            time.sleep(0.01)
    return out

signals.StopFlag._handle = handle
Trainer.train_step = train_step
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """The data file, and the weights and history of an uninterrupted run (in-process: the CLI
    only loads the file and calls train_to_files)."""
    root = tmp_path_factory.mktemp("cli")
    npz = root / "data.npz"
    splits.write(npz, make_data(n_train=256))
    spec, runtime = tiny_spec(**CLI_TRAINING), tiny_runtime()
    train_to_files(spec, runtime, splits.load(npz), 0, root / "reference", root / "reference.ckpt", 1,
                   log=quiet)
    return SimpleNamespace(npz=npz, spec=spec, runtime=runtime,
                           state=load_state(root / "reference" / "model.pt"),
                           history=read_history(root / "reference" / "history.csv"))


def train_args(run, out_dir: Path, ckpt: Path, spec=None, runtime=None) -> list:
    return ["train", "--data", run.npz, "--spec", to_json(spec or run.spec),
            "--runtime", to_json(runtime or run.runtime), "--seed", 0, "--out-dir", out_dir,
            "--checkpoint", ckpt, "--threads", 1]


@contextlib.contextmanager
def paused_cli(args: list, pause_at: int, workdir: Path):
    """Start the CLI paused after step `pause_at`; yields (process, (epoch, batch) of the pause,
    stderr file). The process is killed on the way out if it is still running."""
    workdir.mkdir(parents=True, exist_ok=True)
    marker, stderr = workdir / "paused", workdir / "stderr.txt"
    env = {**ENV, "PAUSE_AT_STEP": str(pause_at), "PAUSE_MARKER": str(marker)}
    with open(stderr, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", PAUSING_CLI, *map(str, args)], env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + PROCESS_TIMEOUT
        while not marker.exists():
            try:
                code = proc.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                assert time.monotonic() < deadline, f"no pause in {PROCESS_TIMEOUT} s: {stderr.read_text()}"
                continue
            raise AssertionError(f"training exited {code} before step {pause_at}: {stderr.read_text()}")
        epoch, batch = map(int, marker.read_text().split())
        yield proc, (epoch, batch), stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def stop(proc: subprocess.Popen, signum: int, stderr: Path) -> str:
    proc.send_signal(signum)
    proc.wait(timeout=PROCESS_TIMEOUT)
    return stderr.read_text()


def assert_preempted(proc: subprocess.Popen, text: str, ckpt: Path, position: tuple[int, int]) -> Checkpoint:
    assert proc.returncode == 75, text
    assert "stopped" in text.strip().splitlines()[-1], text
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["format"] == CHECKPOINT_FORMAT
    saved = Checkpoint.load(ckpt)
    assert (saved.epoch, saved.batch) == position
    assert len(saved.history) == saved.epoch
    return saved


def rerun(args: list) -> str:
    proc = cli(*args, timeout=PROCESS_TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def assert_same_run(out_dir: Path, ckpt: Path, run) -> None:
    """The resumed run ends as the uninterrupted one: weights and every result cell, bit for bit."""
    assert not ckpt.exists()
    assert not list(ckpt.parent.iterdir()), "temporary checkpoint files left behind"
    assert_states_equal(load_state(out_dir / "model.pt"), run.state)
    assert result_cells(read_history(out_dir / "history.csv")) == result_cells(run.history)


POINTS = {"first-batch": 1, "middle": CLI_STEPS // 2, "last-batch": CLI_STEPS}


# Every position within an epoch is resumed in process (test_resume_mid_epoch_after_signal_is_bit_exact);
# through the command, what a real process adds: its exit code and a kill with no handler.
@pytest.mark.parametrize("point", ["middle"])
def test_cli_sigterm_mid_epoch_exits_75_and_resumes_bit_exact(cli_run, tmp_path, point):
    batch = POINTS[point]
    ckpt, out = tmp_path / "ckpt" / "run.ckpt", tmp_path / "out"
    args = train_args(cli_run, out, ckpt)
    with paused_cli(args, CLI_STEPS + batch, tmp_path / "first") as (proc, paused, stderr):
        assert paused == (1, batch)
        text = stop(proc, signal.SIGTERM, stderr)
    saved = assert_preempted(proc, text, ckpt, (1, batch))
    losses = saved.progress.losses
    assert bool((losses[:batch] != 0).all()) and bool((losses[batch:] == 0).all())
    assert not (out / "model.pt").exists()

    text = rerun(args)
    assert f"resumed from {ckpt}: epoch 2, batch {batch}" in text
    assert_same_run(out, ckpt, cli_run)


@pytest.mark.parametrize("point", ["first-batch", "last-batch"])
def test_cli_sigkill_mid_epoch_resumes_from_the_last_checkpoint_bit_exact(cli_run, tmp_path, point):
    """With a checkpoint after every step (checkpoint_every_minutes), a kill loses only the step
    in flight; the rerun replays it and ends as the uninterrupted run."""
    batch = POINTS[point]
    ckpt, out = tmp_path / "ckpt" / "run.ckpt", tmp_path / "out"
    runtime = dataclasses.replace(cli_run.runtime, checkpoint_every_minutes=1e-9)
    args = train_args(cli_run, out, ckpt, runtime=runtime)
    with paused_cli(args, CLI_STEPS + batch, tmp_path / "first") as (proc, paused, stderr):
        assert paused == (1, batch)
        stop(proc, signal.SIGKILL, stderr)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "model.pt").exists()
    killed = Checkpoint.load(ckpt)
    assert (killed.epoch, killed.batch) == (1, batch - 1)

    text = rerun(args)
    assert f"resumed from {ckpt}: epoch 2, batch {batch - 1}" in text
    assert_same_run(out, ckpt, cli_run)


def test_cli_resume_after_sigkill_then_sigusr1_is_bit_exact(cli_run, tmp_path):
    ckpt, out = tmp_path / "ckpt" / "run.ckpt", tmp_path / "out"
    args = train_args(cli_run, out, ckpt)

    # killed inside epoch 2: the checkpoint of epoch 1 is what is left
    with paused_cli(args, CLI_STEPS + 8, tmp_path / "first") as (proc, paused, stderr):
        assert paused == (1, 8)
        stop(proc, signal.SIGKILL, stderr)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "model.pt").exists()
    killed = Checkpoint.load(ckpt)
    assert (killed.epoch, killed.batch) == (1, 0)

    # the rerun resumes, and is then stopped by SLURM's warning signal inside epoch 3
    with paused_cli(args, CLI_STEPS + 10, tmp_path / "second") as (proc, paused, stderr):
        assert paused == (2, 10)
        text = stop(proc, signal.SIGUSR1, stderr)
    assert_preempted(proc, text, ckpt, (2, 10))
    assert f"resumed from {ckpt}: epoch 2, batch 0" in text

    text = rerun(args)
    assert f"resumed from {ckpt}: epoch 3, batch 10" in text
    assert_same_run(out, ckpt, cli_run)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one-line error of a failed CLI run (its last stderr line)."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    prefix = "cifar-ensembles train: error: "
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(prefix), proc.stderr
    return line[len(prefix):]


def test_cli_divergence_fails_again_at_once_with_the_same_line(cli_run, tmp_path):
    spec = tiny_spec(epochs=2, optimizer={"lr": 1e12, "weight_decay": 0.0}, augment={"name": "none"})
    ckpt, out = tmp_path / "ckpt" / "run.ckpt", tmp_path / "out"
    args = train_args(cli_run, out, ckpt, spec=spec)
    first = error_line(cli(*args, timeout=PROCESS_TIMEOUT))
    assert first.startswith("training diverged: loss is ") and "at epoch 1, step" in first
    recorded = ckpt.read_bytes()

    again = cli(*args, timeout=PROCESS_TIMEOUT)
    assert error_line(again).startswith(first + " (recorded in " + str(ckpt))
    assert "epoch 1/2" not in again.stderr  # no epoch was trained
    assert ckpt.read_bytes() == recorded
    assert not (out / "model.pt").exists()


def test_cli_damaged_checkpoint_exits_2_naming_it(cli_run, tmp_path):
    ckpt, out = tmp_path / "ckpt" / "run.ckpt", tmp_path / "out"
    ckpt.parent.mkdir()
    data = splits.load(cli_run.npz)
    damage("truncated", ckpt, trainer(cli_run.spec, data, 0, runtime=cli_run.runtime).checkpoint())
    line = error_line(cli(*train_args(cli_run, out, ckpt), timeout=PROCESS_TIMEOUT))
    assert line.startswith(f"{ckpt}: not a readable checkpoint") and line.endswith(RESUME_AFRESH)
    assert ckpt.exists() and not (out / "model.pt").exists()


def test_cli_cuda_without_cuda_exits_2_with_one_line(cli_run, tmp_path):
    args = train_args(cli_run, tmp_path / "out", tmp_path / "run.ckpt",
                      runtime=dataclasses.replace(cli_run.runtime, device="cuda"))
    proc = subprocess.run([sys.executable, "-m", "cifar_ensembles.cli", *map(str, args)],
                          env={**ENV, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True,
                          timeout=PROCESS_TIMEOUT)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "device" in lines[0], proc.stderr
    assert not (tmp_path / "out" / "model.pt").exists()
