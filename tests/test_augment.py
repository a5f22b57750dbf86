"""Per-image training transforms (albumentations, torchvision, none), the seeded sampler and dataset."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from conftest import training_spec

import cifar_ensembles  # noqa: F401  (sets NO_ALBUMENTATIONS_UPDATE; albumentations loads lazily)
from cifar_ensembles.errors import UserError
from cifar_ensembles.transforms.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EpochBatches,
    SeededImages,
    build_train_transform,
    normalization,
    sample_seed,
)

SHAPES = {3: 32, 1: 28}  # channels -> image size (CIFAR-like and MNIST-like)
MEAN = {3: (0.49, 0.48, 0.45), 1: (0.13,)}
STD = {3: (0.25, 0.24, 0.26), 1: (0.31,)}
RANDOM_PIPELINES = ["albumentations", "torchvision"]


def image(channels, seed=0):
    size = SHAPES[channels]
    return np.random.default_rng(seed).integers(0, 256, (size, size, channels), dtype=np.uint8)


def normalized_constant(v, channels):
    return (v / 255.0 - np.asarray(MEAN[channels])) / np.asarray(STD[channels])


def augment_spec(overrides: dict):
    """config.yaml's augment section with `overrides` (nested: cutout merges key by key)."""
    return training_spec(augment=overrides).augment


def build(overrides: dict, channels):
    """The per-image transform of config.yaml's augment section with `overrides`."""
    return build_train_transform(augment_spec(overrides), SHAPES[channels], MEAN[channels], STD[channels])


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("name", ["albumentations", "torchvision", "none"])
def test_output_is_float32_chw_of_same_size(name, channels):
    t = build({"name": name}, channels)
    out = t(image(channels), 123)
    size = SHAPES[channels]
    assert isinstance(out, torch.Tensor)
    assert out.dtype == torch.float32
    assert tuple(out.shape) == (channels, size, size)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("pad_mode", ["constant", "reflect"])
@pytest.mark.parametrize("name", RANDOM_PIPELINES)
def test_same_seed_same_output_different_seeds_differ(name, channels, pad_mode):
    t = build({"name": name, "pad_mode": pad_mode}, channels)
    img = image(channels)
    first = [t(img, s) for s in range(6)]
    again = [t(img, s) for s in reversed(range(6))][::-1]  # other call order, same seeds
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    # a second transform object built from the same spec gives the same outputs
    other = build({"name": name, "pad_mode": pad_mode}, channels)
    assert torch.equal(other(img, 3), first[3])
    distinct = {tuple(x.flatten().tolist()) for x in first}
    assert len(distinct) >= 4


