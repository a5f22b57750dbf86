"""The speed settings (`runtime:`) and the batched input path on a CPU: the batched path inside
the trainer (determinism, bit-exact mid-epoch resume), channels_last, bf16 autocast,
torch.compile's wiring and its one-line failures, the data-wait measurement, run.yaml's
`effective` section, channels_last inference, resuming under other speed settings, and the
config/schema entries of the runtime keys."""

from __future__ import annotations

import dataclasses
import signal

import numpy as np
import pytest
import torch
import yaml
from conftest import (
    ROOT,
    SCHEMA,
    Log,
    assert_states_equal,
    load_state,
    make_data,
    quiet,
    result_cells,
    runtime_spec,
    states_differ,
    tiny_runtime,
    tiny_spec,
)

from cifar_ensembles.compute.device import uses_channels_last
from cifar_ensembles.compute.inference import predict_logits
from cifar_ensembles.config.spec import RuntimeSpec
from cifar_ensembles.errors import UserError
from cifar_ensembles.files.training_run import Checkpoint, ModelRecord, read_history
from cifar_ensembles.models import build_model
from cifar_ensembles.stages.train import train_to_files
from cifar_ensembles.training import Preempted, Trainer
from cifar_ensembles.training import components as training_components
from cifar_ensembles.training.checkpoint import fingerprint
from cifar_ensembles.training.components import resolve_compile

BATCHED = {"name": "albumentations", "mode": "batched"}


def train(spec, data, seed, out_dir, runtime=None, log=quiet):
    return train_to_files(spec, runtime or tiny_runtime(), data, seed, out_dir, None, 1, log=log)


def trainer(spec, data, seed, runtime=None, cls=Trainer, log=quiet) -> Trainer:
    return cls(spec, runtime or tiny_runtime(), data, seed, 1, log=log)


def first_batch(run: Trainer):
    return next(iter(run.inputs.epoch(0, 0)))


# ------------------------------------------------------------ batched input path in the trainer
def test_batched_path_trains_deterministically_without_workers(tmp_path):
    spec, runtime = tiny_spec(augment=BATCHED), tiny_runtime(loader={"num_workers": 2})
    data = make_data()
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        train(spec, data, seed, tmp_path / name, runtime=runtime)
    a, b, c = (load_state(tmp_path / n / "model.pt") for n in "abc")
    assert_states_equal(a, b)
    assert states_differ(a, c)
    assert result_cells(read_history(tmp_path / "a" / "history.csv")) == \
        result_cells(read_history(tmp_path / "b" / "history.csv"))
    info = yaml.safe_load((tmp_path / "a" / "run.yaml").read_text())
    assert info["effective"]["augment_mode"] == "batched"
    assert info["effective"]["num_workers"] == 0  # no DataLoader on this path


def test_batched_path_differs_from_the_per_image_pipeline_but_sees_the_same_batches():
    data = make_data()
    per_image = trainer(tiny_spec(augment={"name": "albumentations"}), data, 0)
    batched = trainer(tiny_spec(augment=BATCHED), data, 0)
    assert isinstance(per_image.inputs.loader, torch.utils.data.DataLoader)
    assert not isinstance(batched.inputs.loader, torch.utils.data.DataLoader)
    (xc, yc), (xg, yg) = first_batch(per_image), first_batch(batched)
    assert torch.equal(yc, yg)  # same permutation
    assert xc.shape == xg.shape and xc.dtype == xg.dtype
    assert not torch.equal(xc, xg)  # other random numbers
    assert fingerprint(per_image.spec, 0, data) != fingerprint(batched.spec, 0, data)


class SignalAtStep(Trainer):
    at_step, steps = 0, 0

    def train_step(self, x, y):
        out = super().train_step(x, y)
        SignalAtStep.steps += 1
        if SignalAtStep.steps == self.at_step:
            signal.raise_signal(signal.SIGTERM)
        return out


def test_batched_path_resumes_mid_epoch_bit_exact(tmp_path):
    spec = tiny_spec(epochs=3, optimizer={"name": "asam"}, augment=BATCHED,
                     ema={"enabled": True, "decay": 0.9})
    data = make_data()
    steps = len(data["y_train"]) // spec.batch_size
    reference = trainer(spec, data, 2)
    reference_history = reference.fit()

    ckpt = tmp_path / "run.ckpt"
    SignalAtStep.steps, SignalAtStep.at_step = 0, steps + 3
    with pytest.raises(Preempted):
        trainer(spec, data, 2, cls=SignalAtStep).fit(ckpt)
    saved = Checkpoint.load(ckpt)
    assert (saved.epoch, saved.batch) == (1, 3)

    resumed = trainer(spec, data, 2)
    history = resumed.fit(ckpt)
    assert_states_equal(resumed.model.state_dict(), reference.model.state_dict())
    assert_states_equal(resumed.ema.module.state_dict(), reference.ema.module.state_dict())
    assert result_cells(history) == result_cells(reference_history)


