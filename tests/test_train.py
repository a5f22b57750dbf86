"""The trainer: determinism, bit-exact resume (in-process and across a killed/signalled CLI run),
checkpoint hygiene, output files, divergence, SAM's BatchNorm handling and device errors."""

from __future__ import annotations

import copy
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cifar_ensembles import prepare, train
from cifar_ensembles.errors import UserError
from cifar_ensembles.train import Trainer, train_to_files

HISTORY_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc",
                   "ema_val_loss", "ema_val_acc", "seconds", "images_per_second"]
TIMING = ("seconds", "images_per_second")
ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}


# ----------------------------------------------------------------------------- helpers
def make_data(n_train: int = 96, size: int = 16, channels: int = 3, n_val: int = 32, n_test: int = 32,
              seed: int = 0) -> dict:
    """Random uint8 images in the layout of prepare.split()."""
    rng = np.random.default_rng(seed)
    n = n_train + n_val
    x = rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)
    y = rng.integers(0, 10, n).astype(np.int64)
    train_index, val_index = np.arange(n_train), np.arange(n_train, n)
    mean, std = prepare.channel_stats(x[train_index])
    return dict(x_train=x[train_index], y_train=y[train_index], x_val=x[val_index], y_val=y[val_index],
                x_test=rng.integers(0, 256, (n_test, size, size, channels), dtype=np.uint8),
                y_test=rng.integers(0, 10, n_test).astype(np.int64),
                classes=np.array([f"class{i}" for i in range(10)]), mean=mean, std=std,
                train_index=train_index, val_index=val_index, test_index=np.arange(n_test))


def make_spec(**overrides) -> dict:
    spec = {"epochs": 2, "batch_size": 16, "model": {"name": "resnet18_cifar", "width": 4},
            "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
            "scheduler": {"name": "cosine", "interval": "step"}, "loss": {"name": "asl"},
            "augment": {"name": "torchvision"}, "ema": {"enabled": False},
            "loader": {"num_workers": 0}, "device": "cpu"}
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec


def quiet(_msg):
    pass


class Log:
    def __init__(self):
        self.lines = []

    def __call__(self, msg):
        self.lines.append(msg)

    def text(self) -> str:
        return "\n".join(self.lines)


def load_state(path) -> dict:
    record = torch.load(path, map_location="cpu", weights_only=True)
    return record["state_dict"]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.detach().cpu(), b.detach().cpu()
    return a.dtype == b.dtype and a.shape == b.shape and a.numpy().tobytes() == b.numpy().tobytes()