def test_torchvision_leaves_global_rng_alone():
    t = build({"name": "torchvision"}, 3)
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    t(image(3), 7)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("channels", [3, 1])
def test_none_is_plain_normalization(channels):
    img = image(channels, seed=5)
    out = build({"name": "none"}, channels)(img, 0)
    expected = (img.astype(np.float64) / 255.0 - np.asarray(MEAN[channels])) / np.asarray(STD[channels])
    np.testing.assert_allclose(out.numpy(), expected.transpose(2, 0, 1), rtol=1e-5, atol=1e-5)
    # and the seed does not matter
    assert torch.equal(out, build({"name": "none"}, channels)(img, 99))


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("name", RANDOM_PIPELINES)
@pytest.mark.parametrize("flip", [False, True])
def test_constant_image_normalization_without_pad_or_cutout(name, channels, flip):
    v = 173
    size = SHAPES[channels]
    t = build({"name": name, "pad": 0, "flip": flip, "cutout": {"holes": 0}}, channels)
    out = t(np.full((size, size, channels), v, np.uint8), 11).numpy()
    expected = normalized_constant(v, channels)
    for ch in range(channels):
        np.testing.assert_allclose(out[ch], np.full((size, size), expected[ch]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels", [3, 1])
def test_pipelines_without_any_random_step_are_identity_plus_normalization(channels):
    """pad 0, no flip, no cutout: a random image comes out only normalized, for every pipeline."""
    img = image(channels, seed=8)
    reference = build({"name": "none"}, channels)(img, 0)
    for name in RANDOM_PIPELINES:
        t = build({"name": name, "pad": 0, "flip": False, "cutout": {"holes": 0}}, channels)
        torch.testing.assert_close(t(img, 5), reference, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("channels", [3, 1])
def test_albumentations_cutout_zeroes_one_square(channels):
    v, hole = 200, 8
    size = SHAPES[channels]
    spec = {"name": "albumentations", "pad": 0, "flip": False,
            "cutout": {"holes": 1, "size": hole, "p": 1.0, "fill": 0}}
    t = build(spec, channels)
    inside, outside = normalized_constant(0, channels), normalized_constant(v, channels)
    corners = set()
    for seed in range(8):
        out = t(np.full((size, size, channels), v, np.uint8), seed).numpy()
        masks = []
        for ch in range(channels):
            is_hole = np.isclose(out[ch], inside[ch], atol=1e-5)
            is_rest = np.isclose(out[ch], outside[ch], atol=1e-5)
            assert (is_hole | is_rest).all()
            masks.append(is_hole)
        mask = masks[0]
        assert all((m == mask).all() for m in masks)
        assert mask.sum() == hole * hole
        rows, cols = np.nonzero(mask)
        assert rows.max() - rows.min() + 1 == hole and cols.max() - cols.min() + 1 == hole
        corners.add((int(rows.min()), int(cols.min())))
    assert len(corners) > 1  # the hole moves with the seed


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("spec", [
    {"name": "albumentations"},
    {"name": "albumentations", "pad_mode": "reflect"},
    {"name": "albumentations", "pad": 0, "flip": False, "cutout": {"holes": 0}},
    {"name": "albumentations", "cutout": {"holes": 2, "size": 4, "p": 0.5, "fill": 0}},
])
def test_albumentations_emits_no_warnings(spec, channels):
    spec = augment_spec(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = build_train_transform(spec, SHAPES[channels], MEAN[channels], STD[channels])
        t(image(channels), 3)


def test_unknown_augmentation_raises_user_error():
    with pytest.raises(UserError, match="augment.name"):
        build({"name": "randaugment"}, 3)
    spec = dataclasses.replace(augment_spec({}), name="randaugment")  # made without the config check
    with pytest.raises(UserError, match="augment.name"):
        build_train_transform(spec, 32, MEAN[3], STD[3])


def test_normalization_choices():
    assert augment_spec({}).normalize == "dataset"  # config.yaml: the training split's own stats
    mean, std = normalization("dataset", [0.1, 0.2, 0.3], [0.4, 0.5, 0.6], 3)
    np.testing.assert_allclose(mean, [0.1, 0.2, 0.3], rtol=1e-6)
    np.testing.assert_allclose(std, [0.4, 0.5, 0.6], rtol=1e-6)
    mean, std = normalization("imagenet", [0.0] * 3, [1.0] * 3, 3)
    np.testing.assert_allclose(mean, IMAGENET_MEAN, rtol=1e-6)
    np.testing.assert_allclose(std, IMAGENET_STD, rtol=1e-6)
    mean, std = normalization("imagenet", [0.0], [1.0], 1)
    assert mean.shape == std.shape == (1,)
    assert mean[0] == pytest.approx(sum(IMAGENET_MEAN) / 3, rel=1e-6)
    assert std[0] == pytest.approx(sum(IMAGENET_STD) / 3, rel=1e-6)
    with pytest.raises(UserError, match="augment.normalize"):
        normalization("minmax", [0.0], [1.0], 1)
    with pytest.raises(UserError, match="augment.normalize"):
        augment_spec({"normalize": "minmax"})


# ----------------------------------------------------------------------------- sampler, dataset


def batches(**kwargs):
    return list(EpochBatches(**kwargs))


def indices(bs):
    return [i for b in bs for i, _ in b]


def test_epoch_batches_drop_last_and_len():
    full = batches(n=10, batch_size=3, seed=1, epoch=0, drop_last=True)
    assert len(EpochBatches(10, 3, 1, 0, drop_last=True)) == 3 == len(full)
    assert [len(b) for b in full] == [3, 3, 3]
    kept = batches(n=10, batch_size=3, seed=1, epoch=0, drop_last=False)
    assert len(EpochBatches(10, 3, 1, 0, drop_last=False)) == 4 == len(kept)
    assert [len(b) for b in kept] == [3, 3, 3, 1]
    assert sorted(indices(kept)) == list(range(10))  # a permutation: every index once
    assert kept[:3] == full  # dropping the last batch does not change the order
    exact = batches(n=9, batch_size=3, seed=1, epoch=0, drop_last=False)
    assert len(exact) == len(EpochBatches(9, 3, 1, 0, drop_last=False)) == 3


def test_epoch_batches_order_fixed_by_seed_and_epoch():
    a = indices(batches(n=50, batch_size=5, seed=3, epoch=2, drop_last=False))
    b = indices(batches(n=50, batch_size=5, seed=3, epoch=2, drop_last=False))
    assert a == b
    assert a != list(range(50))
    assert indices(batches(n=50, batch_size=5, seed=3, epoch=3, drop_last=False)) != a
    assert indices(batches(n=50, batch_size=5, seed=4, epoch=2, drop_last=False)) != a
    # the order does not depend on the batch size
    assert indices(batches(n=50, batch_size=7, seed=3, epoch=2, drop_last=False)) == a


def test_epoch_batches_sample_seeds():
    bs = batches(n=20, batch_size=4, seed=5, epoch=1, drop_last=False)
    pairs = [p for b in bs for p in b]
    assert all(isinstance(i, int) and isinstance(s, int) for i, s in pairs)
    assert all(s == sample_seed(5, 1, i) for i, s in pairs)
    assert len({s for _, s in pairs}) == 20
    assert all(0 <= s < 2 ** 32 for _, s in pairs)
    # seeds belong to (seed, epoch, index), not to positions
    assert sample_seed(5, 1, 0) != sample_seed(5, 2, 0) != sample_seed(6, 1, 0)


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("start", [0, 1, 2, 3, 4, 6])
def test_epoch_batches_start_batch_skips_exactly(drop_last, start):
    full = batches(n=11, batch_size=3, seed=7, epoch=4, drop_last=drop_last)
    resumed = EpochBatches(11, 3, 7, 4, drop_last=drop_last, start_batch=start)
    assert len(resumed) == max(len(full) - start, 0)
    assert list(resumed) == full[start:]


def test_seeded_images_returns_transformed_tensor_and_int_label():
    imgs = np.stack([image(3, seed=s) for s in range(6)])
    labels = np.array([3, 1, 4, 1, 5, 9], dtype=np.int64)
    t = build({"name": "torchvision"}, 3)
    ds = SeededImages(imgs, labels, t)
    assert len(ds) == 6
    x, y = ds[(2, 77)]
    assert type(y) is int and y == 4
    assert torch.equal(x, t(imgs[2], 77))
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32

    loader = torch.utils.data.DataLoader(ds, batch_sampler=EpochBatches(6, 4, 0, 0, drop_last=False))
    got = list(loader)
    assert [tuple(xb.shape) for xb, _ in got] == [(4, 3, 32, 32), (2, 3, 32, 32)]
    order = indices(batches(n=6, batch_size=4, seed=0, epoch=0, drop_last=False))
    assert torch.cat([yb for _, yb in got]).tolist() == labels[order].tolist()
