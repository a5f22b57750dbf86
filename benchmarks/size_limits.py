"""Peak memory and disk of fetching and preparing a dataset, for real inputs and for bombs.

    python -m benchmarks.size_limits [--json PATH] [--work DIR]

Each step runs the package's command (`cifar-ensembles download` / `prepare`) in its own
process: peak memory is that process's maximum resident set (wait4's ru_maxrss), peak disk
the largest size of its output folder (the staging folder included), sampled every 20 ms.
Inputs: a full-size CIFAR-10 archive in the upstream layout (5 x 10,000 training and
10,000 test images, built by tests/cifar_fixture.py and pickled with protocol 4, which
stores bytes one to one as the upstream batches do), Debian's Fashion-MNIST, and the bombs
of issue 19 at the real bounds: a data_batch_1 declaring 1.5 GiB of zeros, one declaring
100 GiB, and a train-images stream with a valid header followed by 3 GiB of zeros. About
2 minutes and 3 GB of scratch disk on 2 cores.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from cifar_fixture import Member, cifar10_members, pickled_members, write_tar  # noqa: E402

from cifar_ensembles.config.convert import to_json  # noqa: E402
from cifar_ensembles.config.spec import SourceSpec, SplitSpec, SubsetSpec  # noqa: E402

FASHION = Path("/usr/share/datasets/fashion-mnist")
F10 = "cifar-10-batches-py"
MB = 1e6


def folder_size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def measure(args: list, watch: Path) -> dict:
    """Run `cifar-ensembles ARGS`; its exit status, last stderr line, peak RSS and the peak
    size of `watch` (a folder holding only this step's outputs)."""
    watch.mkdir(parents=True, exist_ok=True)
    peak, done = [0], threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], folder_size(watch))
            time.sleep(0.02)

    thread = threading.Thread(target=poll, daemon=True)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "cifar_ensembles.cli", *map(str, args)],
                            stderr=subprocess.PIPE, text=True)
    thread.start()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    thread.join()
    peak[0] = max(peak[0], folder_size(watch))
    return {"rc": proc.returncode, "line": (err.strip().splitlines() or [""])[-1][:300],
            "max_rss_mb": round(usage.ru_maxrss * 1024 / MB, 1), "peak_disk_mb": round(peak[0] / MB, 1),
            "final_disk_mb": round(folder_size(watch) / MB, 1),
            "seconds": round(time.perf_counter() - start, 1)}


def download(dataset: str, source: Path, md5: str | None, out: Path) -> list:
    spec = SourceSpec(source=str(source), url=None, md5=md5, own_dataset=False)
    return ["download", "--dataset", dataset, "--spec", to_json(spec), "--out", out]


def prepare(dataset: str, raw: Path, out: Path) -> list:
    spec = SplitSpec(val_size=5000, split_seed=0, subset=SubsetSpec(train=None, test=None))
    return ["prepare", "--dataset", dataset, "--spec", to_json(spec), "--raw", raw, "--out", out]


def md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def cifar_archive(folder: Path, members: list, replace: dict | None = None) -> tuple[Path, str]:
    path = folder / "cifar-10-python.tar.gz"
    folder.mkdir(parents=True, exist_ok=True)
    write_tar(path, [(replace or {}).get(m.name, m) for m in members])
    return path, md5(path)


def declared_only(folder: Path, member: str, size: int) -> tuple[Path, str]:
    """A .tar.gz whose one member declares `size` bytes and holds 1 MB of them (the rest would
    only make the file larger: the header is where it is refused)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cifar-10-python.tar.gz"
    info = tarfile.TarInfo(member)
    info.size = size
    with gzip.open(path, "wb") as f:
        f.write(info.tobuf(format=tarfile.GNU_FORMAT) + bytes(1 << 20))
    return path, md5(path)


def fashion_bomb(folder: Path, zeros: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(FASHION / name, folder / name)
    with gzip.open(folder / "train-images-idx3-ubyte.gz", "wb", compresslevel=9) as f:
        f.write(struct.pack(">4i", 0x0803, 60_000, 28, 28))
        block = bytes(64 << 20)
        for _ in range(zeros // len(block)):
            f.write(block)
    return folder


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    a = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="size_limits.", dir=a.work))
    results = {}
    try:
        members = pickled_members(F10, cifar10_members(per_batch=10_000, test_size=10_000), protocol=4)
        archive, sum10 = cifar_archive(work / "in10", members)
        results["cifar10 archive"] = {"packed_mb": round(archive.stat().st_size / MB, 1),
                                      "members_mb": round(sum(len(m.data) for m in members) / MB, 1)}
        results["cifar10 download"] = measure(download("cifar10", archive, sum10, work / "c10" / "raw"),
                                              work / "c10")
        results["cifar10 prepare"] = measure(
            prepare("cifar10", work / "c10" / "raw", work / "p10" / "data.npz"), work / "p10")
        results["fashion download"] = measure(download("fashion_mnist", FASHION, None, work / "fm" / "raw"),
                                              work / "fm")
        results["fashion prepare"] = measure(prepare("fashion_mnist", work / "fm" / "raw",
                                                     work / "pfm" / "data.npz"), work / "pfm")
        shutil.rmtree(work / "c10"), shutil.rmtree(work / "p10")

        bomb = Member(f"{F10}/data_batch_1", zeros=3 << 29)  # 1.5 GiB
        archive, sum_bomb = cifar_archive(work / "bomb15", members, {bomb.name: bomb})
        results["cifar10 member of 1.5 GiB"] = {"packed_mb": round(archive.stat().st_size / MB, 1),
                                                **measure(download("cifar10", archive, sum_bomb,
                                                                   work / "b15" / "raw"), work / "b15")}
        archive, sum_bomb = declared_only(work / "bomb100", f"{F10}/data_batch_1", 100 << 30)
        results["cifar10 member of 100 GiB"] = measure(download("cifar10", archive, sum_bomb,
                                                                work / "b100" / "raw"), work / "b100")
        folder = fashion_bomb(work / "fbomb", 3 << 30)
        results["fashion train-images + 3 GiB of zeros"] = {
            "packed_mb": round((folder / "train-images-idx3-ubyte.gz").stat().st_size / MB, 1),
            **measure(download("fashion_mnist", folder, None, work / "fb" / "raw"), work / "fb")}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for name, row in results.items():
        print(f"{name}: {json.dumps(row)}")
    if a.json:
        a.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
