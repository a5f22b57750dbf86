"""GPU claims among the GPUs a job can see, tested on CPUs with fake GPU counts and env vars.

Several processes claim distinct GPUs through lock files; a process that ends, even by
SIGKILL, gives its GPU back; a claimant waits (and says so) while all are taken; jobs spread
before they pack (the GPU with the most free slots, the lowest position on a tie; 11 jobs at
4 per GPU on 4 GPUs run 3/3/3/2). The visible GPUs are CUDA_VISIBLE_DEVICES's entries (indices
or UUIDs, up to the first empty or negative one) when it is set, else every GPU; a job claims
among them when two or more are visible and narrows CUDA_VISIBLE_DEVICES to its entry; under
SLURM the lock keys carry the job id, so a multi-GPU allocation claims without colliding with
another job's "0" and a one-GPU job is left alone, as are `cpu`, explicit `cuda:N` and one-GPU
machines. `cifar-ensembles train` claims its share before training starts, `predict` one slot.
"""

from __future__ import annotations

import fcntl
import multiprocessing as mp
import os
import queue
import time
from collections import Counter

import pytest

from cifar_ensembles.compute import gpu_claim
from cifar_ensembles.config.convert import to_json
from cifar_ensembles.errors import UserError
from cifar_ensembles.files import splits

# conftest (which imports torch) is imported inside the CLI tests only: the spawned children
# import this module, and keep starting in a fraction of a second without it.

CTX = mp.get_context("spawn")  # a clean child: no locks or threads inherited from this process
WAIT = 30.0  # seconds a test waits for a child before failing
UUIDS = ["GPU-1a2b3c4d-0000-4000-8000-00000000000a", "GPU-5e6f7a8b-0000-4000-8000-00000000000b",
         "GPU-9c0d1e2f-0000-4000-8000-00000000000c"]


def _holder(gpus, lock_dir: str, events, release, jobs_per_gpu: int = 1, wait_for_go: bool = False) -> None:
    """Child: claim a GPU, report it, hold it until `release` (its own pipe) speaks or closes.

    With `wait_for_go` it claims only after a first message on `release`, so a test can start
    children together (their start-up overlaps) and let them claim one at a time. One pipe per
    child, not a shared Event: a SIGKILLed waiter would leave a shared primitive's bookkeeping
    behind and deadlock the others.
    """
    pid = os.getpid()
    if wait_for_go:
        if not release.poll(60):
            return
        release.recv()
    index = gpu_claim.claim_gpu(gpus, lock_dir, log=lambda msg: events.put((pid, "log", msg)),
                                poll_seconds=0.05, jobs_per_gpu=jobs_per_gpu)
    events.put((pid, "claimed", index))
    release.poll(60)


