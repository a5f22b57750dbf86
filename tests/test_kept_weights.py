"""What a run keeps besides its final model: the cosine_restarts schedule, snapshots at chosen
epochs, the SWA average (with and without SWALR) and its BatchNorm refresh, all of it through
a bit-exact resume, members.pt and run.yaml, and the config checks that keep them consistent.

References are computed here from the definitions (SGDR's closed form, SWALR's anneal, the mean
of the epoch-end weights, BatchNorm's cumulative average) or from shorter plain runs."""

from __future__ import annotations

import dataclasses
import math
import re
import signal

import pytest
import torch
import yaml
from conftest import (
    Log,
    assert_damaged,
    assert_states_equal,
    load_config,
    make_data,
    result_cells,
    states_differ,
    tiny_runtime,
    tiny_spec,
    training_spec,
)
from test_schedules import BASE_LR, cosine, lrs, make_opt
from test_train import Scripted, StopAfterEpoch, trainer

from cifar_ensembles.compute.inference import normalized_batches
from cifar_ensembles.config.check import validate_config
from cifar_ensembles.config.spec import result_spec
from cifar_ensembles.errors import Preempted, UserError
from cifar_ensembles.files.records import DamagedFile
from cifar_ensembles.files.training_run import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_FORMAT_2,
    MEMBERS_FORMAT,
    Checkpoint,
    ModelRecord,
    load_member,
)
from cifar_ensembles.models import build_model
from cifar_ensembles.schedules import build_scheduler
from cifar_ensembles.stages import train as train_stage
from cifar_ensembles.stages.train import train_to_files
from cifar_ensembles.training import Trainer

SWA_LR = dict(enabled=True, start_epoch=2, lr=0.01, anneal_epochs=2)


def sgdr(t, period, hi, lo):
    """SGDR with T_mult 1 (Loshchilov & Hutter): lo + (hi - lo)(1 + cos(pi (t mod T) / T)) / 2."""
    return lo + (hi - lo) * (1 + math.cos(math.pi * (t % period) / period)) / 2


def swalr(k, start_lr, swa_lr, anneal_epochs):
    """The lr k epochs after SWALR took over at `start_lr` (torch's SWALR.get_lr with the cos
    strategy, unrolled: alpha_k = (1 - cos(pi min(k / anneal, 1))) / 2 of the way to swa_lr)."""
    alpha = (1 - math.cos(math.pi * min(k / max(1, anneal_epochs), 1))) / 2
    return swa_lr if alpha == 1 else swa_lr * alpha + start_lr * (1 - alpha)


def fitted(spec, data, seed=0, cls=Trainer, **kwargs) -> Trainer:
    run = trainer(spec, data, seed, cls=cls, **kwargs)
    run.fit()
    return run


def assert_members_equal(a: dict[str, ModelRecord], b: dict[str, ModelRecord]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].ema == b[name].ema, name
        assert_states_equal(a[name].state_dict, b[name].state_dict)


# ---------------------------------------------------------------------- cosine_restarts
@pytest.mark.parametrize("interval, epochs, steps_per_epoch, cycles", [
    ("step", 6, 4, 3), ("step", 4, 3, 2), ("epoch", 8, 50, 4), ("epoch", 9, 7, 3)])
def test_cosine_restarts_follows_the_sgdr_closed_form(interval, epochs, steps_per_epoch, cycles):
    """M equal cycles, each from lr down toward min_lr and back to lr at the restart; a cycle is
    counted in steps or epochs as the schedule is stepped."""
    min_lr = 0.004
    spec = training_spec(scheduler=dict(name="cosine_restarts", interval=interval, cycles=cycles,
                                        min_lr=min_lr)).scheduler
    opt = make_opt()
    n = epochs * steps_per_epoch if interval == "step" else epochs
    got = lrs(opt, build_scheduler(opt, spec, epochs, steps_per_epoch), n)
    period = n // cycles
    assert got == pytest.approx([sgdr(t, period, BASE_LR, min_lr) for t in range(n + 1)], rel=1e-9, abs=1e-12)
    assert [got[k * period] for k in range(cycles + 1)] == pytest.approx([BASE_LR] * (cycles + 1))


