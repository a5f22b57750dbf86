"""Helpers shared by the CPU and GPU benchmarks: data, specs, the bare reference loop, the
trainer measured through its own loop, and concurrent training processes.

Run as `python -m benchmarks.common worker JSON` it is one of those processes (internal).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cifar_ensembles.inference import to_channels_last  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FASHION_SOURCE = "/usr/share/datasets/fashion-mnist"
PREPARED_FASHION = ROOT / "resources" / "fashion_mnist" / "data.npz"


def quiet(_msg):
    pass


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- data
def load_fashion_mnist(val_size: int = 2000) -> tuple[dict, str]:
    """Real Fashion-MNIST: the prepared data.npz when present, else Debian's files through
    the package's own fetch / load_raw / prepare.split. Returns (data, where from)."""
    from cifar_ensembles import prepare

    if PREPARED_FASHION.exists():
        return prepare.load(PREPARED_FASHION), str(PREPARED_FASHION)
    from cifar_ensembles.datasets import fetch, load_raw

    with tempfile.TemporaryDirectory() as tmp:
        raw = fetch("fashion_mnist", Path(tmp) / "raw", source=FASHION_SOURCE)
        data = prepare.split(load_raw("fashion_mnist", raw), val_size, 0)
    return data, FASHION_SOURCE


