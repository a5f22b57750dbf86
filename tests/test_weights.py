"""ImageNet weights as a workflow artifact: local file or hash-checked download, never in training."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
from pathlib import Path

import pytest
import torch
from torchvision.models import resnet18

from cifar_ensembles.config.spec import WeightsSpec
from cifar_ensembles.errors import UserError
from cifar_ensembles.files.weights import default_url, fetch_weights
from cifar_ensembles.models import ResNet18Cifar
from cifar_ensembles.stages.download import download_weights


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory) -> Path:
    """A torchvision ResNet-18 state dict (random weights, the real key layout)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "state.pth"
    torch.save(resnet18(weights=None).state_dict(), path)
    return path


@pytest.fixture
def server(tmp_path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield tmp_path, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def sha256_prefix(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:8]


def test_default_url_is_torchvisions_with_a_hash_prefix():
    assert default_url().startswith("https://download.pytorch.org/models/resnet18-")


def test_local_file_is_copied_after_an_architecture_check(imagenet_like, tmp_path):
    out = fetch_weights(tmp_path / "out" / "w.pth", local_file=str(imagenet_like))
    state = torch.load(out, weights_only=True)
    assert torch.equal(state["conv1.weight"], torch.load(imagenet_like, weights_only=True)["conv1.weight"])


def test_download_checks_the_hash_prefix_in_the_file_name(imagenet_like, server, tmp_path):
    folder, base = server
    name = f"resnet18-{sha256_prefix(imagenet_like)}.pth"
    (folder / name).write_bytes(imagenet_like.read_bytes())
    out = fetch_weights(tmp_path / "ok.pth", url=f"{base}/{name}")
    assert out.read_bytes() == imagenet_like.read_bytes()


def test_download_with_wrong_hash_is_rejected_and_leaves_nothing(imagenet_like, server, tmp_path):
    folder, base = server
    (folder / "resnet18-00000000.pth").write_bytes(imagenet_like.read_bytes())
    out = tmp_path / "out" / "bad.pth"
    with pytest.raises(UserError, match="pretrained_weights.url"):
        fetch_weights(out, url=f"{base}/resnet18-00000000.pth")
    assert not out.exists() and not list(out.parent.glob(".*"))


def test_weights_of_another_architecture_are_rejected(tmp_path):
    other = tmp_path / "cifar.pth"
    torch.save(ResNet18Cifar(10, 3, 8).state_dict(), other)
    out = tmp_path / "out.pth"
    with pytest.raises(UserError, match="pretrained_weights.file.*another architecture"):
        fetch_weights(out, local_file=str(other))
    assert not out.exists()


def test_missing_local_file(tmp_path):
    with pytest.raises(UserError, match="pretrained_weights.file: .*no such file"):
        fetch_weights(tmp_path / "out.pth", local_file=str(tmp_path / "nope.pth"))


def test_download_stage_takes_file_or_url_from_its_spec(imagenet_like, server, tmp_path):
    """`pretrained_weights` (WeightsSpec) reaches fetch_weights as it is: a file, else a URL."""
    local = download_weights(WeightsSpec(url=None, file=str(imagenet_like)), tmp_path / "a" / "w.pth")
    assert local.read_bytes() == imagenet_like.read_bytes()
    folder, base = server
    name = f"resnet18-{sha256_prefix(imagenet_like)}.pth"
    (folder / name).write_bytes(imagenet_like.read_bytes())
    fetched = download_weights(WeightsSpec(url=f"{base}/{name}", file=None), tmp_path / "b" / "w.pth")
    assert fetched.read_bytes() == imagenet_like.read_bytes()
    (folder / "resnet18-00000000.pth").write_bytes(imagenet_like.read_bytes())  # hash prefix does not match
    bad = WeightsSpec(url=f"{base}/resnet18-00000000.pth", file=None)
    with pytest.raises(UserError, match="pretrained_weights.url"):
        download_weights(bad, tmp_path / "c" / "w.pth")
    assert not (tmp_path / "c" / "w.pth").exists()