# ----------------------------------------------------------------------- snapshot epochs
@pytest.mark.parametrize("epochs, cycles", [(6, 3), (12, 4), (10, 2), (5, 5)])
def test_cycle_ends_are_the_ends_of_every_cycle_but_the_last(epochs, cycles):
    spec = tiny_spec(epochs=epochs, scheduler={"name": "cosine_restarts", "cycles": cycles},
                     snapshots={"keep": "cycle_ends"})
    length = epochs // cycles
    assert spec.snapshot_epochs == tuple(k * length for k in range(1, cycles))
    if (epochs, cycles) == (6, 3):
        assert spec.snapshot_epochs == (2, 4)


@pytest.mark.parametrize("epochs, last", [(6, 3), (6, 6), (4, 2), (10, 5)])
def test_last_epochs_are_the_epochs_before_the_final_one(epochs, last):
    """The final model is the last member of the snapshot ensemble; the others end the last-1
    epochs before it."""
    spec = tiny_spec(epochs=epochs, snapshots={"keep": "last_epochs", "last_epochs": last})
    assert spec.snapshot_epochs == tuple(e for e in range(1, epochs) if e > epochs - last)
    if (epochs, last) == (6, 3):
        assert spec.snapshot_epochs == (4, 5)


def test_keep_none_keeps_no_snapshot_whatever_the_other_keys_say():
    spec = tiny_spec(epochs=6, scheduler={"name": "cosine_restarts", "cycles": 3},
                     snapshots={"keep": "none", "last_epochs": 3})
    assert spec.snapshot_epochs == ()


def test_the_result_spec_holds_what_the_run_reads():
    """The fields that change what a run keeps or how SWALR anneals are in the result spec
    exactly when the run reads them (training reruns, a checkpoint is dropped, when they change)."""
    def section(spec, name):
        return result_spec(spec).get(name, {})

    restarts = tiny_spec(epochs=4, scheduler={"name": "cosine_restarts", "cycles": 2})
    assert "cycles" in section(restarts, "scheduler")
    assert "cycles" not in section(tiny_spec(scheduler={"name": "cosine"}), "scheduler")
    assert "last_epochs" in section(tiny_spec(snapshots={"keep": "last_epochs"}), "snapshots")
    assert section(tiny_spec(snapshots={"keep": "cycle_ends"}), "snapshots") == {"keep": "cycle_ends"}
    with_lr = section(tiny_spec(swa={"enabled": True, "lr": 0.01}), "swa")
    assert {"start_epoch", "lr", "anneal_epochs"} <= set(with_lr)
    without_lr = section(tiny_spec(swa={"enabled": True, "lr": None}), "swa")
    assert "start_epoch" in without_lr and "anneal_epochs" not in without_lr


# ------------------------------------------------------------------------------ snapshots
@pytest.mark.parametrize("ema", [False, True], ids=["raw", "ema"])
def test_a_snapshot_is_the_model_pt_of_the_run_that_stops_at_its_epoch(ema):
    """With a constant schedule the first e epochs of a longer run are the e-epoch run (data
    order depends only on seed and epoch), so the epoch-e snapshot must be that run's model.pt,
    bit for bit: the EMA's weights when EMA is on."""
    common = dict(scheduler={"name": "constant"}, ema={"enabled": ema, "decay": 0.9})
    data = make_data()
    run = fitted(tiny_spec(epochs=4, snapshots={"keep": "last_epochs", "last_epochs": 3}, **common), data, 3)
    members = run.member_records()
    assert list(members) == ["epoch2", "epoch3"]
    for epoch in (2, 3):
        short = fitted(tiny_spec(epochs=epoch, **common), data, 3)
        snapshot = members[f"epoch{epoch}"]
        assert snapshot.ema is ema and snapshot.model == short.model_record().model
        assert_states_equal(snapshot.state_dict, short.model_record().state_dict)
        if ema:  # and not the raw weights of that epoch
            assert states_differ(snapshot.state_dict, short.model.state_dict())
    assert states_differ(members["epoch3"].state_dict, run.model_record().state_dict)


