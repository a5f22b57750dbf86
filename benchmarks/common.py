"""Helpers shared by the CPU and GPU benchmarks: specs built from config.yaml, data, the
trainer measured through its own loop, the bare reference loop, and pools of training
processes that train together.

Every spec is config.yaml's (`training:`, `runtime:`, or an experiment's merged sections)
with the benchmark's own changes merged over it; nothing here restates a default.

Run as `python -m benchmarks.common worker JSON` it is one process of a pool (internal).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import platform
import queue
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cifar_ensembles.compute.device import to_channels_last  # noqa: E402
from cifar_ensembles.config import spec
from cifar_ensembles.config.convert import from_data, to_data  # noqa: E402
from cifar_ensembles.config.spec import (
    RuntimeSpec,
    SplitSpec,
    TrainingSpec,
    deep_merge,
    experiment_sections,
)

ROOT = Path(__file__).resolve().parents[1]
FASHION_SOURCE = "/usr/share/datasets/fashion-mnist"
PREPARED_FASHION = ROOT / "resources" / "fashion_mnist" / "data.npz"
DEMO = ROOT / "presets" / "demo.yaml"
# The report's network at CIFAR's 32x32, from scratch (presets/from-scratch.yaml's reading);
# its width stays config.yaml's.
CIFAR_RESNET = {"name": "resnet18_cifar", "pretrained": False, "input_size": None}


def quiet(_msg):
    pass


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


ERROR_LINE = re.compile(r"^(\w+\.)*\w*(Error|Exception|Interrupt|Exit|Failure)\b")


def first_line(err) -> str:
    """An exception as one line: its class and the first line of its message."""
    text = (str(err).strip().splitlines() or [""])[0]
    return f"{err.__class__.__name__}: {text}"[:300]


def error_line(log_text: str) -> str:
    """The first line of the last error a process's stderr shows (the exception line under
    its traceback), else its last non-empty line."""
    lines = [line.strip() for line in log_text.splitlines() if line.strip()]
    errors = [line for line in lines if ERROR_LINE.match(line)]
    return (errors or lines or ["(no output on stderr)"])[-1][:300]


# ----------------------------------------------------------------------------- specs
@functools.cache
def _config(presets: tuple[str, ...]) -> dict:
    return spec.load_config(ROOT / "config.yaml", *presets)


def config(*presets: str | os.PathLike) -> dict:
    """config.yaml merged with `presets` (files as --configfile gives them), as the workflow
    reads it; a fresh copy."""
    return deep_merge(_config(tuple(str(p) for p in presets)), {})


def training_spec(overrides: dict | None = None, base: dict | None = None) -> TrainingSpec:
    """config.yaml's `training:` (or `base`, e.g. an experiment's merged section) with
    `overrides` merged in key by key."""
    section = config()["training"] if base is None else base
    return from_data(TrainingSpec, deep_merge(section, overrides or {}), "training")


def runtime_spec(overrides: dict | None = None, base: dict | None = None) -> RuntimeSpec:
    """config.yaml's `runtime:` (or `base`) with `overrides` merged in key by key."""
    section = config()["runtime"] if base is None else base
    return from_data(RuntimeSpec, deep_merge(section, overrides or {}), "runtime")


def experiment_specs(name: str, training: dict | None = None, runtime: dict | None = None,
                     presets: tuple = ()) -> tuple[TrainingSpec, RuntimeSpec]:
    """An experiment as the workflow resolves it from config.yaml (and `presets`), with
    `training` and `runtime` changes merged over its sections."""
    t, r = experiment_sections(config(*presets), name)
    return training_spec(training, base=t), runtime_spec(runtime, base=r)


def split_spec(**overrides) -> SplitSpec:
    """config.yaml's `data:` split (val_size, split_seed, subset) with overrides."""
    data = config()["data"]
    section = {key: data[key] for key in ("val_size", "split_seed", "subset")}
    return from_data(SplitSpec, deep_merge(section, overrides), "data")


def describe(spec: TrainingSpec, runtime: RuntimeSpec) -> str:
    m, o = spec.model, spec.optimizer
    opt = f"{o.name}/{o.base}" if o.name in ("sam", "asam") else o.name
    extra = [spec.precision, spec.loss.name]
    if spec.ema.enabled:
        extra.append("ema")
    if runtime.channels_last:
        extra.append("channels_last")
    if runtime.compile:
        extra.append(f"compile={runtime.compile}")
    return (f"{m.name} w{m.width} b{spec.batch_size} {opt} "
            f"aug={spec.augment.name}/{spec.augment.mode} " + " ".join(extra))


