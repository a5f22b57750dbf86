"""The two readings of "ResNet-18" in the study.

`resnet18_cifar`: the usual CIFAR variant (3x3 stem, stride 1, no max-pool) trained from
scratch at 32x32, with a `width` multiplier (64 is the standard network; 16 trains fast on
a CPU). `resnet18`: torchvision's ImageNet architecture, optionally with ImageNet weights
loaded from a local file, and an optional input resize (e.g. to 224, the fine-tuning
reading of the report).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from .config.spec import ModelSpec
from .errors import UserError

MODEL_NAMES = ("resnet18_cifar", "resnet18")


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18Cifar(nn.Module):
    """ResNet-18 for small images: stages of width w, 2w, 4w, 8w with two blocks each."""

    def __init__(self, num_classes: int, in_channels: int, width: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        stages, in_planes = [], width
        for i, planes in enumerate((width, 2 * width, 4 * width, 8 * width)):
            stride = 1 if i == 0 else 2
            stages += [BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)]
            in_planes = planes
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Resized(nn.Module):
    """Bilinear resize in front of a network (inputs stay 32x32 on disk and in the loader)."""

    def __init__(self, net: nn.Module, size: int):
        super().__init__()
        self.net, self.size = net, size

    def forward(self, x):
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear",
                              align_corners=False, antialias=False)
        return self.net(x)


def build_model(spec: ModelSpec, num_classes: int, in_channels: int) -> nn.Module:
    """Build the network a `model:` spec names (weights are random here)."""
    if spec.name == "resnet18_cifar":
        return ResNet18Cifar(num_classes, in_channels, spec.width)
    if spec.name == "resnet18":
        from torchvision.models import resnet18

        net = resnet18(weights=None, num_classes=num_classes)
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        return Resized(net, spec.input_size) if spec.input_size else net
    raise UserError(f"model.name: unknown model {spec.name!r}; choose one of {', '.join(MODEL_NAMES)}")


def load_pretrained(model: nn.Module, weights_file: str | os.PathLike) -> None:
    """Load ImageNet weights into a `resnet18`; the classifier head stays freshly initialised.

    A grayscale input keeps the pretrained first layer by summing it over colour channels.
    """
    net = model.net if isinstance(model, Resized) else model
    from .files.records import error_line, load_weights_only

    try:
        state = load_weights_only(weights_file)
    except Exception as err:  # torch's messages can span lines (weights_only): one line
        raise UserError(f"pretrained_weights.file: {weights_file}: cannot load as torch weights "
                        f"({error_line(err)})") from None
    if not isinstance(state, dict):
        raise UserError(f"pretrained_weights.file: {weights_file}: not a state dict")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    conv1 = state.get("conv1.weight")
    if conv1 is not None and conv1.shape[1] != net.conv1.weight.shape[1]:
        state["conv1.weight"] = conv1.sum(dim=1, keepdim=True)
    own = net.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state and not k.startswith("fc.")]
    unexpected = [k for k in state if k not in own]
    if mismatched or missing or unexpected:
        first = (mismatched or missing or unexpected)[0]
        raise UserError(f"pretrained_weights.file: {weights_file}: weights for another architecture "
                        f"(first bad key: {first})")
    net.load_state_dict(state, strict=False)