def assert_states_equal(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    different = [k for k in a if not same_bits(a[k], b[k])]
    assert not different, f"tensors differ: {different[:5]}"


def states_differ(a: dict, b: dict) -> bool:
    return any(not same_bits(a[k], b[k]) for k in a if a[k].is_floating_point())


def read_history(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def header(path) -> list[str]:
    return Path(path).read_text().splitlines()[0].split(",")


# ------------------------------------------------------------------------- determinism
DETERMINISM_CASES = {
    "sgd-torchvision": make_spec(),
    "asam-albumentations-ema": make_spec(optimizer={"name": "asam", "rho": 0.5},
                                         augment={"name": "albumentations"},
                                         ema={"enabled": True, "decay": 0.9}),
    "adam-none": make_spec(optimizer={"name": "adam", "lr": 1e-3, "weight_decay": 0.0},
                           augment={"name": "none"}, scheduler={"name": "cosine", "interval": "epoch"}),
}


@pytest.mark.parametrize("case", list(DETERMINISM_CASES))
def test_same_seed_gives_identical_weights_and_history(case, tmp_path):
    spec, data = DETERMINISM_CASES[case], make_data()
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        train_to_files(spec, data, seed, tmp_path / name, None, log=quiet)
    a, b, c = (load_state(tmp_path / n / "model.pt") for n in "abc")
    assert_states_equal(a, b)
    assert states_differ(a, c), "another seed must give other weights"
    ha, hb = read_history(tmp_path / "a" / "history.csv"), read_history(tmp_path / "b" / "history.csv")
    assert len(ha) == spec["epochs"]
    assert without_timing(ha) == without_timing(hb)
    assert all(float(row[col]) > 0 for row in ha for col in TIMING)


# ------------------------------------------------------------------------ output files
def test_outputs_without_ema_and_checkpoint_is_deleted(tmp_path):
    spec = make_spec()
    ckpt = tmp_path / "ckpt" / "train.ckpt"
    out = train_to_files(spec, make_data(), 5, tmp_path / "out", ckpt, threads=1, log=quiet)
    assert out == tmp_path / "out"
    assert not ckpt.exists(), "the checkpoint must be removed after a successful run"
    record = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    assert record["format"] == train.MODEL_FORMAT
    assert record["ema"] is False
    assert record["num_classes"] == 10 and record["in_channels"] == 3
    assert isinstance(record["state_dict"], dict) and "fc.weight" in record["state_dict"]

    assert header(out / "history.csv") == HISTORY_COLUMNS
    rows = read_history(out / "history.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for row in rows:
        assert row["ema_val_loss"] == "" and row["ema_val_acc"] == ""
        assert 0.0 <= float(row["val_acc"]) <= 1.0 and np.isfinite(float(row["train_loss"]))

    info = yaml.safe_load((out / "run.yaml").read_text())
    assert info["seed"] == 5
    assert info["device"] == "cpu"
    assert info["versions"]["torch"] == str(torch.__version__)
    assert "cifar_ensembles" in info["versions"]
    assert info["config"] == spec
    assert info["final_weights"] == "raw"
    leftovers = [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temporary files left behind: {leftovers}"


def test_model_pt_holds_ema_weights(tmp_path, monkeypatch):
    trainers = []

    class Recording(Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)

    monkeypatch.setattr(train, "Trainer", Recording)
    spec = make_spec(ema={"enabled": True, "decay": 0.9}, augment={"name": "none"})
    out = train_to_files(spec, make_data(), 0, tmp_path / "out", tmp_path / "ckpt", log=quiet)
    (trainer,) = trainers
    saved = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    assert saved["ema"] is True
    assert_states_equal(saved["state_dict"], trainer.ema.module.state_dict())
    assert states_differ(saved["state_dict"], trainer.model.state_dict()), "raw weights were saved"
    assert header(out / "history.csv") == HISTORY_COLUMNS
    for row in read_history(out / "history.csv"):
        assert 0.0 <= float(row["ema_val_acc"]) <= 1.0
        assert np.isfinite(float(row["ema_val_loss"]))
    assert yaml.safe_load((out / "run.yaml").read_text())["final_weights"] == "ema"


# --------------------------------------------------------------------- in-process resume
class StopAfterEpoch(Trainer):
    """Simulates a kill right after the checkpoint of epoch `stop_epoch` is written."""

    stop_epoch = 2

    def save_checkpoint(self, path):
        super().save_checkpoint(path)
        if self.position.epoch == self.stop_epoch and self.position.batch == 0:
            raise KeyboardInterrupt("simulated kill")


class SignalAtStep(Trainer):
    """Sends itself a signal after `at_step` optimizer steps, as SLURM would mid-epoch."""

    at_step, signum, steps = 9, signal.SIGTERM, 0

    def train_step(self, x, y):
        out = super().train_step(x, y)
        SignalAtStep.steps += 1
        if SignalAtStep.steps == self.at_step:
            signal.raise_signal(self.signum)
        return out


@pytest.mark.parametrize("optimizer", ["sgd", "sam"])
def test_resume_at_epoch_boundary_is_bit_exact(tmp_path, optimizer):
    spec, data = make_spec(epochs=4, optimizer={"name": optimizer}), make_data()
    reference = Trainer(spec, data, 1, log=quiet)
    reference_history = reference.fit()

    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(KeyboardInterrupt):
        StopAfterEpoch(spec, data, 1, log=quiet).fit(ckpt)
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert (saved["epoch"], saved["batch"]) == (2, 0)

    log = Log()
    resumed = Trainer(spec, data, 1, log=log)
    history = resumed.fit(ckpt)
    assert "epoch 3, batch 0" in log.text()
    assert_states_equal(resumed.model.state_dict(), reference.model.state_dict())
    opt, ref_opt = resumed.optimizer, reference.optimizer
    if optimizer == "sam":
        opt, ref_opt = opt.base_optimizer, ref_opt.base_optimizer
    assert_states_equal(opt.state_dict()["state"][0], ref_opt.state_dict()["state"][0])
    assert without_timing(history) == without_timing(reference_history)


def test_resume_mid_epoch_after_signal_is_bit_exact(tmp_path):
    """ASAM + EMA + albumentations + per-step cosine: every piece of state must survive."""
    spec = make_spec(epochs=3, optimizer={"name": "asam"}, augment={"name": "albumentations"},
                     ema={"enabled": True, "decay": 0.9})
    data = make_data()
    steps = len(data["y_train"]) // spec["batch_size"]
    reference = Trainer(spec, data, 2, log=quiet)
    reference_history = reference.fit()

    ckpt = tmp_path / "run.ckpt"
    SignalAtStep.steps, SignalAtStep.at_step = 0, steps + 2
    old_handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(train.Preempted):
        SignalAtStep(spec, data, 2, log=quiet).fit(ckpt)
    assert signal.getsignal(signal.SIGTERM) == old_handler, "signal handlers must be restored"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert (saved["epoch"], saved["batch"]) == (1, 2)

    log = Log()
    resumed = Trainer(spec, data, 2, log=log)
    history = resumed.fit(ckpt)
    assert "epoch 2, batch 2" in log.text()
    assert_states_equal(resumed.model.state_dict(), reference.model.state_dict())
    assert_states_equal(resumed.ema.module.state_dict(), reference.ema.module.state_dict())
    exact = [{k: v for k, v in row.items() if k not in (*TIMING, "train_loss")} for row in history]
    assert exact == [{k: v for k, v in row.items() if k not in (*TIMING, "train_loss")}
                     for row in reference_history]
    # the epoch's loss is summed in two parts across the interruption: equal up to rounding
    for got, want in zip(history, reference_history):
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-6)


def test_checkpoint_of_another_config_is_not_resumed(tmp_path):
    data = make_data()
    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(KeyboardInterrupt):
        StopAfterEpoch(make_spec(epochs=3), data, 0, log=quiet).fit(ckpt)
    assert ckpt.exists()

    other = make_spec(epochs=3, optimizer={"lr": 0.02})
    log = Log()
    out = train_to_files(other, data, 0, tmp_path / "resumed", ckpt, log=log)
    assert "another config" in log.text() and "starting afresh" in log.text()
    assert "resumed from" not in log.text()
    fresh = train_to_files(other, data, 0, tmp_path / "fresh", None, log=quiet)
    assert_states_equal(load_state(out / "model.pt"), load_state(fresh / "model.pt"))
    assert not ckpt.exists()


def test_checkpoint_of_another_seed_is_not_resumed(tmp_path):
    spec, data = make_spec(epochs=3), make_data()
    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(KeyboardInterrupt):
        StopAfterEpoch(spec, data, 0, log=quiet).fit(ckpt)
    log = Log()
    Trainer(spec, data, 1, log=log).try_resume(ckpt)
    assert "starting afresh" in log.text()


def test_unreadable_checkpoint_starts_afresh(tmp_path):
    spec, data = make_spec(epochs=1), make_data()
    ckpt = tmp_path / "run.ckpt"
    ckpt.write_bytes(np.random.default_rng(0).bytes(300))
    log = Log()
    out = train_to_files(spec, data, 0, tmp_path / "out", ckpt, log=log)
    assert "unreadable" in log.text() and "starting afresh" in log.text()
    fresh = train_to_files(spec, data, 0, tmp_path / "fresh", None, log=quiet)
    assert_states_equal(load_state(out / "model.pt"), load_state(fresh / "model.pt"))


# -------------------------------------------------------------------------- divergence
def test_huge_learning_rate_raises_diverged(tmp_path):
    spec = make_spec(optimizer={"lr": 1e12, "weight_decay": 0.0}, augment={"name": "none"})
    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(train.Diverged, match=r"epoch 1, step \d+") as info:
        train_to_files(spec, make_data(), 0, tmp_path / "out", ckpt, log=quiet)
    assert isinstance(info.value, UserError)
    assert not (tmp_path / "out" / "model.pt").exists()


def test_diverged_names_the_first_bad_epoch_and_step():
    spec = make_spec(epochs=3, augment={"name": "none"})
    data = make_data()
    steps = len(data["y_train"]) // spec["batch_size"]
    trainer = Trainer(spec, data, 0, log=quiet)
    real_loss, calls = trainer.loss_fn, []

    def loss_fn(logits, y):
        loss = real_loss(logits, y)
        if logits.requires_grad:  # training steps only, not validation
            calls.append(1)
            if len(calls) == steps + 3:
                return loss * float("nan")
        return loss

    trainer.loss_fn = loss_fn
    with pytest.raises(train.Diverged, match=r"\bepoch 2, step 3\b"):
        trainer.fit()


# ------------------------------------------------------------------- SAM and BatchNorm
def bn_buffers(model: torch.nn.Module) -> dict:
    return {name: buf.clone() for name, buf in model.named_buffers()
            if "running" in name or "num_batches" in name}


@pytest.mark.parametrize("name", ["sam", "asam"])
def test_sam_step_updates_batchnorm_stats_once(name):
    spec = make_spec(optimizer={"name": name, "rho": 0.5}, augment={"name": "none"})
    trainer = Trainer(spec, make_data(), 0, log=quiet)
    initial = copy.deepcopy(trainer.model)
    x, y = next(iter(trainer.loader))
    trainer.model.train()
    trainer.train_step(x, y)

    once = copy.deepcopy(initial).train()
    with torch.no_grad():
        once(x)
    got, want = bn_buffers(trainer.model), bn_buffers(once)
    assert got and list(got) == list(want)
    assert_states_equal(got, want)
    assert states_differ(got, bn_buffers(initial)), "the first pass must update the running stats"
    assert states_differ(trainer.model.state_dict(), initial.state_dict())
    # sensitivity: a second (perturbed) pass that tracked statistics would change them
    with torch.no_grad():
        once(x + 0.5)
    assert states_differ(got, bn_buffers(once))


# -------------------------------------------------------------------------- user errors
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_a_user_error():
    with pytest.raises(UserError, match="device"):
        Trainer(make_spec(device="cuda"), make_data(), 0, log=quiet)


def test_pretrained_without_weights_file_is_a_user_error():
    spec = make_spec(model={"name": "resnet18", "pretrained": True})
    with pytest.raises(UserError, match="model.pretrained"):
        Trainer(spec, make_data(), 0, log=quiet)


def test_pretrained_weights_are_loaded_from_the_file(tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(123)
    state = resnet18().state_dict()
    torch.save(state, tmp_path / "resnet18.pth")
    spec = make_spec(model={"name": "resnet18", "pretrained": True, "input_size": 32})
    trainer = Trainer(spec, make_data(), 0, weights_file=str(tmp_path / "resnet18.pth"), log=quiet)
    own = trainer.model.net.state_dict()
    assert_states_equal({k: own[k] for k in state if not k.startswith("fc.")},
                        {k: v for k, v in state.items() if not k.startswith("fc.")})
    assert own["fc.weight"].shape == (10, 512)


def test_batch_larger_than_training_set_is_a_user_error():
    with pytest.raises(UserError, match="batch_size"):
        Trainer(make_spec(batch_size=1000), make_data(), 0, log=quiet)


def cli(*args):
    return [sys.executable, "-m", "cifar_ensembles", *map(str, args)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_cuda_without_cuda_exits_2_with_one_line(tmp_path):
    npz = tmp_path / "data.npz"
    prepare.write(npz, make_data())
    proc = subprocess.run(cli("train", "--data", npz, "--spec", json.dumps(make_spec(device="cuda")),
                              "--seed", 0, "--out-dir", tmp_path / "out", "--threads", 1),
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "device" in lines[0], proc.stderr
    assert not (tmp_path / "out" / "model.pt").exists()


# -------------------------------------------------------- CLI: kill, SIGTERM, SIGUSR1
# 256 images at batch 8: 32 steps per epoch, so a signal sent after an epoch's log line lands
# inside the next epoch (the stop flag is looked at after every step).
CLI_SPEC = make_spec(epochs=3, batch_size=8, augment={"name": "none"}, ema={"enabled": True, "decay": 0.9})


def train_cmd(npz, out_dir, ckpt):
    return cli("train", "--data", npz, "--spec", json.dumps(CLI_SPEC), "--seed", 0,
               "--out-dir", out_dir, "--checkpoint", ckpt, "--threads", 1)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """The data file, and the weights and history of an uninterrupted run (in-process: the CLI
    only loads the file and calls train_to_files)."""
    root = tmp_path_factory.mktemp("cli")
    npz = root / "data.npz"
    prepare.write(npz, make_data(n_train=256))
    train_to_files(CLI_SPEC, prepare.load(npz), 0, root / "reference", root / "reference.ckpt",
                   threads=1, log=quiet)
    return npz, load_state(root / "reference" / "model.pt"), read_history(root / "reference" / "history.csv")


def start(cmd) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"training ended before writing {path}: {proc.communicate()[1]}"
        assert time.monotonic() < deadline, f"no checkpoint after {timeout} s"
        time.sleep(0.005)


def wait_for_line(proc: subprocess.Popen, prefix: str) -> str:
    """Read stderr up to the line starting with `prefix` (logged inside fit: handlers are set)."""
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith(prefix):
            return "".join(seen)
    raise AssertionError(f"no line {prefix!r} before exit {proc.wait()}: {''.join(seen)}")


def finish(proc: subprocess.Popen, timeout: float = 120.0) -> str:
    try:
        return proc.communicate(timeout=timeout)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def waiting(proc: subprocess.Popen, wait, *args):
    """Run `wait(*args)`; on failure kill the process instead of leaving it behind."""
    try:
        return wait(*args)
    except BaseException:
        proc.kill()
        proc.communicate()
        raise


def stop_with(proc: subprocess.Popen, signum: int, ckpt: Path) -> dict:
    """Send `signum` after epoch 1 or 2's line; check the exit and return the checkpoint."""
    proc.send_signal(signum)
    stderr = finish(proc)
    assert proc.returncode == 75, stderr
    assert "stopped" in stderr.strip().splitlines()[-1], stderr
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["format"] == train.CHECKPOINT_FORMAT
    assert 1 <= saved["epoch"] < CLI_SPEC["epochs"]
    assert saved["batch"] > 0, "the checkpoint must be taken inside the epoch"
    assert len(saved["history"]) == saved["epoch"]
    return saved


def rerun(cmd) -> str:
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def assert_same_run(out_dir: Path, reference: dict, reference_history: list[dict]) -> None:
    assert_states_equal(load_state(out_dir / "model.pt"), reference)
    got = read_history(out_dir / "history.csv")
    skip = (*TIMING, "train_loss")  # an interrupted epoch's loss is summed in two parts
    assert ([{k: v for k, v in r.items() if k not in skip} for r in got]
            == [{k: v for k, v in r.items() if k not in skip} for r in reference_history])
    for a, b in zip(got, reference_history):
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), rel=1e-6)


def test_cli_sigterm_mid_epoch_exits_75_and_resumes_bit_exact(cli_run, tmp_path):
    npz, reference, reference_history = cli_run
    ckpt = tmp_path / "ckpt" / "run.ckpt"
    cmd = train_cmd(npz, tmp_path / "out", ckpt)
    proc = start(cmd)
    waiting(proc, wait_for_line, proc, "epoch 1/3")
    saved = stop_with(proc, signal.SIGTERM, ckpt)
    assert not (tmp_path / "out" / "model.pt").exists()

    stderr = rerun(cmd)
    assert f"resumed from {ckpt}: epoch {saved['epoch'] + 1}, batch {saved['batch']}" in stderr
    assert not ckpt.exists()
    assert_same_run(tmp_path / "out", reference, reference_history)


def test_cli_resume_after_sigkill_then_sigusr1_is_bit_exact(cli_run, tmp_path):
    npz, reference, reference_history = cli_run
    ckpt = tmp_path / "ckpt" / "run.ckpt"
    cmd = train_cmd(npz, tmp_path / "out", ckpt)

    proc = start(cmd)
    waiting(proc, wait_for_file, ckpt, proc)  # epoch 1 is done
    proc.send_signal(signal.SIGKILL)
    finish(proc)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "out" / "model.pt").exists()
    killed = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert (killed["epoch"], killed["batch"]) == (1, 0)

    # the rerun resumes, and is then stopped by SLURM's warning signal inside epoch 3
    proc = start(cmd)
    seen = waiting(proc, wait_for_line, proc, "epoch 2/3")
    saved = stop_with(proc, signal.SIGUSR1, ckpt)
    assert f"resumed from {ckpt}: epoch 2, batch 0" in seen
    assert saved["epoch"] == 2

    stderr = rerun(cmd)
    assert f"resumed from {ckpt}: epoch 3, batch {saved['batch']}" in stderr
    assert not ckpt.exists()
    assert_same_run(tmp_path / "out", reference, reference_history)