# ----------------------------------------------------------------------------- data
def load_fashion_mnist() -> tuple[dict, str]:
    """Real Fashion-MNIST: the workflow's prepared data.npz when present, else Debian's files
    through the package's own raw_data.fetch / load_raw and splits.split (config.yaml's
    split). Returns (data, where from)."""
    from cifar_ensembles.files import raw_data, splits

    if PREPARED_FASHION.exists():
        return splits.load(PREPARED_FASHION), str(PREPARED_FASHION)
    with tempfile.TemporaryDirectory() as tmp:
        raw = raw_data.fetch("fashion_mnist", Path(tmp) / "raw", source=FASHION_SOURCE)
        data = splits.split(raw_data.load_raw("fashion_mnist", raw), split_spec())
    return data, FASHION_SOURCE


def synthetic_cifar(n_train: int, n_val: int = 512, size: int = 32, channels: int = 3,
                    seed: int = 0) -> dict:
    """Random uint8 CIFAR-shaped data (10 classes) through splits.split: the prepared
    layout, for machines without data."""
    from cifar_ensembles.files import splits

    rng = np.random.default_rng(seed)
    n_test = 64
    x = rng.integers(0, 256, (n_train + n_val + n_test, size, size, channels), dtype=np.uint8)
    y = np.arange(len(x), dtype=np.int64) % 10
    rng.shuffle(y)
    raw = dict(x_train=x[:n_train + n_val], y_train=y[:n_train + n_val], x_test=x[n_train + n_val:],
               y_test=y[n_train + n_val:], classes=np.array([f"class{i}" for i in range(10)]))
    return splits.split(raw, split_spec(val_size=n_val, subset={"train": None, "test": None}))


def take(data: dict, n_train: int, n_val: int) -> dict:
    """The first n_train training and n_val validation images (repeated when too few)."""
    out = dict(data)
    for split, n in (("train", n_train), ("val", n_val)):
        x, y = data[f"x_{split}"], data[f"y_{split}"]
        idx = np.arange(n) % len(y)
        out[f"x_{split}"], out[f"y_{split}"] = x[idx], y[idx]
    out["train_index"], out["val_index"] = np.arange(n_train), np.arange(n_val)
    return out


# ----------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batches(trainer):
    """The trainer's own input pipeline (`trainer.inputs`), epoch after epoch, without end."""
    epoch = 0
    while True:
        yield from trainer.inputs.epoch(epoch, 0)
        epoch += 1


def run_steps(trainer, steps: int | None = None, seconds: float | None = None,
              start_at: float | None = None) -> dict:
    """Trainer.train_step over the trainer's input pipeline for `steps` steps or `seconds`
    (from `start_at`, a time.monotonic() value, when given); the device is synchronized
    before the clock stops. Returns images, seconds, images/s and ms per step."""
    if start_at is not None:
        while time.monotonic() < start_at:
            time.sleep(0.001)
    device, done, images = trainer.device, 0, 0
    start = time.monotonic()
    for x, y in batches(trainer):
        trainer.train_step(x, y)
        done, images = done + 1, images + len(y)
        if steps is not None and done >= steps:
            break
        if seconds is not None and time.monotonic() - start >= seconds:
            break
    sync(device)
    elapsed = time.monotonic() - start
    return {"steps": done, "images": images, "seconds": elapsed,
            "images_per_second": images / elapsed, "step_ms": 1000 * elapsed / max(done, 1)}


def warm_up(trainer, steps: int) -> None:
    """A few real steps before timing (allocator, cuDNN autotuning, torch.compile)."""
    if steps > 0:
        run_steps(trainer, steps=steps)


def trainer_epoch(spec: TrainingSpec, runtime: RuntimeSpec, data: dict, threads: int = 1,
                  warmup: int = 2, seed: int = 0) -> dict:
    """Our Trainer's own loop (Trainer.fit, one epoch over `data`): images/s of the training
    loop (history's images_per_second: evaluation excluded) and its data-wait fraction."""
    from cifar_ensembles.training import Trainer

    trainer = Trainer(dataclasses.replace(spec, epochs=1), runtime, data, seed, threads, log=quiet)
    warm_up(trainer, warmup)
    row = trainer.fit()[-1]
    timing = trainer.timing[-1]
    return {"images_per_second": row.images_per_second, "seconds": row.seconds,
            "data_wait_fraction": timing["data_wait_seconds"] / max(timing["seconds"], 1e-9),
            "steps": trainer.steps_per_epoch}