def test_unknown_augment_mode_and_the_old_device_key_are_user_errors():
    with pytest.raises(UserError, match=r"training\.augment\.mode: 'tpu' is not one of"):
        tiny_spec(augment={"mode": "tpu"})
    with pytest.raises(UserError, match=r"training\.augment\.device: unknown key"):
        tiny_spec(augment={"device": "gpu"})


# ------------------------------------------------------------------------- channels_last
@pytest.mark.parametrize("augment", [{"name": "torchvision"}, BATCHED], ids=["per_image", "batched"])
def test_channels_last_model_and_inputs(augment):
    data = make_data()
    run = trainer(tiny_spec(augment=augment), data, 0, runtime=tiny_runtime(channels_last=True))
    assert uses_channels_last(run.model)
    assert uses_channels_last(run.ema.module if run.ema else run.model)
    seen = []
    real_step = run.train_step

    def step(x, y):
        seen.append(x.is_contiguous(memory_format=torch.channels_last))
        return real_step(x, y)

    run.train_step = step
    run.fit()
    assert seen and all(seen)
    # model.pt holds plain contiguous tensors
    assert all(v.is_contiguous() for v in run.model_record().state_dict.values())


def test_channels_last_gives_the_same_step_up_to_rounding():
    data, spec = make_data(), tiny_spec(augment={"name": "none"})
    a = trainer(spec, data, 0, runtime=tiny_runtime(channels_last=False))
    b = trainer(spec, data, 0, runtime=tiny_runtime(channels_last=True))
    assert not uses_channels_last(a.model)
    assert_states_equal(a.model.state_dict(), b.model.state_dict())  # same initial weights
    x, y = first_batch(a)
    la, _ = a.train_step(x, y)
    lb, _ = b.train_step(x.contiguous(memory_format=torch.channels_last), y)
    assert float(la) == pytest.approx(float(lb), rel=1e-4)
    for k, v in a.model.state_dict().items():
        torch.testing.assert_close(b.model.state_dict()[k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_inference_follows_the_models_memory_format():
    data = make_data()
    torch.manual_seed(0)
    model = build_model(tiny_spec().model, 10, 3).eval()
    cpu = torch.device("cpu")
    plain = predict_logits(model, data["x_val"], data["mean"], data["std"], cpu, 8, "fp32")
    assert not uses_channels_last(model)
    model.to(memory_format=torch.channels_last)
    assert uses_channels_last(model)
    cl = predict_logits(model, data["x_val"], data["mean"], data["std"], cpu, 8, "fp32")
    assert cl.dtype == torch.float32 and cl.shape == (len(data["x_val"]), 10)
    torch.testing.assert_close(cl, plain, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------- bf16
@pytest.mark.parametrize("optimizer", ["sgd", "asam"])
def test_bf16_autocast_trains_on_cpu(optimizer, tmp_path):
    spec = tiny_spec(precision="bf16", optimizer={"name": optimizer}, ema={"enabled": True, "decay": 0.9})
    out = train(spec, make_data(), 0, tmp_path / "out", runtime=tiny_runtime(channels_last=True))
    rows = read_history(out / "history.csv")
    assert all(np.isfinite(getattr(r, k)) for r in rows for k in ("train_loss", "val_loss", "ema_val_loss"))
    record = ModelRecord.load(out / "model.pt")
    assert all(v.dtype != torch.bfloat16 for v in record.state_dict.values())  # weights stay fp32
    effective = yaml.safe_load((out / "run.yaml").read_text())["effective"]
    assert effective["precision"] == "bf16" and effective["channels_last"] is True


# ------------------------------------------------------------------------------ compile
class FakeCompiled(torch.nn.Module):
    def __init__(self, module, fail=False):
        super().__init__()
        self.module, self.fail, self.calls = module, fail, 0

    def forward(self, *inputs):
        self.calls += 1
        if self.fail:
            raise RuntimeError("inductor exploded\nsecond line of a long traceback")
        return self.module(*inputs)


@pytest.fixture
def fake_compile(monkeypatch):
    calls = []

    def compile(module, mode=None, **kwargs):
        calls.append(mode)
        wrapper = FakeCompiled(module, fail=getattr(compile, "fail", False))
        calls.append(wrapper)
        return wrapper

    monkeypatch.setattr(torch, "compile", compile)
    return compile, calls


@pytest.mark.parametrize("value,mode", [(True, "default"), ("reduce-overhead", "default"), (False, None)])
def test_compile_is_wired_and_reduce_overhead_needs_cuda(fake_compile, value, mode):
    _, calls = fake_compile
    run = trainer(tiny_spec(epochs=1), make_data(), 0, runtime=tiny_runtime(compile=value))
    assert run.parts.compile_mode == mode
    if mode is None:
        assert calls == [] and run.parts.step_model.model is run.model
        assert run.effective()["compile"] is False
        return
    assert calls[0] == mode  # on a CPU reduce-overhead (CUDA graphs) falls back to the default mode
    wrapper = calls[1]
    assert run.parts.step_model is wrapper and wrapper.module.model is run.model  # the loss is inside
    run.fit()
    assert wrapper.calls == run.steps_per_epoch  # every training step runs the compiled module
    # the saved weights keep plain keys (not the compiled wrapper's _orig_mod. prefix)
    assert "fc.weight" in run.model_record().state_dict
    assert run.effective()["compile"] == mode


def test_reduce_overhead_resolves_to_cuda_graphs_on_cuda():
    assert resolve_compile("reduce-overhead", torch.device("cuda")) == "reduce-overhead"
    assert resolve_compile(True, torch.device("cuda")) == "default"
    assert resolve_compile(False, torch.device("cuda")) is None
    with pytest.raises(UserError, match="runtime.compile"):
        resolve_compile("max-speed", torch.device("cuda"))


def test_compile_failure_is_one_clear_user_error(fake_compile):
    compile, _ = fake_compile
    compile.fail = True
    run = trainer(tiny_spec(), make_data(), 0, runtime=tiny_runtime(compile=True))
    message = r"runtime\.compile: torch\.compile .* failed on the first training step"
    with pytest.raises(UserError, match=message) as info:
        run.fit()
    assert "\n" not in str(info.value) and "compile: false" in str(info.value)
    assert "inductor exploded" in str(info.value)


def test_compile_on_cpu_without_a_compiler_is_a_user_error(monkeypatch):
    monkeypatch.setattr(training_components.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(UserError, match="C\\+\\+ compiler"):
        trainer(tiny_spec(), make_data(), 0, runtime=tiny_runtime(compile=True))


# -------------------------------------------------------------- settings, timing, run.yaml
SPEED_CHANGES = {"channels_last": False, "compile": "reduce-overhead", "cudnn_benchmark": False,
                 "jobs_per_gpu": 4, "eval_batch_size": 7, "eval_every_epochs": 2,
                 "checkpoint_every_epochs": 3, "checkpoint_every_minutes": 30.0,
                 "loader": {"num_workers": 2, "pin_memory": False, "persistent_workers": False}}


def test_speed_settings_do_not_change_the_fingerprint_result_settings_do(fake_compile):
    data, spec = make_data(), tiny_spec()
    base = trainer(spec, data, 0, runtime=tiny_runtime()).fingerprint
    assert base == fingerprint(spec, 0, data) == fingerprint(tiny_spec(), 0, data)
    for key, value in SPEED_CHANGES.items():
        run = trainer(spec, data, 0, runtime=tiny_runtime(**{key: value}))
        assert run.fingerprint == base, key
    for change in ({"precision": "bf16"}, {"augment": {"mode": "batched"}}, {"optimizer": {"lr": 0.02}},
                   {"epochs": 3}):
        assert fingerprint(tiny_spec(**change), 0, data) != base, change
    assert fingerprint(spec, 1, data) != base
    assert fingerprint(spec, 0, make_data(seed=1)) != base


@pytest.mark.parametrize("layout", ["same-layout", "channels_last-flipped"])
def test_checkpoint_resumes_under_other_speed_settings(tmp_path, fake_compile, layout):
    """A run stopped under one runtime resumes under another with every speed setting changed.
    Kept bits: the weights and the training columns equal the uninterrupted run's bit for bit;
    another memory layout picks other kernels, whose rounding the training run amplifies, so
    there the resumed run only has to be the same run (resumed, complete, finite)."""
    spec, data = tiny_spec(epochs=3, augment={"name": "none"}), make_data()
    steps = len(data["y_train"]) // spec.batch_size
    reference = trainer(spec, data, 0)
    reference_history = reference.fit()

    ckpt = tmp_path / "run.ckpt"
    SignalAtStep.steps, SignalAtStep.at_step = 0, steps + 2
    with pytest.raises(Preempted):
        trainer(spec, data, 0, cls=SignalAtStep).fit(ckpt)

    channels_last = tiny_runtime().channels_last
    if layout != "same-layout":
        channels_last = not channels_last
    other = tiny_runtime(**{**SPEED_CHANGES, "channels_last": channels_last})
    log = Log()
    resumed = trainer(spec, data, 0, runtime=other, log=log)
    history = resumed.fit(ckpt)
    assert f"resumed from {ckpt}: epoch 2, batch 2" in log.text()
    assert "starting afresh" not in log.text()
    assert [r.epoch for r in history] == [1, 2, 3]
    assert result_cells(history[:1]) == result_cells(reference_history[:1])  # from the checkpoint
    assert all(np.isfinite(r.train_loss) and r.val_loss is not None for r in history[1:])
    if layout == "same-layout":
        assert_states_equal(resumed.model.state_dict(), reference.model.state_dict())
        train_columns = slice(0, 4)  # epoch, lr, train_loss, train_acc
        assert [r[train_columns] for r in result_cells(history)] == \
            [r[train_columns] for r in result_cells(reference_history)]


def test_run_yaml_effective_section_and_data_wait(tmp_path):
    log = []
    spec = tiny_spec()
    runtime = tiny_runtime(channels_last=False, cudnn_benchmark=False)
    out = train(spec, make_data(), 0, tmp_path / "out", runtime=runtime, log=log.append)
    info = yaml.safe_load((out / "run.yaml").read_text())
    assert info["effective"] == {"device": "cpu", "precision": "fp32", "channels_last": False,
                                 "compile": False, "cudnn_benchmark": None, "augment_mode": "per_image",
                                 "num_workers": 0, "pin_memory": False, "persistent_workers": False,
                                 "torch_threads": 1}
    timing = info["timing"]
    assert 0 < timing["data_wait_seconds"] < timing["train_seconds"]
    assert 0 < timing["data_wait_fraction"] < 1
    assert sum("data wait" in line for line in log) == spec.epochs


def test_trainer_records_data_wait_per_epoch():
    run = trainer(tiny_spec(augment={"name": "albumentations"}), make_data(), 0)
    run.fit()
    assert [t["epoch"] for t in run.timing] == [1, 2]
    for t in run.timing:
        assert 0 < t["data_wait_seconds"] < t["seconds"]


# ------------------------------------------------------------------------- config, schema
RUNTIME_KEYS = ("device", "compile", "channels_last", "cudnn_benchmark", "jobs_per_gpu", "eval_batch_size",
                "predict_batch_size", "eval_every_epochs", "checkpoint_every_epochs",
                "checkpoint_every_minutes", "loader")


def test_config_documents_and_the_schema_accepts_the_runtime_keys():
    from jsonschema import Draft202012Validator

    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    schema = yaml.safe_load(SCHEMA.read_text())
    runtime, training = config["runtime"], config["training"]
    assert set(runtime) == set(RUNTIME_KEYS) == {f.name for f in dataclasses.fields(RuntimeSpec)}
    for key in ("channels_last", "compile", "cudnn_benchmark", "jobs_per_gpu"):
        assert key not in training, f"{key} is a runtime setting"
    assert training["augment"]["mode"] == "batched" and "device" not in training["augment"]
    text = (ROOT / "config.yaml").read_text()
    for key in RUNTIME_KEYS:
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(f"{key}:"))
        assert "#" in line, f"{key} needs a comment"
    assert set(schema["$defs"]["RuntimeSpec"]["properties"]) == set(RUNTIME_KEYS)
    assert "mode" in schema["$defs"]["AugmentSpec"]["properties"]
    runtime_spec()  # config.yaml's runtime resolves

    validator = Draft202012Validator(schema)
    assert not list(validator.iter_errors(config))
    for key, bad in (("compile", "fast"), ("channels_last", "yes"), ("cudnn_benchmark", 1),
                     ("jobs_per_gpu", 3), ("eval_every_epochs", 0), ("checkpoint_every_epochs", 0),
                     ("checkpoint_every_minutes", 0)):
        broken = {**config, "runtime": {**runtime, key: bad}}
        assert list(validator.iter_errors(broken)), (key, bad)
    for augment in ({**training["augment"], "mode": "tpu"}, {**training["augment"], "device": "gpu"}):
        broken = {**config, "training": {**training, "augment": augment}}
        assert list(validator.iter_errors(broken)), augment
    for value in (False, True, "reduce-overhead"):
        ok = {**config, "runtime": {**runtime, "compile": value}}
        assert not list(validator.iter_errors(ok)), value
        assert runtime_spec(compile=value).compile == value
    ok = {**config, "runtime": {**runtime, "checkpoint_every_minutes": 2.5}}
    assert not list(validator.iter_errors(ok))
    # the typed spec refuses what its types rule out, in one line naming the key
    for key, bad in (("compile", "fast"), ("channels_last", "yes"), ("jobs_per_gpu", 3)):
        with pytest.raises(UserError, match=f"runtime.{key}"):
            runtime_spec(**{key: bad})
