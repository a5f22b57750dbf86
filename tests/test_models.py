"""The two ResNet-18 readings: CIFAR variant shapes, torchvision's with a resize, pretrained weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import same_bits, training_spec
from torchvision.models import resnet18, resnet34

from cifar_ensembles.errors import UserError
from cifar_ensembles.models import Resized, ResNet18Cifar, build_model, load_pretrained


def model_spec(**overrides):
    """config.yaml's model section with `overrides`."""
    return training_spec(model=overrides).model


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny forward passes: more threads only contend with other work on a small machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def imagenet_file(tmp_path_factory):
    """A torchvision resnet18 state dict (random, 1000 classes) saved like the real weights file."""
    torch.manual_seed(7)
    state = resnet18().state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet18-imagenet.pth"
    torch.save(state, path)
    return path, state


# ------------------------------------------------------------------------ ResNet18Cifar
@pytest.mark.parametrize("width", [4, 8, 16])
@pytest.mark.parametrize("size,channels", [(32, 3), (28, 1)])
def test_resnet18_cifar_output_shape(size, channels, width):
    torch.manual_seed(0)
    model = build_model(model_spec(name="resnet18_cifar", width=width), 10, channels)
    assert isinstance(model, ResNet18Cifar)
    assert model.stem[0].in_channels == channels and model.stem[0].out_channels == width
    assert model.fc.in_features == 8 * width
    out = model.eval()(torch.randn(2, channels, size, size))
    assert out.shape == (2, 10) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_resnet18_cifar_has_eighteen_weighted_layers_and_config_width():
    model = build_model(model_spec(name="resnet18_cifar"), 7, 3)  # config.yaml: width 64
    assert model.stem[0].out_channels == 64
    convs = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and "shortcut" not in n]
    assert len(convs) + 1 == 18  # 17 convolutions and the classifier
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_unknown_model_name_is_a_user_error():
    with pytest.raises(UserError, match="model.name"):
        model_spec(name="vgg16")
    with pytest.raises(UserError, match="model.name"):  # a spec made without the config check
        build_model(dataclasses.replace(model_spec(), name="vgg16"), 10, 3)


def test_resnet18_cifar_has_no_defaults():
    """Its width lives in config.yaml only."""
    with pytest.raises(TypeError):
        ResNet18Cifar(10, 3)


# ---------------------------------------------------------------- torchvision resnet18
@pytest.mark.parametrize("channels", [3, 1])
def test_resnet18_with_input_size_is_resized(channels):
    torch.manual_seed(0)
    model = build_model(model_spec(name="resnet18", input_size=64), 10, channels)
    assert isinstance(model, Resized) and model.size == 64
    assert model.net.conv1.in_channels == channels
    seen = []
    model.net.conv1.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape)))
    out = model.eval()(torch.randn(2, channels, 32, 32))
    assert out.shape == (2, 10)
    assert seen == [(2, channels, 64, 64)]


def test_resnet18_without_input_size_is_not_wrapped():
    model = build_model(model_spec(name="resnet18", input_size=None), 5, 3)
    assert not isinstance(model, Resized)
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_load_pretrained_keeps_a_fresh_head(imagenet_file):
    path, state = imagenet_file
    torch.manual_seed(1)
    model = build_model(model_spec(name="resnet18", input_size=64), 10, 3)
    head = {k: v.clone() for k, v in model.net.fc.state_dict().items()}
    load_pretrained(model, path)
    own = model.net.state_dict()
    body = [k for k in state if not k.startswith("fc.")]
    assert body and all(same_bits(own[k], state[k]) for k in body)
    assert own["fc.weight"].shape == (10, 512)
    assert same_bits(own["fc.weight"], head["weight"]) and same_bits(own["fc.bias"], head["bias"])


def test_load_pretrained_grayscale_sums_conv1_over_channels(imagenet_file):
    path, state = imagenet_file
    model = build_model(model_spec(name="resnet18", input_size=None), 10, 1)
    load_pretrained(model, path)
    own = model.state_dict()
    assert own["conv1.weight"].shape == (64, 1, 7, 7)
    assert torch.allclose(own["conv1.weight"], state["conv1.weight"].sum(dim=1, keepdim=True))
    assert all(same_bits(own[k], state[k]) for k in state if not k.startswith(("fc.", "conv1.")))
    assert model.eval()(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_load_pretrained_rejects_resnet34_weights(tmp_path):
    path = tmp_path / "resnet34.pth"
    torch.save(resnet34().state_dict(), path)
    model = build_model(model_spec(name="resnet18", input_size=None), 10, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match="pretrained_weights.file") as info:
        load_pretrained(model, path)
    assert str(path) in str(info.value)
    assert all(same_bits(v, before[k]) for k, v in model.state_dict().items()), "weights were changed"


def test_load_pretrained_rejects_cifar_resnet_weights(tmp_path):
    path = tmp_path / "cifar.pth"
    torch.save(ResNet18Cifar(10, 3, 8).state_dict(), path)
    with pytest.raises(UserError, match="pretrained_weights.file"):
        load_pretrained(build_model(model_spec(name="resnet18", input_size=64), 10, 3), path)


@pytest.mark.parametrize("content", [b"not a torch file", None], ids=["garbage", "missing"])
def test_load_pretrained_unreadable_file(tmp_path, content):
    path = tmp_path / "weights.pth"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match="pretrained_weights.file"):
        load_pretrained(build_model(model_spec(name="resnet18", input_size=None), 10, 3), path)


def test_load_pretrained_rejects_a_non_dict(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save([torch.zeros(3)], path)
    with pytest.raises(UserError, match="pretrained_weights.file"):
        load_pretrained(build_model(model_spec(name="resnet18", input_size=None), 10, 3), path)