def bare_loop(spec: TrainingSpec, runtime: RuntimeSpec, data: dict, steps: int, threads: int = 1,
              warmup: int = 2, seed: int = 0) -> dict:
    """The minimal PyTorch loop with the same model, batch size, precision, memory format
    and device: pre-normalized tensors on the device, random batches, cross entropy,
    torch's SGD (its default implementation), backward, step. No loader, no augmentation,
    no bookkeeping. The spec's optimizer must be SGD."""
    from cifar_ensembles.compute.device import autocast, resolve_device
    from cifar_ensembles.models import build_model
    from cifar_ensembles.transforms.augment import normalization, to_normalized_tensor

    torch.set_num_threads(threads)
    device = resolve_device(runtime.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = runtime.cudnn_benchmark
    x_np, y_np = data["x_train"], data["y_train"]
    mean, std = normalization(spec.augment.normalize, data["mean"], data["std"], x_np.shape[-1])
    torch.manual_seed(seed)
    model = build_model(spec.model, len(data["classes"]), x_np.shape[-1]).to(device)
    cl = runtime.channels_last
    model = model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
    step_model = model
    reduce_overhead = runtime.compile == "reduce-overhead" and device.type == "cuda"
    if runtime.compile:
        step_model = torch.compile(model, mode="reduce-overhead" if reduce_overhead else None)
    o = spec.optimizer
    assert o.name == "sgd", "the bare loop is the SGD reference"
    opt = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum,
                          weight_decay=o.weight_decay, nesterov=o.nesterov)
    # plain NCHW strides (a one-channel tensor made by movedim has channels_last strides,
    # which would pick other convolution kernels than the trainer's batches get)
    x_all = to_normalized_tensor(x_np, mean, std).clone(memory_format=torch.contiguous_format).to(device)
    if cl:
        x_all = to_channels_last(x_all)
    y_all = torch.as_tensor(y_np).to(device)
    bs, n = spec.batch_size, len(y_np)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(device)

    def step(i):
        idx = order[(i * bs) % (n - bs + 1):][:bs]
        if reduce_overhead:
            torch.compiler.cudagraph_mark_step_begin()
        opt.zero_grad(set_to_none=True)
        with autocast(device, spec.precision):
            out = step_model(to_channels_last(x_all[idx]) if cl else x_all[idx])
        loss = torch.nn.functional.cross_entropy(out.float(), y_all[idx])
        loss.backward()
        opt.step()

    for i in range(warmup):
        step(i)
    sync(device)
    start = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    sync(device)
    seconds = time.perf_counter() - start
    return {"images_per_second": steps * bs / seconds, "seconds": seconds, "steps": steps}


def median_of(values):
    return float(statistics.median(values)) if values else None


# ------------------------------------------------------------------ pools of processes
def task(name: str, spec: TrainingSpec, runtime: RuntimeSpec) -> dict:
    """A trainer a pool process builds: its name and its specs as plain data."""
    return {"name": name, "training": to_data(spec), "runtime": to_data(runtime)}


def _say(message: dict) -> None:
    print("@@ " + json.dumps(message), flush=True)


def worker(job: dict) -> None:
    """One process of a WorkerPool: builds the trainers of its tasks on the prepared data at
    job["data"] (seed job["seed"], job["threads"] torch threads), warms each up, says it is
    ready, then answers commands read from stdin, one JSON line each:
    {"run": TASK, "start_at": MONOTONIC, "seconds": S} trains that task from start_at for S
    seconds (Trainer.train_step over its own input pipeline) and answers with run_steps'
    result; {"quit": true} or the end of stdin ends the process."""
    from cifar_ensembles.files import splits
    from cifar_ensembles.training import Trainer

    data = splits.load(job["data"])
    trainers = []
    for t in job["tasks"]:
        spec = from_data(TrainingSpec, t["training"], "training")
        runtime = from_data(RuntimeSpec, t["runtime"], "runtime")
        trainer = Trainer(spec, runtime, data, job["seed"], job["threads"], log=quiet)
        start = time.monotonic()
        warm_up(trainer, job["warmup"])
        trainers.append((trainer, time.monotonic() - start))
    _say({"ready": True, "warmup_seconds": [round(s, 3) for _, s in trainers],
          "threads": torch.get_num_threads()})
    for line in sys.stdin:
        command = json.loads(line)
        if command.get("quit"):
            break
        trainer = trainers[command["run"]][0]
        _say(run_steps(trainer, seconds=command["seconds"], start_at=command["start_at"]))