def synthetic_cifar(n_train: int, n_val: int = 512, size: int = 32, channels: int = 3,
                    seed: int = 0) -> dict:
    """Random uint8 CIFAR-shaped data in prepare.split's layout (for machines without data)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n_train + n_val, size, size, channels), dtype=np.uint8)
    y = rng.integers(0, 10, n_train + n_val).astype(np.int64)
    x_float = x[:min(n_train, 4096)].astype(np.float64) / 255.0
    mean = x_float.mean(axis=(0, 1, 2)).astype(np.float32)
    std = x_float.std(axis=(0, 1, 2)).astype(np.float32)
    return dict(x_train=x[:n_train], y_train=y[:n_train], x_val=x[n_train:], y_val=y[n_train:],
                x_test=x[n_train:], y_test=y[n_train:],
                classes=np.array([f"class{i}" for i in range(10)]), mean=mean, std=std,
                train_index=np.arange(n_train), val_index=np.arange(n_train, n_train + n_val),
                test_index=np.arange(n_val))


def take(data: dict, n_train: int, n_val: int) -> dict:
    """The first n_train training and n_val validation images (repeated when too few)."""
    out = dict(data)
    for split, n in (("train", n_train), ("val", n_val)):
        x, y = data[f"x_{split}"], data[f"y_{split}"]
        idx = np.arange(n) % len(y)
        out[f"x_{split}"], out[f"y_{split}"] = x[idx], y[idx]
    out["train_index"], out["val_index"] = np.arange(n_train), np.arange(n_val)
    return out


# ----------------------------------------------------------------------------- specs
BASE_SPEC = {
    "device": "cpu", "precision": "fp32", "channels_last": False, "compile": False,
    "cudnn_benchmark": True, "epochs": 1, "batch_size": 64, "eval_batch_size": 512,
    "model": {"name": "resnet18_cifar", "width": 16, "pretrained": False, "input_size": None},
    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": False},
    "scheduler": {"name": "constant", "interval": "epoch"},
    "loss": {"name": "cross_entropy", "label_smoothing": 0.0},
    "augment": {"name": "none", "device": "cpu"},
    "ema": {"enabled": False},
    "loader": {"num_workers": 0, "pin_memory": True, "persistent_workers": True},
}


def make_spec(**overrides) -> dict:
    """BASE_SPEC with overrides merged one level deep (dict values update dict values)."""
    spec = copy.deepcopy(BASE_SPEC)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec


def describe(spec: dict) -> str:
    m, o = spec["model"], spec["optimizer"]
    extra = [spec["precision"]]
    if spec.get("channels_last"):
        extra.append("channels_last")
    if spec.get("compile"):
        extra.append(f"compile={spec['compile']}")
    return (f"{m['name']} w{m.get('width')} b{spec['batch_size']} {o['name']} "
            f"aug={spec['augment']['name']}/{spec['augment'].get('device', 'cpu')} " + " ".join(extra))


# ----------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(trainer, steps: int) -> None:
    """A few real steps before timing (allocator, cuDNN autotuning, torch.compile)."""
    if steps <= 0:
        return
    batches = iter(trainer.loader)
    for _ in range(steps):
        x, y = next(batches)
        x, y = x.to(trainer.device), y.to(trainer.device)
        if trainer.channels_last:
            x = to_channels_last(x)
        trainer.train_step(x, y)
    del batches
    sync(trainer.device)


def trainer_epoch(spec: dict, data: dict, threads: int = 1, warmup: int = 2, seed: int = 0) -> dict:
    """Our Trainer's own loop (Trainer.fit, one epoch over `data`): images/s of the training
    loop (history's images_per_second: evaluation excluded) and its data-wait fraction."""
    from cifar_ensembles.train import Trainer

    trainer = Trainer(spec, data, seed, threads, log=quiet)
    warm_up(trainer, warmup)
    history = trainer.fit()
    row, timing = history[-1], trainer.timing[-1]
    return {"images_per_second": row["images_per_second"], "seconds": row["seconds"],
            "data_wait_fraction": timing["data_wait_seconds"] / max(timing["seconds"], 1e-9),
            "steps": trainer.steps_per_epoch}


def bare_loop(spec: dict, data: dict, steps: int, threads: int = 1, warmup: int = 2, seed: int = 0) -> dict:
    """The minimal PyTorch loop with the same model, batch size, optimizer (SGD), precision,
    memory format and device: pre-normalized tensors on the device, random batches, cross
    entropy, backward, step. No loader, no augmentation, no bookkeeping."""
    from cifar_ensembles.augment import normalization, to_normalized_tensor
    from cifar_ensembles.inference import autocast, resolve_device, to_channels_last
    from cifar_ensembles.models import build_model

    torch.set_num_threads(threads)
    device = resolve_device(spec["device"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(spec.get("cudnn_benchmark", True))
    x_np, y_np = data["x_train"], data["y_train"]
    mean, std = normalization(spec["augment"], data["mean"], data["std"], x_np.shape[-1])
    torch.manual_seed(seed)
    model = build_model(spec["model"], len(data["classes"]), x_np.shape[-1]).to(device)
    memory_format = torch.channels_last if spec.get("channels_last") else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    step_model = model
    if spec.get("compile"):
        mode = "reduce-overhead" if spec["compile"] == "reduce-overhead" and device.type == "cuda" else None
        step_model = torch.compile(model, mode=mode)
    o = spec["optimizer"]
    assert o["name"] == "sgd", "the bare loop is the SGD reference"
    opt = torch.optim.SGD(model.parameters(), lr=o["lr"], momentum=o.get("momentum", 0.9),
                          weight_decay=o.get("weight_decay", 0.0), nesterov=o.get("nesterov", False))
    # plain NCHW strides (a one-channel tensor made by movedim has channels_last strides,
    # which would pick other convolution kernels than the trainer's batches get)
    x_all = to_normalized_tensor(x_np, mean, std).clone(memory_format=torch.contiguous_format).to(device)
    if spec.get("channels_last"):
        x_all = to_channels_last(x_all)
    y_all = torch.as_tensor(y_np).to(device)
    bs, n = spec["batch_size"], len(y_np)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(device)
    precision, reduce_overhead = spec["precision"], spec.get("compile") == "reduce-overhead"
    cl = bool(spec.get("channels_last"))

    def step(i):
        idx = order[(i * bs) % (n - bs + 1):][:bs]
        if reduce_overhead:
            torch.compiler.cudagraph_mark_step_begin()
        opt.zero_grad(set_to_none=True)
        with autocast(device, precision):
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


# ------------------------------------------------------------------ concurrent processes
def worker(job: dict) -> dict:
    """One training process of a concurrency measurement: Trainer.train_step over the
    trainer's real loader for `seconds` after everyone is ready."""
    from cifar_ensembles import prepare
    from cifar_ensembles.train import Trainer

    data = prepare.load(job["data"])
    trainer = Trainer(job["spec"], data, job.get("seed", 0), job.get("threads", 1), log=quiet)
    warm_up(trainer, job.get("warmup", 2))
    print("ready", flush=True)
    go = Path(job["go"])
    deadline = time.monotonic() + 600
    while not go.exists():
        if time.monotonic() > deadline:
            raise SystemExit("no go signal")
        time.sleep(0.002)

    def batches():
        epoch = 0
        while True:
            trainer.sampler.epoch, trainer.sampler.start_batch = epoch, 0
            yield from trainer.loader
            epoch += 1

    device, images = trainer.device, 0
    start = time.perf_counter()
    for x, y in batches():
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if trainer.channels_last:
            x = to_channels_last(x)
        trainer.train_step(x, y)
        images += len(y)
        if time.perf_counter() - start >= job["seconds"]:
            break
    sync(device)
    seconds = time.perf_counter() - start
    return {"images": images, "seconds": seconds, "images_per_second": images / seconds,
            "threads": torch.get_num_threads()}


def run_concurrent(jobs: list[dict], data_path: str, seconds: float, timeout: float = 300) -> dict:
    """Start one process per job, wait until all are warmed up, let them train together for
    `seconds`, and return each one's images/s and the sum."""
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), str(ROOT),
                                                       os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory() as tmp:
        go = Path(tmp) / "go"
        procs = []
        for job in jobs:
            payload = json.dumps({**job, "data": data_path, "go": str(go), "seconds": seconds})
            procs.append(subprocess.Popen([sys.executable, "-m", "benchmarks.common", "worker", payload],
                                          cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True))
        try:
            for p in procs:
                line = p.stdout.readline().strip()
                if line != "ready":
                    raise RuntimeError(f"a benchmark worker failed to start (exit {p.wait()})")
            go.touch()
            results = []
            for p in procs:
                out, _ = p.communicate(timeout=timeout)
                if p.returncode != 0:
                    raise RuntimeError(f"a benchmark worker failed (exit {p.returncode})")
                results.append(json.loads(out.strip().splitlines()[-1]))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    return {"jobs": results, "aggregate_images_per_second": sum(r["images_per_second"] for r in results)}


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=float) + "\n")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "worker":
        print(json.dumps(worker(json.loads(sys.argv[2]))), flush=True)
    else:
        raise SystemExit("usage: python -m benchmarks.common worker JSON (internal)")
