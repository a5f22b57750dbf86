"""The speed settings of `training:` on a CPU: the batched input path inside the trainer
(determinism, bit-exact mid-epoch resume), channels_last, bf16 autocast, torch.compile's
wiring and its one-line failures, the data-wait measurement, run.yaml's `effective`
section, channels_last inference, and the config/schema entries of every new key."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_train import (
    TIMING,
    assert_states_equal,
    load_state,
    make_data,
    make_spec,
    quiet,
    read_history,
    states_differ,
    without_timing,
)

from cifar_ensembles import train
from cifar_ensembles.errors import UserError
from cifar_ensembles.inference import predict_logits, uses_channels_last
from cifar_ensembles.models import build_model
from cifar_ensembles.train import Trainer, fingerprint, resolve_compile, train_to_files

ROOT = Path(__file__).resolve().parents[1]
GPU_AUG = {"name": "albumentations", "device": "gpu"}


# ------------------------------------------------------------ batched input path in the trainer
def test_gpu_augment_path_trains_deterministically_without_workers(tmp_path):
    spec = make_spec(augment=GPU_AUG, loader={"num_workers": 2})
    data = make_data()
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        train_to_files(spec, data, seed, tmp_path / name, None, log=quiet)
    a, b, c = (load_state(tmp_path / n / "model.pt") for n in "abc")
    assert_states_equal(a, b)
    assert states_differ(a, c)
    assert without_timing(read_history(tmp_path / "a" / "history.csv")) == \
        without_timing(read_history(tmp_path / "b" / "history.csv"))
    info = yaml.safe_load((tmp_path / "a" / "run.yaml").read_text())
    assert info["effective"]["augment_device"] == "gpu"
    assert info["effective"]["num_workers"] == 0  # no DataLoader on this path


def test_gpu_augment_path_differs_from_the_cpu_pipeline_but_sees_the_same_batches():
    data = make_data()
    cpu = Trainer(make_spec(augment={"name": "albumentations"}), data, 0, log=quiet)
    gpu = Trainer(make_spec(augment=GPU_AUG), data, 0, log=quiet)
    assert isinstance(cpu.loader, torch.utils.data.DataLoader)
    (xc, yc), (xg, yg) = next(iter(cpu.loader)), next(iter(gpu.loader))
    assert torch.equal(yc, yg)  # same permutation
    assert xc.shape == xg.shape and xc.dtype == xg.dtype
    assert not torch.equal(xc, xg)  # other random numbers
    assert fingerprint(cpu.spec, 0, data) != fingerprint(gpu.spec, 0, data)


class SignalAtStep(Trainer):
    at_step, steps = 0, 0

    def train_step(self, x, y):
        out = super().train_step(x, y)
        SignalAtStep.steps += 1
        if SignalAtStep.steps == self.at_step:
            signal.raise_signal(signal.SIGTERM)
        return out


def test_gpu_augment_path_resumes_mid_epoch_bit_exact(tmp_path):
    spec = make_spec(epochs=3, optimizer={"name": "asam"}, augment=GPU_AUG,
                     ema={"enabled": True, "decay": 0.9})
    data = make_data()
    steps = len(data["y_train"]) // spec["batch_size"]
    reference = Trainer(spec, data, 2, log=quiet)
    reference_history = reference.fit()

    ckpt = tmp_path / "run.ckpt"
    SignalAtStep.steps, SignalAtStep.at_step = 0, steps + 3
    with pytest.raises(train.Preempted):
        SignalAtStep(spec, data, 2, log=quiet).fit(ckpt)
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert (saved["epoch"], saved["batch"]) == (1, 3)

    resumed = Trainer(spec, data, 2, log=quiet)
    history = resumed.fit(ckpt)
    assert_states_equal(resumed.model.state_dict(), reference.model.state_dict())
    assert_states_equal(resumed.ema.module.state_dict(), reference.ema.module.state_dict())
    skip = (*TIMING, "train_loss")
    assert [{k: v for k, v in r.items() if k not in skip} for r in history] == \
        [{k: v for k, v in r.items() if k not in skip} for r in reference_history]


def test_unknown_augment_device_is_a_user_error():
    with pytest.raises(UserError, match="augment.device"):
        Trainer(make_spec(augment={"device": "tpu"}), make_data(), 0, log=quiet)


# ------------------------------------------------------------------------- channels_last
@pytest.mark.parametrize("augment", [{"name": "torchvision"}, GPU_AUG])
def test_channels_last_model_and_inputs(augment):
    data = make_data()
    spec = make_spec(channels_last=True, augment=augment)
    trainer = Trainer(spec, data, 0, log=quiet)
    assert uses_channels_last(trainer.model)
    assert uses_channels_last(trainer.ema.module if trainer.ema else trainer.model)
    seen = []
    real_step = trainer.train_step

    def step(x, y):
        seen.append(x.is_contiguous(memory_format=torch.channels_last))
        return real_step(x, y)

    trainer.train_step = step
    trainer.fit()
    assert seen and all(seen)
    # model.pt holds plain contiguous tensors
    assert all(v.is_contiguous() for v in trainer.model_record()["state_dict"].values())


def test_channels_last_gives_the_same_step_up_to_rounding():
    data = make_data()
    a = Trainer(make_spec(augment={"name": "none"}), data, 0, log=quiet)
    b = Trainer(make_spec(augment={"name": "none"}, channels_last=True), data, 0, log=quiet)
    assert_states_equal(a.model.state_dict(), b.model.state_dict())  # same initial weights
    x, y = next(iter(a.loader))
    la, _ = a.train_step(x, y)
    lb, _ = b.train_step(x.contiguous(memory_format=torch.channels_last), y)
    assert float(la) == pytest.approx(float(lb), rel=1e-4)
    for k, v in a.model.state_dict().items():
        torch.testing.assert_close(b.model.state_dict()[k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_inference_follows_the_models_memory_format():
    data = make_data()
    torch.manual_seed(0)
    model = build_model({"name": "resnet18_cifar", "width": 4}, 10, 3).eval()
    plain = predict_logits(model, data["x_val"], data["mean"], data["std"], torch.device("cpu"), 8)
    assert not uses_channels_last(model)
    model.to(memory_format=torch.channels_last)
    assert uses_channels_last(model)
    cl = predict_logits(model, data["x_val"], data["mean"], data["std"], torch.device("cpu"), 8)
    assert cl.dtype == torch.float32 and cl.shape == (len(data["x_val"]), 10)
    torch.testing.assert_close(cl, plain, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------- bf16
@pytest.mark.parametrize("optimizer", ["sgd", "asam"])
def test_bf16_autocast_trains_on_cpu(optimizer, tmp_path):
    spec = make_spec(precision="bf16", channels_last=True, optimizer={"name": optimizer},
                     ema={"enabled": True, "decay": 0.9})
    out = train_to_files(spec, make_data(), 0, tmp_path / "out", None, log=quiet)
    rows = read_history(out / "history.csv")
    assert all(np.isfinite(float(r[k])) for r in rows for k in ("train_loss", "val_loss", "ema_val_loss"))
    record = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    assert all(v.dtype != torch.bfloat16 for v in record["state_dict"].values())  # weights stay fp32
    effective = yaml.safe_load((out / "run.yaml").read_text())["effective"]
    assert effective["precision"] == "bf16" and effective["channels_last"] is True


# ------------------------------------------------------------------------------ compile
class FakeCompiled(torch.nn.Module):
    def __init__(self, module, fail=False):
        super().__init__()
        self.module, self.fail, self.calls = module, fail, 0

    def forward(self, x):
        self.calls += 1
        if self.fail:
            raise RuntimeError("inductor exploded\nsecond line of a long traceback")
        return self.module(x)


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
def test_compile_is_wired_and_reduce_overhead_needs_cuda(fake_compile, value, mode, tmp_path):
    _, calls = fake_compile
    spec = make_spec(compile=value, epochs=1)
    trainer = Trainer(spec, make_data(), 0, log=quiet)
    assert trainer.compile_mode == mode
    if mode is None:
        assert calls == [] and trainer.step_model is trainer.model
        return
    assert calls[0] == mode  # on a CPU reduce-overhead (CUDA graphs) falls back to the default mode
    wrapper = calls[1]
    trainer.fit()
    assert wrapper.calls == trainer.steps_per_epoch  # every training step runs the compiled module
    # the saved weights keep plain keys (not the compiled wrapper's _orig_mod. prefix)
    assert "fc.weight" in trainer.model_record()["state_dict"]
    assert trainer.effective()["compile"] == mode


def test_reduce_overhead_resolves_to_cuda_graphs_on_cuda():
    assert resolve_compile("reduce-overhead", torch.device("cuda")) == "reduce-overhead"
    assert resolve_compile(True, torch.device("cuda")) == "default"
    assert resolve_compile(False, torch.device("cuda")) is None
    with pytest.raises(UserError, match="compile"):
        resolve_compile("max-speed", torch.device("cuda"))


def test_compile_failure_is_one_clear_user_error(fake_compile):
    compile, _ = fake_compile
    compile.fail = True
    trainer = Trainer(make_spec(compile=True), make_data(), 0, log=quiet)
    message = r"compile: torch.compile .* failed on the first training step"
    with pytest.raises(UserError, match=message) as info:
        trainer.fit()
    assert "\n" not in str(info.value) and "compile: false" in str(info.value)


def test_compile_on_cpu_without_a_compiler_is_a_user_error(monkeypatch):
    monkeypatch.setattr(train.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(UserError, match="C\\+\\+ compiler"):
        Trainer(make_spec(compile=True), make_data(), 0, log=quiet)


def test_real_compile_trains_on_cpu(tmp_path):
    """A real torch.compile (inductor, about 90 s cold on 2 cores) matches eager training."""
    spec = make_spec(compile=True, epochs=1, augment={"name": "none"}, model={"width": 2})
    compiled = train_to_files(spec, make_data(n_train=32), 0, tmp_path / "c", None, log=quiet)
    eager = train_to_files(make_spec(epochs=1, augment={"name": "none"}, model={"width": 2}),
                           make_data(n_train=32), 0, tmp_path / "e", None, log=quiet)
    a, b = load_state(compiled / "model.pt"), load_state(eager / "model.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)


# -------------------------------------------------------------- settings, timing, run.yaml
def test_speed_settings_do_not_change_the_fingerprint():
    data, spec = make_data(), make_spec()
    base = fingerprint(spec, 0, data)
    for change in ({"channels_last": True}, {"compile": "reduce-overhead"}, {"cudnn_benchmark": False},
                   {"jobs_per_gpu": 4}, {"augment": {**spec["augment"], "device": "cpu"}}):
        assert fingerprint({**spec, **change}, 0, data) == base, change
    for change in ({"precision": "bf16"}, {"augment": {**spec["augment"], "device": "gpu"}}):
        assert fingerprint({**spec, **change}, 0, data) != base, change


def test_run_yaml_effective_section_and_data_wait(tmp_path):
    log = []
    spec = make_spec(cudnn_benchmark=False)
    out = train_to_files(spec, make_data(), 0, tmp_path / "out", None, threads=1, log=log.append)
    info = yaml.safe_load((out / "run.yaml").read_text())
    assert info["effective"] == {"device": "cpu", "precision": "fp32", "channels_last": False,
                                 "compile": False, "cudnn_benchmark": None, "augment_device": "cpu",
                                 "num_workers": 0, "pin_memory": False, "persistent_workers": False,
                                 "torch_threads": 1}
    timing = info["timing"]
    assert 0 < timing["data_wait_seconds"] < timing["train_seconds"]
    assert 0 < timing["data_wait_fraction"] < 1
    assert sum("data wait" in line for line in log) == spec["epochs"]


def test_trainer_records_data_wait_per_epoch():
    trainer = Trainer(make_spec(augment={"name": "albumentations"}), make_data(), 0, log=quiet)
    trainer.fit()
    assert [t["epoch"] for t in trainer.timing] == [1, 2]
    for t in trainer.timing:
        assert 0 < t["data_wait_seconds"] < t["seconds"]


# ------------------------------------------------------------------------- config, schema
NEW_KEYS = ("channels_last", "compile", "cudnn_benchmark", "jobs_per_gpu")


def test_config_documents_and_the_schema_accepts_the_new_keys():
    from jsonschema import Draft202012Validator

    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    schema = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    training = config["training"]
    for key in NEW_KEYS:
        assert key in training, key
    assert training["augment"]["device"] == "cpu"
    text = (ROOT / "config.yaml").read_text()
    for key in NEW_KEYS:
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(f"{key}:"))
        assert "#" in line, f"{key} needs a comment"
    props = schema["$defs"]["training"]["properties"]
    for key in NEW_KEYS:
        assert key in props
    assert "device" in props["augment"]["properties"]

    validator = Draft202012Validator(schema)
    assert not list(validator.iter_errors(config))
    for key, bad in (("compile", "fast"), ("channels_last", "yes"), ("cudnn_benchmark", 1),
                     ("jobs_per_gpu", 3)):
        broken = {**config, "training": {**training, key: bad}}
        assert list(validator.iter_errors(broken)), (key, bad)
    broken = {**config, "training": {**training, "augment": {**training["augment"], "device": "tpu"}}}
    assert list(validator.iter_errors(broken))
    for value in (False, True, "reduce-overhead"):
        ok = {**config, "training": {**training, "compile": value}}
        assert not list(validator.iter_errors(ok)), value