class WorkerPool:
    """Training processes (`python -m benchmarks.common worker`) on one prepared data file.

    `jobs[i]` lists the tasks (see `task`) process i builds (seed i), so each process can
    train any of its trainers; `run({process: task index}, seconds)` makes those processes
    train together for `seconds` from a common start time and returns each one's result
    and the aggregate images/s. Processes stay up between runs (no start-up per run); idle
    ones wait on stdin. `timeout` bounds the start-up (imports, building and warming up
    every trainer, torch.compile included): past it the pool is killed and TimeoutError
    raised, or, with `tolerant`, only the late or failed processes are, each one's problem
    kept in `failed` (process index: message) and the others stay usable. Each process's
    stderr goes to `log_dir`/`name`N.log when `log_dir` is given (kept), else to a
    temporary folder removed on close.
    """

    def __init__(self, jobs: list[list[dict]], data_path: str, threads: int = 1, warmup: int = 2,
                 timeout: float = 600, env: dict | None = None, tolerant: bool = False,
                 log_dir: str | os.PathLike | None = None, name: str = "worker"):
        self.procs, self.lines, self.failed = [], [], {}
        self._tmp = None if log_dir else tempfile.TemporaryDirectory()
        self.log_dir = Path(log_dir) if log_dir else Path(self._tmp.name)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", **(env or {}),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), str(ROOT),
                                                           os.environ.get("PYTHONPATH")]))}
        try:
            for seed, tasks in enumerate(jobs):
                payload = json.dumps({"tasks": tasks, "data": data_path, "seed": seed,
                                      "threads": threads, "warmup": warmup})
                err = open(self.log_path(seed), "w")  # noqa: SIM115
                proc = subprocess.Popen([sys.executable, "-m", "benchmarks.common", "worker", payload],
                                        cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=err, text=True, start_new_session=True)
                err.close()
                lines: queue.Queue = queue.Queue()
                threading.Thread(target=self._read, args=(proc, lines), daemon=True).start()
                self.procs.append(proc)
                self.lines.append(lines)
            deadline = time.monotonic() + timeout
            self.ready = {}
            for i in range(len(self.procs)):
                try:
                    self.ready[i] = self._answer(i, deadline - time.monotonic())
                except (RuntimeError, TimeoutError) as err:
                    if not tolerant:
                        raise
                    self._kill(self.procs[i])
                    self.failed[i] = str(err)
        except BaseException:
            self.close(kill=True)
            raise

    def log_path(self, i: int) -> Path:
        return self.log_dir / f"{self.name}{i}.log"

    @staticmethod
    def _read(proc, lines: queue.Queue) -> None:
        for line in proc.stdout:
            if line.startswith("@@ "):
                lines.put(json.loads(line[3:]))
        lines.put(None)

    def _answer(self, i: int, timeout: float) -> dict:
        try:
            message = self.lines[i].get(timeout=max(timeout, 0.1))
        except queue.Empty:
            raise TimeoutError(f"benchmark worker {i} gave no answer within {timeout:.0f} s") from None
        if message is None:
            code = self.procs[i].wait()
            text = self.log_path(i).read_text(errors="replace")
            raise RuntimeError(f"benchmark worker {i} exited ({code}): {error_line(text)}")
        return message

    def run(self, assignment: dict[int, int], seconds: float) -> dict:
        for i in assignment:
            if i in self.failed:
                raise RuntimeError(self.failed[i])
        start_at = time.monotonic() + 0.2 + 0.02 * len(assignment)
        for i, t in assignment.items():
            self.procs[i].stdin.write(json.dumps({"run": t, "start_at": start_at, "seconds": seconds}) + "\n")
            self.procs[i].stdin.flush()
        jobs = [self._answer(i, seconds + 120) for i in assignment]
        return {"jobs": jobs, "aggregate_images_per_second": sum(j["images_per_second"] for j in jobs)}

    @staticmethod
    def _kill(p) -> None:
        """End a process and what it started (its own session: torch.compile's workers too)."""
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
        p.wait()

    def close(self, kill: bool = False) -> None:
        """Ask every process to quit (kill: end them at once)."""
        for p in self.procs:
            with contextlib.suppress(Exception):
                if not kill and p.poll() is None:
                    p.stdin.write(json.dumps({"quit": True}) + "\n")
                p.stdin.close()
        for p in self.procs:
            try:
                p.wait(timeout=0.1 if kill else 30)
            except subprocess.TimeoutExpired:
                self._kill(p)
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.close(kill=exc_type is not None)


def write_data(path, data: dict) -> str:
    """`data` as a prepared data.npz (what pool processes read)."""
    from cifar_ensembles.files import splits

    splits.write(path, data)
    return str(path)


# ----------------------------------------------------------------------------- output
def machine() -> dict:
    info = {"python": platform.python_version(), "torch": str(torch.__version__),
            "cpus": os.cpu_count(), "platform": platform.platform()}
    with contextlib.suppress(Exception):
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        info["cpu_model"] = fields.get("Model name", "").strip()
        info["lscpu_head"] = "\n".join(lscpu.splitlines()[:20])
    with contextlib.suppress(Exception):
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def table(rows: list[tuple], header: tuple) -> str:
    cells = [tuple(str(c) for c in header)] + [tuple(fmt(c) for c in row) for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3f}"
    return str(value)


def write_json(path, results: dict) -> None:
    """`results` as JSON at `path`, replaced in one step (a run killed while writing leaves
    the previous version, never half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, default=float) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "worker":
        worker(json.loads(sys.argv[2]))
    else:
        raise SystemExit("usage: python -m benchmarks.common worker JSON (internal)")