def _next(events, kind: str, timeout: float = WAIT):
    """The next event of `kind` (pid, value); other events are skipped."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {kind!r} event within {timeout}s")
        try:
            pid, what, value = events.get(timeout=left)
        except queue.Empty:
            continue
        if what == kind:
            return pid, value


def _stop(pipes, procs) -> None:
    for parent, _ in pipes:
        parent.send("release")
    for p in procs:
        if p.pid is not None:
            p.join(WAIT)
            if p.is_alive():
                p.kill()


def held_slots(lock_dir, key) -> int:
    """Slots of GPU `key` (a position or a lock key) locked by any open file (flock conflicts
    even within one process)."""
    held = 0
    for slot in range(gpu_claim.SLOTS):
        try:
            fd = os.open(gpu_claim.slot_path(key, slot, lock_dir), os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            held += 1
        finally:
            os.close(fd)
    return held


def held_by_someone(lock_dir, key) -> bool:
    return held_slots(lock_dir, key) > 0


@pytest.fixture
def hold(lock_dir):
    """hold(key, n): lock n slots of GPU `key` the way another job would; freed after the test."""
    fds = []

    def take(key, n: int) -> None:
        lock_dir.mkdir(exist_ok=True)
        taken = 0
        for slot in range(gpu_claim.SLOTS):
            if taken == n:
                break
            fd = os.open(gpu_claim.slot_path(key, slot, lock_dir), os.O_RDONLY | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            fds.append(fd)
            taken += 1
        assert taken == n

    yield take
    for fd in fds:
        os.close(fd)


@pytest.fixture
def lock_dir(tmp_path):
    yield tmp_path / "locks"
    for directory, key in [k for k in gpu_claim._held if k[0] == str(tmp_path / "locks")]:
        gpu_claim.release_gpu([key], 0, directory)


def no_log(_msg) -> None:
    pass


@pytest.mark.parametrize("gpus", [0, 1, [], ["GPU-1a2b"]], ids=["none", "one", "no-keys", "one-key"])
def test_nothing_to_choose_with_fewer_than_two_gpus(lock_dir, gpus):
    assert gpu_claim.claim_gpu(gpus, lock_dir, jobs_per_gpu=1) is None
    assert not lock_dir.exists()


def test_processes_claim_distinct_gpus_and_a_killed_holder_releases(lock_dir):
    events = CTX.Queue()
    pipes = [CTX.Pipe() for _ in range(4)]
    holders = [CTX.Process(target=_holder, args=(3, str(lock_dir), events, child))
               for _, child in pipes[:3]]
    waiter = CTX.Process(target=_holder, args=(3, str(lock_dir), events, pipes[3][1]))
    try:
        for p in holders:
            p.start()
        claims = dict(_next(events, "claimed") for _ in holders)
        assert sorted(claims.values()) == [0, 1, 2]
        assert all(held_by_someone(lock_dir, i) for i in range(3))

        waiter.start()  # all three taken: it logs that it waits, and claims nothing yet
        pid, message = _next(events, "log")
        assert pid == waiter.pid and "all 3 visible GPUs are claimed" in message and "waiting" in message
        time.sleep(0.5)
        assert events.empty(), "the waiter claimed a GPU that was held"

        victim = next(p for p in holders if claims[p.pid] == 1)
        victim.kill()  # SIGKILL: no cleanup code runs; the kernel drops the flock
        victim.join(WAIT)
        pid, index = _next(events, "claimed")
        assert (pid, index) == (waiter.pid, 1)
    finally:
        _stop(pipes, [*holders, waiter])
    # every holder has exited: every GPU is free again
    assert not any(held_by_someone(lock_dir, i) for i in range(3))


def test_claim_is_held_for_the_process_and_released_on_request(lock_dir):
    messages = []
    assert gpu_claim.claim_gpu(2, lock_dir, log=messages.append, jobs_per_gpu=1) == 0
    assert "using GPU 0 of 2 visible" in messages[0]
    assert held_by_someone(lock_dir, 0) and not held_by_someone(lock_dir, 1)
    again = gpu_claim.claim_gpu(2, lock_dir, log=messages.append, jobs_per_gpu=1)
    assert again == 0, "a second call keeps this process's GPU"
    gpu_claim.release_gpu(2, 0, lock_dir)
    assert not held_by_someone(lock_dir, 0)


def test_context_manager_releases_at_the_end_of_the_block(lock_dir):
    with gpu_claim.claimed_gpu(["a", "b"], lock_dir, log=no_log, jobs_per_gpu=1) as index:
        assert index == 0 and held_by_someone(lock_dir, "a")
    assert not held_by_someone(lock_dir, "a")


def test_skips_gpus_held_elsewhere_and_waits_when_all_are(lock_dir, hold):
    hold(0, gpu_claim.SLOTS)  # other jobs hold GPU 0 and part of GPU 1
    hold(1, 1)
    assert gpu_claim.claim_gpu(3, lock_dir, log=no_log, jobs_per_gpu=1) == 2
    gpu_claim.release_gpu(3, 2, lock_dir)

    messages = []
    with pytest.raises(TimeoutError):
        gpu_claim.claim_gpu(2, lock_dir, log=messages.append, poll_seconds=0.02, timeout=1.0, jobs_per_gpu=1)
    assert len(messages) == 1 and "all 2 visible GPUs are claimed" in messages[0], messages


@pytest.mark.parametrize("n_gpus, held, jobs_per_gpu, expected", [
    (2, {0: 4}, 2, 1),                # a half-GPU job goes to the idle GPU, not beside the half-used one
    (2, {0: 4}, 1, 1),                # a whole-GPU job needs a GPU nobody uses
    (2, {0: 6, 1: 4}, 2, 1),          # GPU 0 has 2 slots left, too few for half a GPU
    (3, {0: 2, 1: 4, 2: 6}, 8, 0),    # the most free slots, though every GPU has room
    (3, {0: 4, 1: 2, 2: 2}, 4, 1),    # all in use: the most free again, the lowest on a tie
    (2, {0: 7, 1: 8}, 8, 0),          # an eighth fits in GPU 0's last slot
    (4, {}, 4, 0),                    # all idle: the first
], ids=["spread", "exclusive", "room", "most-free", "tie", "last-slot", "idle"])
def test_jobs_take_the_gpu_with_the_most_free_slots(lock_dir, hold, n_gpus, held, jobs_per_gpu, expected):
    for index, n in held.items():
        hold(index, n)
    assert gpu_claim.claim_gpu(n_gpus, lock_dir, log=no_log, jobs_per_gpu=jobs_per_gpu) == expected
    assert held_slots(lock_dir, expected) == held.get(expected, 0) + gpu_claim.SLOTS // jobs_per_gpu
    assert all(held_slots(lock_dir, i) == held.get(i, 0) for i in range(n_gpus) if i != expected)


def test_processes_share_gpus_as_declared(lock_dir):
    events = CTX.Queue()
    pipes = [CTX.Pipe() for _ in range(4)]
    procs = [CTX.Process(target=_holder, args=(2, str(lock_dir), events, child, 2)) for _, child in pipes]
    try:
        for p in procs:
            p.start()
        claims = [_next(events, "claimed")[1] for _ in procs]
        assert sorted(claims) == [0, 0, 1, 1]
        assert held_slots(lock_dir, 0) == held_slots(lock_dir, 1) == gpu_claim.SLOTS
    finally:
        _stop(pipes, procs)


def test_processes_spread_before_they_pack(lock_dir):
    """11 seeds at 4 per GPU on 4 GPUs, claiming one after another: 3/3/3/2, not 4/4/3/0."""
    events = CTX.Queue()
    pipes = [CTX.Pipe() for _ in range(11)]
    procs = [CTX.Process(target=_holder, args=(4, str(lock_dir), events, child, 4, True))
             for _, child in pipes]
    try:
        for p in procs:
            p.start()  # all start up together; each claims when told
        order = []
        for p, (parent, _) in zip(procs, pipes):
            parent.send("go")
            pid, index = _next(events, "claimed")
            assert pid == p.pid
            order.append(index)
        assert order == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2]
        assert Counter(order) == {0: 3, 1: 3, 2: 3, 3: 2}
        assert [held_slots(lock_dir, i) for i in range(4)] == [6, 6, 6, 4]
    finally:
        _stop(pipes, procs)


def test_jobs_per_gpu_must_divide_the_slots(lock_dir):
    with pytest.raises(UserError, match="runtime.jobs_per_gpu: 3"):
        gpu_claim.claim_gpu(2, lock_dir, log=no_log, jobs_per_gpu=3)


def test_unusable_lock_folder_is_one_line(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with pytest.raises(UserError, match="GPU lock folder.*CIFAR_ENSEMBLES_GPU_LOCK_DIR"):
        gpu_claim.claim_gpu(2, not_a_dir / "locks", log=no_log, jobs_per_gpu=1)


def test_lock_dir_defaults_to_env_then_temp(monkeypatch, tmp_path):
    monkeypatch.setenv(gpu_claim.LOCK_DIR_ENV, str(tmp_path))
    assert gpu_claim.slot_path(3, 7) == tmp_path / "cifar-ensembles-gpu-3-slot7.lock"
    assert gpu_claim.slot_path("slurm42-0", 1) == tmp_path / "cifar-ensembles-gpu-slurm42-0-slot1.lock"
    monkeypatch.delenv(gpu_claim.LOCK_DIR_ENV)
    assert gpu_claim.lock_dir().is_dir()


# -------------------------------------------------------------------------- visible GPUs
def _no_count():
    raise AssertionError("counted the machine's GPUs although CUDA_VISIBLE_DEVICES is set")


@pytest.mark.parametrize("value, expected", [
    ("3,5,7", ["3", "5", "7"]),
    (" 3, 5 ", ["3", "5"]),
    (",".join(UUIDS[:2]), UUIDS[:2]),
    ("0,-1,2", ["0"]),   # CUDA stops at the first invalid entry
    ("0,,2", ["0"]),
    ("-1", []),
    ("", []),
], ids=["indices", "spaces", "uuids", "negative", "empty-entry", "hidden", "empty"])
def test_visible_gpus_are_the_entries_of_cuda_visible_devices(value, expected):
    assert gpu_claim.visible_gpus({"CUDA_VISIBLE_DEVICES": value}, _no_count) == expected


def test_visible_gpus_are_every_gpu_when_cuda_visible_devices_is_unset():
    assert gpu_claim.visible_gpus({}, lambda: 3) == ["0", "1", "2"]
    assert gpu_claim.visible_gpus({"SLURM_JOB_ID": "7"}, lambda: 0) == []


@pytest.mark.parametrize("gpu_id, env, key", [
    ("3", {}, "3"),
    (UUIDS[0], {}, UUIDS[0]),
    ("MIG-GPU-1a2b/1/0", {}, "MIG-GPU-1a2b_1_0"),  # file-name safe
    ("0", {"SLURM_JOB_ID": "101", "CUDA_VISIBLE_DEVICES": "0,1"}, "slurm101-0"),  # SLURM numbered them
    (UUIDS[1], {"SLURM_JOB_ID": "101", "CUDA_VISIBLE_DEVICES": UUIDS[1]}, f"slurm101-{UUIDS[1]}"),
    ("0", {"SLURM_JOB_ID": "101"}, "0"),  # the job counted the machine's GPUs: physical indices
], ids=["index", "uuid", "mig", "slurm", "slurm-uuid", "slurm-counted"])
def test_gpu_key(gpu_id, env, key):
    assert gpu_claim.gpu_key(gpu_id, env) == key


# -------------------------------------------------------------------------- policy
def test_job_claims_and_sets_cuda_visible_devices(lock_dir):
    env = {gpu_claim.LOCK_DIR_ENV: str(lock_dir)}
    assert gpu_claim.claim_gpu_for_job("auto", no_log, 1, env=env, count=lambda: 4) == 0
    # it enumerated the GPUs itself: indices in nvidia-smi's order, in every job
    assert env["CUDA_VISIBLE_DEVICES"] == "0" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert held_slots(lock_dir, 0) == gpu_claim.SLOTS

    other = {gpu_claim.LOCK_DIR_ENV: str(lock_dir), "CUDA_DEVICE_ORDER": "FASTEST_FIRST"}
    gpu_claim.release_gpu(4, 0, lock_dir)
    assert gpu_claim.claim_gpu_for_job("cuda", no_log, 1, env=other, count=lambda: 4) == 0
    assert other["CUDA_VISIBLE_DEVICES"] == "0" and other["CUDA_DEVICE_ORDER"] == "FASTEST_FIRST"


@pytest.mark.parametrize("ids", [["3", "5", "7"], UUIDS], ids=["indices", "uuids"])
def test_job_claims_among_the_entries_of_cuda_visible_devices(lock_dir, hold, ids):
    hold(ids[0], gpu_claim.SLOTS)  # another job has the first visible GPU, one more a quarter of the last
    hold(ids[2], 2)
    env = {"CUDA_VISIBLE_DEVICES": ",".join(ids)}
    messages = []
    assert gpu_claim.claim_gpu_for_job("auto", messages.append, 4, env=env, count=_no_count,
                                       lock_dir_path=lock_dir) == 1
    assert env == {"CUDA_VISIBLE_DEVICES": ids[1]}  # narrowed to its entry; CUDA_DEVICE_ORDER is the user's
    assert held_slots(lock_dir, ids[1]) == 2
    assert (lock_dir / f"cifar-ensembles-gpu-{ids[1]}-slot0.lock").exists()
    assert "using GPU 1 of 3 visible, 2 of its 8 slots" in messages[0]


def test_entries_after_an_empty_or_negative_one_are_not_claimed(lock_dir, hold):
    hold("4", gpu_claim.SLOTS)
    hold("6", gpu_claim.SLOTS)
    env = {"CUDA_VISIBLE_DEVICES": "4,6,,7"}
    with pytest.raises(TimeoutError):  # "7" is not visible: the job waits for 4 or 6
        gpu_claim.claim_gpu_for_job("auto", no_log, 1, env=env, count=_no_count, lock_dir_path=lock_dir,
                                    poll_seconds=0.02, timeout=0.3)
    assert env == {"CUDA_VISIBLE_DEVICES": "4,6,,7"}
    assert not held_by_someone(lock_dir, "7")


def test_multi_gpu_slurm_allocation_claims_with_keys_of_its_job(lock_dir, hold):
    def claim(env, device="auto"):
        return gpu_claim.claim_gpu_for_job(device, no_log, 1, env=env, count=_no_count,
                                           lock_dir_path=lock_dir)

    first = {"SLURM_JOB_ID": "101", "CUDA_VISIBLE_DEVICES": "0,1"}
    assert claim(first) == 0
    assert first == {"SLURM_JOB_ID": "101", "CUDA_VISIBLE_DEVICES": "0"}
    assert held_slots(lock_dir, "slurm101-0") == gpu_claim.SLOTS
    assert not held_by_someone(lock_dir, "0")

    # another allocation's "0" is another device: job 202 takes its own GPU 0 as well
    second = {"SLURM_JOB_ID": "202", "CUDA_VISIBLE_DEVICES": "0,1"}
    assert claim(second, "cuda") == 0
    assert second["CUDA_VISIBLE_DEVICES"] == "0"
    assert held_slots(lock_dir, "slurm202-0") == gpu_claim.SLOTS

    # within one allocation the jobs see each other's claims
    hold("slurm303-0", gpu_claim.SLOTS)
    third = {"SLURM_JOB_ID": "303", "CUDA_VISIBLE_DEVICES": "0,1"}
    assert claim(third) == 1
    assert third["CUDA_VISIBLE_DEVICES"] == "1" and "CUDA_DEVICE_ORDER" not in third


@pytest.mark.parametrize("device, env, count", [
    ("cpu", {}, 4),
    ("cuda:1", {}, 4),
    ("cpu", {"CUDA_VISIBLE_DEVICES": "0,1"}, 4),
    ("auto", {"CUDA_VISIBLE_DEVICES": "2"}, 4),
    ("auto", {"CUDA_VISIBLE_DEVICES": UUIDS[0]}, 4),
    ("auto", {"CUDA_VISIBLE_DEVICES": "0,-1,2"}, 4),
    ("auto", {"CUDA_VISIBLE_DEVICES": "-1,0,1"}, 4),
    ("auto", {"CUDA_VISIBLE_DEVICES": ""}, 4),
    ("auto", {"SLURM_JOB_ID": "123", "CUDA_VISIBLE_DEVICES": "0"}, 4),
    ("auto", {}, 1),
    ("cuda", {}, 0),
], ids=["cpu", "explicit-index", "cpu-several-visible", "one-visible", "one-uuid", "stops-at-negative",
        "none-visible", "hidden", "slurm-one-gpu", "one-gpu", "no-gpu"])
def test_job_leaves_the_device_alone(lock_dir, device, env, count):
    before = dict(env)
    counted = []
    claimed = gpu_claim.claim_gpu_for_job(device, no_log, 1, env=env,
                                          count=lambda: counted.append(1) or count, lock_dir_path=lock_dir)
    assert claimed is None
    assert env == before
    assert not lock_dir.exists()
    if device in ("cpu", "cuda:1") or "CUDA_VISIBLE_DEVICES" in env:
        assert not counted, "counted GPUs when no claim could follow"


def test_gpu_count_needs_no_cuda():
    assert gpu_claim.gpu_count() >= 0


# ------------------------------------------------------------------------------ CLI
@pytest.fixture
def clean_env(monkeypatch, lock_dir):
    for name in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "CUDA_DEVICE_ORDER"):
        monkeypatch.setenv(name, "x")  # recorded, so that the undo removes what the CLI sets
        monkeypatch.delenv(name)
    monkeypatch.setenv(gpu_claim.LOCK_DIR_ENV, str(lock_dir))
    monkeypatch.setattr(gpu_claim, "gpu_count", lambda: 2)
    return lock_dir


@pytest.fixture
def data_npz(tmp_path):
    from conftest import make_data

    path = tmp_path / "data.npz"
    splits.write(path, make_data(n_train=32, size=8, n_val=4, n_test=4, classes=2))
    return path


def _seen(lock_dir, key) -> dict:
    return {"visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "order": os.environ.get("CUDA_DEVICE_ORDER"),
            "held": held_slots(lock_dir, key) if key is not None else 0}


@pytest.mark.parametrize("device, visible, expected", [
    ("auto", None, "0"),
    ("cuda", None, "0"),
    ("cpu", None, None),
    ("auto", "4,6", "4"),
    ("auto", "6", None),
], ids=["auto", "cuda", "cpu", "several-visible", "one-visible"])
def test_train_command_claims_before_training(monkeypatch, clean_env, data_npz, tmp_path, device, visible,
                                              expected):
    from conftest import tiny_runtime, tiny_spec

    from cifar_ensembles.cli import main
    from cifar_ensembles.stages import train

    if visible is not None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    seen = {}

    def fake_train(spec, runtime, data, seed, out_dir, *args):
        seen.update(_seen(clean_env, expected))

    monkeypatch.setattr(train, "train_to_files", fake_train)
    spec, runtime = to_json(tiny_spec(epochs=1)), to_json(tiny_runtime(device=device, jobs_per_gpu=4))
    assert main(["train", "--data", str(data_npz), "--spec", spec, "--runtime", runtime, "--seed", "0",
                 "--out-dir", str(tmp_path / "run"), "--threads", "1", "--name", "exp/seed0"]) == 0
    order = "PCI_BUS_ID" if visible is None and expected is not None else None
    if expected is not None:  # jobs_per_gpu reaches the claim
        assert seen == {"visible": expected, "order": order, "held": gpu_claim.SLOTS // 4}
    else:
        assert seen == {"visible": visible, "order": None, "held": 0}
        assert not clean_env.exists()


@pytest.mark.parametrize("device, busy, expected", [
    ("auto", False, "0"),
    ("cuda", True, "1"),  # a training job has a quarter of GPU 0: the prediction spreads to GPU 1
    ("cpu", False, None),
], ids=["auto", "spread", "cpu"])
def test_predict_command_claims_one_slot(monkeypatch, clean_env, hold, tmp_path, device, busy, expected):
    from conftest import predict_spec

    from cifar_ensembles.cli import main
    from cifar_ensembles.stages import predict

    if busy:
        hold(0, 2)
    seen = {}

    def fake_predict(model, data, split, probs, metrics, spec, threads):
        seen.update(_seen(clean_env, expected), device=spec.device, split=split)

    monkeypatch.setattr(predict, "predict_to_files", fake_predict)
    assert main(["predict", "--model", str(tmp_path / "model.pt"), "--data", str(tmp_path / "data.npz"),
                 "--split", "test", "--probs", str(tmp_path / "probs.npy"), "--metrics",
                 str(tmp_path / "metrics.json"), "--spec", to_json(predict_spec(device=device)),
                 "--threads", "1"]) == 0
    if expected is not None:
        assert seen == {"visible": expected, "order": "PCI_BUS_ID", "held": 1, "device": device,
                        "split": "test"}
        assert held_slots(clean_env, 0) == (2 if busy else 1)  # nothing more on GPU 0
    else:
        assert seen == {"visible": None, "order": None, "held": 0, "device": "cpu", "split": "test"}
        assert not clean_env.exists()