# ------------------------------------------------------------------------------------ SWA
class EpochEnds(Trainer):
    """Records the network's parameters at the end of every epoch (after the epoch's own work)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ends: dict[int, dict[str, torch.Tensor]] = {}

    def _end_epoch(self, checkpoint):
        super()._end_epoch(checkpoint)
        self.ends[self.position.epoch] = {k: p.detach().clone() for k, p in self.model.named_parameters()}


def reference_bn_stats(state: dict, spec, run: Trainer, batch_size: int) -> dict[str, torch.Tensor]:
    """BatchNorm's cumulative average (momentum None) by hand: the network with `state`'s
    weights in train mode over the unaugmented training images in order; per BN layer, the mean
    over batches of each batch's per-channel mean and unbiased variance of the layer's input."""
    net = build_model(spec.model, run.num_classes, run.in_channels)
    net.load_state_dict(state)
    net.train()
    bns = {name: m for name, m in net.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    seen: dict[str, list] = {name: [] for name in bns}
    for name, bn in bns.items():
        bn.register_forward_pre_hook(lambda _m, args, name=name: seen[name].append(args[0].detach().double()))
    batches = 0
    with torch.no_grad():
        for x in normalized_batches(run.data["x_train"], run.mean, run.std, torch.device("cpu"), batch_size,
                                    False):
            net(x)
            batches += 1
    out = {}
    for name, inputs in seen.items():
        out[f"{name}.running_mean"] = sum(i.mean((0, 2, 3)) for i in inputs) / len(inputs)
        out[f"{name}.running_var"] = sum(i.var((0, 2, 3), unbiased=True) for i in inputs) / len(inputs)
        out[f"{name}.num_batches_tracked"] = torch.tensor(batches)
    return out


def test_swa_is_the_mean_of_the_epoch_end_weights_with_batchnorm_recomputed():
    """The average of the parameters at the ends of epochs start_epoch..epochs (the schedule
    runs on: swa.lr null), and BatchNorm statistics recomputed over the unaugmented training
    images with the averaged weights (a cumulative average over batches), not any network's
    running statistics, in batches of the training batch size (a result setting), whatever the
    runtime's eval_batch_size."""
    batch = 40  # batches of 40, 40, 16: the cumulative average weighs batches, not images
    spec = tiny_spec(epochs=4, batch_size=batch, swa={"enabled": True, "start_epoch": 2, "lr": None})
    run = fitted(spec, make_data(), 1, cls=EpochEnds, runtime=tiny_runtime(eval_batch_size=7))
    other = fitted(spec, make_data(), 1, runtime=tiny_runtime(eval_batch_size=64))
    assert_states_equal(run.member_records()["swa"].state_dict, other.member_records()["swa"].state_dict)
    members = run.member_records()
    assert list(members) == ["swa"]
    swa = members["swa"]
    assert swa.ema is False
    params = dict(run.model.named_parameters())
    for name in params:
        mean = sum(run.ends[e][name].double() for e in (2, 3, 4)) / 3
        assert torch.allclose(swa.state_dict[name].double(), mean, rtol=1e-5, atol=1e-7), name
    assert states_differ({k: swa.state_dict[k] for k in params}, {k: run.ends[4][k] for k in params})

    want = reference_bn_stats(swa.state_dict, spec, run, batch)
    buffers = [k for k in swa.state_dict if k not in params]
    assert sorted(buffers) == sorted(want)
    for k in buffers:
        if k.endswith("num_batches_tracked"):
            assert int(swa.state_dict[k]) == int(want[k]) == 3, k
        else:
            assert torch.allclose(swa.state_dict[k].double(), want[k], rtol=1e-4, atol=1e-5), k
    raw = run.model.state_dict()
    assert states_differ({k: swa.state_dict[k] for k in buffers}, {k: raw[k] for k in buffers})


class StepLrs(Trainer):
    """Records the learning rate of every optimizer step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.step_lrs: list[float] = []

    def train_step(self, x, y):
        self.step_lrs.append(self.parts.optimizer.param_groups[0]["lr"])
        return super().train_step(x, y)


@pytest.mark.parametrize("interval", ["step", "epoch"])
def test_swalr_anneals_from_the_schedules_lr_and_leaves_the_epochs_before_alone(interval):
    """From swa.start_epoch SWALR alone sets the lr (constant within an epoch, cosine-annealed
    from the schedule's lr at that epoch to swa.lr over anneal_epochs, then swa.lr); the epochs
    before are the run without SWA, bit for bit."""
    epochs, start, swa_lr, anneal = 6, 3, 0.005, 3  # alpha 0, 1/4, 3/4, 1: not linear
    schedule = {"name": "cosine", "interval": interval, "min_lr": 0.0, "warmup_epochs": 0}
    data = make_data()
    plain = fitted(tiny_spec(epochs=epochs, scheduler=schedule), data, cls=StepLrs)
    spec = tiny_spec(epochs=epochs, scheduler=schedule,
                     swa={"enabled": True, "start_epoch": start, "lr": swa_lr, "anneal_epochs": anneal})
    run = fitted(spec, data, cls=StepLrs)
    spe, lr = run.steps_per_epoch, spec.optimizer.lr

    def schedule_lr(epoch, i):  # 0-based epoch and step within it
        if interval == "step":
            return cosine(epoch * spe + i, epochs * spe, lr, 0.0)
        return cosine(epoch, epochs, lr, 0.0)

    taken_over = schedule_lr(start - 1, 0)
    expected = [schedule_lr(e, i) if e + 1 < start else swalr(e + 1 - start, taken_over, swa_lr, anneal)
                for e in range(epochs) for i in range(spe)]
    assert run.step_lrs == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert [row.lr for row in run.position.history] == pytest.approx(expected[::spe], rel=1e-9, abs=1e-12)
    assert run.position.history[-1].lr == pytest.approx(swa_lr)

    before = (start - 1) * spe
    assert run.step_lrs[:before] == plain.step_lrs[:before]
    assert result_cells(run.position.history[:start - 1]) == result_cells(plain.position.history[:start - 1])
    assert plain.step_lrs[before:] != pytest.approx(expected[before:]), "the schedule alone would differ"


# ------------------------------------------------------------------------------- resume
RESUME_SPEC = dict(epochs=4, ema={"enabled": True, "decay": 0.9},
                   snapshots={"keep": "last_epochs", "last_epochs": 3}, swa=SWA_LR)


@pytest.fixture(scope="module")
def uninterrupted():
    """Snapshots (EMA weights), SWA with SWALR from epoch 2 over a per-step cosine: the run
    without interruption."""
    spec, data = tiny_spec(**RESUME_SPEC), make_data()
    run = fitted(spec, data, 2)
    return spec, data, run, run.member_records()


class StopAfterFirstEpoch(StopAfterEpoch):
    stop_epoch = 1


@pytest.mark.parametrize("where", ["boundary-before-swa", "mid-first-swa-epoch", "mid-later-epoch"])
def test_resume_with_snapshots_and_swa_is_bit_exact(uninterrupted, tmp_path, where):
    """Interrupted before SWALR exists, inside its first epoch, or later (the average, SWALR and
    a snapshot already in the checkpoint): the resumed run ends with the same weights, members
    (every tensor) and history as the uninterrupted one."""
    spec, data, reference, reference_members = uninterrupted
    assert list(reference_members) == ["epoch2", "epoch3", "swa"]
    assert reference_members["epoch2"].ema is True and reference_members["swa"].ema is False  # raw average
    ckpt, steps = tmp_path / "run.ckpt", reference.steps_per_epoch
    if where == "boundary-before-swa":
        with pytest.raises(KeyboardInterrupt):
            trainer(spec, data, 2, cls=StopAfterFirstEpoch).fit(ckpt)
        position = (1, 0)
    else:
        position = (1, 3) if where == "mid-first-swa-epoch" else (2, 5)
        stopped = trainer(spec, data, 2, cls=Scripted, signal_at=position[0] * steps + position[1],
                          signum=signal.SIGTERM)
        with pytest.raises(Preempted):
            stopped.fit(ckpt)
    saved = Checkpoint.load(ckpt)
    assert (saved.epoch, saved.batch) == position
    assert saved.kept is not None
    assert (saved.kept["swa_scheduler"] is None) == (where == "boundary-before-swa")
    assert sorted(saved.kept["snapshots"]) == (["2"] if where == "mid-later-epoch" else [])

    log = Log()
    resumed = trainer(spec, data, 2, log=log)
    history = resumed.fit(ckpt)
    assert f"resumed from {ckpt}: epoch {position[0] + 1}, batch {position[1]}" in log.text()
    assert_states_equal(resumed.model.state_dict(), reference.model.state_dict())
    assert_states_equal(resumed.ema.module.state_dict(), reference.ema.module.state_dict())
    assert_members_equal(resumed.member_records(), reference_members)
    assert result_cells(history) == result_cells(reference.position.history)


KEPT_DAMAGE = {
    "empty": lambda kept: {},
    "no-average": lambda kept: {k: v for k, v in kept.items() if k != "average"},
    "epoch-not-a-number": lambda kept: {**kept, "snapshots": {"x": kept["snapshots"]["2"]}},
    "average-not-a-state": lambda kept: {**kept, "average": 3},
}


@pytest.mark.parametrize("kind", list(KEPT_DAMAGE))
def test_a_checkpoint_with_damaged_kept_weights_is_a_one_line_error(uninterrupted, tmp_path, kind):
    """Kept weights that do not fit the run (a part missing, a part of the wrong kind) would
    otherwise resume into another average or snapshot set than the run's, without a word, or
    stop with a traceback: like any damaged checkpoint they are named in one line."""
    spec, data, reference, _ = uninterrupted
    good = reference.checkpoint()
    assert set(good.kept) == {"snapshots", "average", "swa_scheduler"}
    ckpt = tmp_path / "run.ckpt"
    dataclasses.replace(good, kept=KEPT_DAMAGE[kind](good.kept)).save(ckpt)
    with pytest.raises(DamagedFile) as err:
        trainer(spec, data, 2).try_resume(ckpt)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{ckpt}: "), message
    assert message.endswith("delete it to train this model afresh"), message


def test_a_checkpoint_2_file_resumes_a_run_without_kept_weights(tmp_path):
    """Checkpoints written before snapshots and SWA existed (format checkpoint-2, no `kept`)
    resume runs that keep nothing, and end as the uninterrupted run."""
    spec, data = tiny_spec(epochs=3), make_data()
    reference = fitted(spec, data, 0)
    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(KeyboardInterrupt):
        trainer(spec, data, 0, cls=StopAfterEpoch).fit(ckpt)
    body = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert body["format"] == CHECKPOINT_FORMAT and body["kept"] is None
    del body["kept"]
    torch.save({**body, "format": CHECKPOINT_FORMAT_2}, ckpt)
    assert CHECKPOINT_FORMAT_2 == "cifar-ensembles/checkpoint-2"

    log = Log()
    resumed = trainer(spec, data, 0, log=log)
    history = resumed.fit(ckpt)
    assert f"resumed from {ckpt}: epoch 3, batch 0" in log.text()
    assert_states_equal(resumed.model.state_dict(), reference.model.state_dict())
    assert result_cells(history) == result_cells(reference.position.history)
    assert resumed.member_records() == {}


# -------------------------------------------------------------------------- train stage
class Counting(Trainer):
    """Counts the images of every forward pass that builds a graph (training passes: not
    validation, not the BatchNorm refresh)."""

    made: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.passes = 0
        self.model.register_forward_hook(self._count)
        Counting.made.append(self)

    def _count(self, _module, args, _output):
        if torch.is_grad_enabled():
            self.passes += args[0].shape[0]


STAGE_CASES = {
    "nothing-kept": (dict(epochs=2), []),
    "snapshots-and-swa": (dict(epochs=4, snapshots={"keep": "last_epochs", "last_epochs": 3},
                               swa={"enabled": True, "start_epoch": 3, "lr": None}),
                          ["epoch2", "epoch3", "swa"]),
    "cycle-ends": (dict(epochs=4, scheduler={"name": "cosine_restarts", "cycles": 2},
                        snapshots={"keep": "cycle_ends"}), ["epoch2"]),
    "sam-swa": (dict(epochs=2, optimizer={"name": "sam"}, swa=SWA_LR), ["swa"]),
}


@pytest.mark.parametrize("case", list(STAGE_CASES))
def test_train_to_files_writes_members_only_when_something_is_kept(case, tmp_path, monkeypatch):
    """members.pt holds exactly the kept members (as run.yaml lists them) and exists only when
    the spec keeps something; run.yaml's train_passes counts the training passes made: epochs x
    full batches x batch size, twice for SAM/ASAM."""
    overrides, names = STAGE_CASES[case]
    spec, n_train = tiny_spec(**overrides), 100  # 6 full batches of 16, 4 images dropped
    monkeypatch.setattr(train_stage, "Trainer", Counting)
    monkeypatch.setattr(Counting, "made", [])
    out = train_to_files(spec, tiny_runtime(), make_data(n_train=n_train), 0, tmp_path / "out",
                         tmp_path / "run.ckpt", 1, log=lambda _: None)
    (run,) = Counting.made
    info = yaml.safe_load((out / "run.yaml").read_text())
    assert info["members"] == names
    passes = 2 if spec.optimizer.name in ("sam", "asam") else 1
    expected = spec.epochs * (n_train // spec.batch_size) * spec.batch_size * passes
    assert info["train_passes"] == run.passes == expected

    members = out / "members.pt"
    assert members.exists() == bool(names)
    if not names:
        return
    raw = torch.load(members, map_location="cpu", weights_only=True)
    assert raw["format"] == MEMBERS_FORMAT and list(raw["members"]) == names
    final = ModelRecord.load(out / "model.pt")
    for name in names:
        record = load_member(members, name)
        assert record.model == final.model and record.mean == final.mean and record.std == final.std
        if name != "swa":
            assert_states_equal(record.state_dict, {k: v.contiguous() for k, v in run.kept.snapshots[
                int(name.removeprefix("epoch"))].items()})
    with pytest.raises(DamagedFile) as err:
        load_member(members, "epoch9")
    assert_damaged(str(err.value), members, "has no member 'epoch9'")


# --------------------------------------------------------------------------- config checks
def check(tmp_path, override: dict):
    """validate_config of config.yaml with `override` merged in (as a --configfile)."""
    path = tmp_path / "override.yaml"
    path.write_text(yaml.safe_dump(override))
    return validate_config(load_config(path))


def one_line_error(tmp_path, override: dict) -> str:
    with pytest.raises(UserError) as err:
        check(tmp_path, override)
    message = str(err.value)
    assert "\n" not in message, message
    return message


RESTARTS = {"name": "cosine_restarts"}
MEMBER_ERRORS = {
    # single_asam: 200 epochs, cosine; ensemble_adam: 100 epochs, step (config.yaml)
    "cycles-own": ({"experiments": {"single_asam": {"scheduler": {**RESTARTS, "cycles": 7}}}},
                   "experiments.single_asam.scheduler.cycles", ["experiments.single_asam.epochs", "200"]),
    "cycles-default": ({"training": {"scheduler": {"cycles": 3}},
                        "experiments": {"single_asam": {"scheduler": RESTARTS}}},
                       "training.scheduler.cycles", ["experiments.single_asam.epochs"]),
    "cycle-ends-cosine": ({"experiments": {"single_asam": {"snapshots": {"keep": "cycle_ends"}}}},
                          "experiments.single_asam.snapshots.keep",
                          ["experiments.single_asam.scheduler.name"]),
    "cycle-ends-default": ({"training": {"snapshots": {"keep": "cycle_ends"}}},
                           "training.snapshots.keep", ["experiments.single_asam.scheduler.name"]),
    "cycle-ends-one-cycle": ({"experiments": {"single_asam": {"snapshots": {"keep": "cycle_ends"},
                                                              "scheduler": {**RESTARTS, "cycles": 1}}}},
                             "experiments.single_asam.snapshots.keep", ["cosine_restarts", "1 cycle"]),
    "last-epochs-default": ({"training": {"snapshots": {"keep": "last_epochs", "last_epochs": 150}}},
                            "training.snapshots.last_epochs", ["150", "ensemble_adam", "100"]),
    "last-epochs-own": ({"experiments": {"ensemble_adam": {"snapshots": {"keep": "last_epochs",
                                                                         "last_epochs": 101}}}},
                        "experiments.ensemble_adam.snapshots.last_epochs", ["101"]),
    "swa-start-own": ({"experiments": {"ensemble_adam": {"swa": {"enabled": True, "start_epoch": 101}}}},
                      "experiments.ensemble_adam.swa.start_epoch", ["101", "ensemble_adam"]),
    "swa-start-default": ({"experiments": {"ensemble_adam": {"epochs": 50, "swa": {"enabled": True}}}},
                          "training.swa.start_epoch", ["75", "ensemble_adam", "50"]),
}


@pytest.mark.parametrize("case", list(MEMBER_ERRORS))
def test_inconsistent_members_are_one_line_errors_naming_the_key(case, tmp_path):
    """Each error names the dotted key the experiment takes the bad value from: its own
    override, else the `training` default."""
    override, key, mentions = MEMBER_ERRORS[case]
    message = one_line_error(tmp_path, override)
    assert message.startswith(f"{key}: "), message
    for text in mentions:
        assert text in message, message


def test_values_a_spec_does_not_use_are_not_checked_against_its_epochs(tmp_path):
    """cycles without cosine_restarts, last_epochs with keep none and start_epoch with SWA off
    may exceed or not divide the epochs: they decide nothing."""
    spec = check(tmp_path, {"training": {"scheduler": {"cycles": 7}, "snapshots": {"last_epochs": 9}},
                            "experiments": {"ensemble_adam": {"epochs": 3}}})
    adam = spec.experiments["ensemble_adam"].training
    assert adam.epochs == 3 and adam.swa.start_epoch > 3 and not adam.swa.enabled
    assert adam.snapshot_epochs == ()


def test_members_at_the_edges_of_the_epochs_are_valid(tmp_path):
    """Every last epoch a snapshot (last_epochs = epochs), SWA over the last epoch alone
    (start_epoch = epochs), and cycles as long as the run allows."""
    spec = check(tmp_path, {"experiments": {
        "ensemble_adam": {"snapshots": {"keep": "last_epochs", "last_epochs": 100},
                          "swa": {"enabled": True, "start_epoch": 100}},
        "single_asam": {"scheduler": {**RESTARTS, "cycles": 200}, "snapshots": {"keep": "cycle_ends"}}}})
    assert spec.experiments["ensemble_adam"].training.snapshot_epochs == tuple(range(1, 100))
    assert spec.experiments["single_asam"].training.snapshot_epochs == tuple(range(1, 200))


@pytest.mark.parametrize("override, key", [
    ({"tta": {"translate": 0}}, "tta.translate"),
    ({"tta": {"views": "rotate"}}, "tta.views"),
    ({"tta": {"experiments": ["single_asm"]}}, "tta.experiments"),
    ({"tta": {"experiments": ["single_asam", "single_asam"]}}, "tta.experiments"),
    ({"training": {"snapshots": {"keep": "all"}}}, "training.snapshots.keep"),
    ({"experiments": {"single_asam": {"snapshots": {"keep": "all"}}}},
     "experiments.single_asam.snapshots.keep"),
    ({"training": {"swa": {"lr": -1}}}, "training.swa.lr"),
    ({"experiments": {"ensemble_adam": {"swa": {"lr": 0}}}}, "experiments.ensemble_adam.swa.lr"),
    ({"training": {"snapshots": {"last_epochs": 1}}}, "training.snapshots.last_epochs"),
    ({"training": {"swa": {"start_epoch": 0}}}, "training.swa.start_epoch"),
    ({"training": {"swa": {"anneal_epochs": 0}}}, "training.swa.anneal_epochs"),
    ({"training": {"scheduler": {"cycles": 0}}}, "training.scheduler.cycles"),
    ({"training": {"scheduler": {"name": "restarts"}}}, "training.scheduler.name"),
])
def test_bad_values_are_one_line_errors_naming_the_field(override, key, tmp_path):
    message = one_line_error(tmp_path, override)
    assert re.match(re.escape(key) + r": ", message), message

