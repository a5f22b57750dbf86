"""The batched input path (`augment.mode: batched`), tested on CPU tensors: shapes, exact
normalization, exact crop/flip/cutout given its random numbers, determinism and resuming,
and the same distributions as the per-image pipelines (albumentations, torchvision).

Offsets are read back exactly from a coordinate-encoding image: channel 0 holds row + 1,
channel 1 column + 1, channel 2 is 255, so padding reads (0, 0, 0), a cutout hole reads
0 in channel 2 over image pixels, and every other output pixel names its source pixel.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import training_spec
from scipy import stats

import cifar_ensembles  # noqa: F401  (sets NO_ALBUMENTATIONS_UPDATE)
from cifar_ensembles.errors import UserError
from cifar_ensembles.transforms.augment import EpochBatches, build_train_transform
from cifar_ensembles.transforms.batched_augment import BatchedAugment, DeviceBatches, epoch_generator

SIZE = 32
ZERO, ONE = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]  # normalization that keeps x / 255
SAMPLES = 3000
P_MIN = 1e-3  # chi-square tests (deterministic seeds: a pass is a pass)


def coord_image(size: int = SIZE) -> np.ndarray:
    r, c = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    return np.stack([r + 1, c + 1, np.full_like(r, 255)], axis=-1).astype(np.uint8)


def to_pixels(x: torch.Tensor) -> np.ndarray:
    """Normalized (mean 0, std 1) float output -> uint8 pixels."""
    return np.rint(x.numpy() * 255.0).astype(np.uint8)


def augment_spec(overrides: dict):
    """config.yaml's augment section with `overrides`, for the batched path."""
    return training_spec(augment={"mode": "batched", **overrides}).augment


def batched(overrides: dict, size: int, mean, std, channels_last: bool = False) -> BatchedAugment:
    """BatchedAugment on the CPU (the training device of these tests)."""
    return BatchedAugment(augment_spec(overrides), size, mean, std, "cpu", channels_last)


def per_image_samples(spec: dict, n: int = SAMPLES, image=None) -> np.ndarray:
    img = coord_image() if image is None else image
    t = build_train_transform(augment_spec(spec), img.shape[0], ZERO[:img.shape[-1]], ONE[:img.shape[-1]])
    return np.stack([to_pixels(t(img, 1000 + s)) for s in range(n)])


def batched_samples(spec: dict, n: int = SAMPLES, image=None, seed: int = 0) -> np.ndarray:
    img = coord_image() if image is None else image
    aug = batched(spec, img.shape[0], ZERO[:img.shape[-1]], ONE[:img.shape[-1]])
    params = aug.draw(n, epoch_generator(seed, 0))
    out = aug.apply(torch.from_numpy(img[None]), torch.zeros(n, dtype=torch.long), params)
    return to_pixels(out)


def decode(p: np.ndarray):
    """(shift_y, shift_x, flipped, hole mask) of one coordinate-image output (3, H, W).

    shift = source index - output index for rows; for columns, of the unflipped crop.
    """
    valid = p[2] == 255
    i, j = np.nonzero(valid)
    r, c = p[0][valid].astype(int) - 1, p[1][valid].astype(int) - 1
    shift_y = r - i
    assert (shift_y == shift_y[0]).all(), "rows must be a pure shift"
    straight, mirrored = c - j, c + j
    flipped = not (straight == straight[0]).all()
    if flipped:
        assert (mirrored == mirrored[0]).all(), "columns must be a shift or a mirrored shift"
        shift_x = mirrored[0] - (SIZE - 1)  # c = ox - pad + (W - 1 - j)
    else:
        shift_x = straight[0]
    rows, cols = np.arange(SIZE)[:, None], np.arange(SIZE)[None, :]
    src_r = rows + shift_y[0]
    src_c = (SIZE - 1 - cols if flipped else cols) + shift_x
    inside = (src_r >= 0) & (src_r < SIZE) & (src_c >= 0) & (src_c < SIZE)
    padded = ~inside
    assert (p[:, padded] == 0).all(), "padding must be zeros"
    hole = inside & ~valid
    return int(shift_y[0]), int(shift_x), flipped, hole


def decoded(samples: np.ndarray):
    out = [decode(p) for p in samples]
    sy = np.array([o[0] for o in out])
    sx = np.array([o[1] for o in out])
    fl = np.array([o[2] for o in out])
    holes = np.stack([o[3] for o in out])
    return sy, sx, fl, holes


def counts(values: np.ndarray, support) -> np.ndarray:
    assert set(np.unique(values)) <= set(support), f"values outside {support}: {np.unique(values)}"
    return np.array([(values == v).sum() for v in support])


def same_distribution(a: np.ndarray, b: np.ndarray, support) -> float:
    """p-value of a chi-square test that two samples come from one distribution."""
    table = np.stack([counts(a, support), counts(b, support)])
    table = table[:, table.sum(0) > 0]
    if table.shape[1] < 2:
        return 1.0
    return stats.chi2_contingency(table).pvalue


def uniform_pvalue(values: np.ndarray, support) -> float:
    return stats.chisquare(counts(values, support)).pvalue


# ------------------------------------------------------------------ shapes and dtypes
@pytest.mark.parametrize("name", ["albumentations", "torchvision", "none"])
@pytest.mark.parametrize("channels,size", [(3, 32), (1, 28)])
def test_shapes_dtypes_and_memory_format(name, channels, size):
    rng = np.random.default_rng(0)
    imgs = torch.from_numpy(rng.integers(0, 256, (10, size, size, channels), dtype=np.uint8))
    mean, std = [0.4] * channels, [0.2] * channels
    index = torch.tensor([3, 1, 4, 1, 5, 9])
    aug = batched({"name": name}, size, mean, std)
    params = aug.draw(6, epoch_generator(0, 0))
    assert params.dtype == torch.int32 and params.shape == (6, aug.columns)
    out = aug.apply(imgs, index, params)
    assert out.dtype == torch.float32 and out.shape == (6, channels, size, size)
    assert out.is_contiguous() and torch.isfinite(out).all()
    cl = batched({"name": name}, size, mean, std, channels_last=True).apply(imgs, index, params)
    assert cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(cl, out)


def test_config_defaults_mean_what_they_mean_to_the_per_image_pipelines():
    """config.yaml's augment section means the same to both paths (pad 4, flip, one 8x8 hole)."""
    alb = batched({"name": "albumentations"}, SIZE, ZERO, ONE)
    assert (alb.pad, alb.reflect, alb.flip, alb.holes, alb.hole, alb.cutout_p, alb.fill) == (
        4, False, True, 1, 8, 1.0, 0)
    tv = batched({"name": "torchvision"}, SIZE, ZERO, ONE)
    assert (tv.pad, tv.flip, tv.holes) == (4, True, 0)  # cutout belongs to the albumentations recipe
    none = batched({"name": "none", "pad": 4}, SIZE, ZERO, ONE)
    assert (none.pad, none.flip, none.holes) == (0, False, 0)
    _, _, _, holes = decoded(batched_samples({"name": "albumentations"}, 200))
    assert holes.any(axis=(1, 2)).all()


def test_device_and_channels_last_are_required():
    with pytest.raises(TypeError):
        BatchedAugment(augment_spec({}), SIZE, ZERO, ONE)
    with pytest.raises(TypeError):
        BatchedAugment(augment_spec({}), SIZE, ZERO, ONE, "cpu")


def test_unknown_name_and_bad_reflect_pad_are_user_errors():
    with pytest.raises(UserError, match="augment.name"):  # the config check
        batched({"name": "randaugment"}, 32, ZERO, ONE)
    with pytest.raises(UserError, match="augment.pad"):
        batched({"name": "torchvision", "pad": 32, "pad_mode": "reflect"}, 32, ZERO, ONE)


# ---------------------------------------------------------------------- normalization
@pytest.mark.parametrize("channels,size", [(3, 32), (1, 28)])
def test_normalization_is_bit_identical_to_the_per_image_pipelines(channels, size):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (8, size, size, channels), dtype=np.uint8)
    mean, std = rng.uniform(0.2, 0.6, channels), rng.uniform(0.1, 0.4, channels)
    mean, std = mean.astype(np.float32), std.astype(np.float32)
    none = build_train_transform(augment_spec({"name": "none"}), size, mean, std)
    reference = torch.stack([none(im, 0) for im in imgs])
    index = torch.arange(8)
    for spec in ({"name": "none"},
                 {"name": "torchvision", "pad": 0, "flip": False},
                 {"name": "albumentations", "pad": 0, "flip": False, "cutout": {"holes": 0}}):
        aug = batched(spec, size, mean, std)
        out = aug.apply(torch.from_numpy(imgs), index, aug.draw(8, epoch_generator(0, 0)))
        assert torch.equal(out, reference), spec
    # and the per-image pipelines without random steps agree (up to their own float rounding)
    alb = build_train_transform(augment_spec({"name": "albumentations", "pad": 0, "flip": False,
                                              "cutout": {"holes": 0}}), size, mean, std)
    torch.testing.assert_close(torch.stack([alb(im, 0) for im in imgs]), reference, rtol=1e-5, atol=1e-5)


# --------------------------------------------------- exact given the random numbers
def reference_augment(img: np.ndarray, row: np.ndarray, aug: BatchedAugment) -> np.ndarray:
    """numpy: pad, crop at (oy, ox), flip, cut holes, from one row of the parameter table."""
    pad, s = aug.pad, aug.size
    mode = "reflect" if aug.reflect else "constant"  # numpy's reflect is reflect-101
    padded = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode=mode) if pad else img
    out = padded[row[0]:row[0] + s, row[1]:row[1] + s].copy()
    if row[2]:
        out = out[:, ::-1].copy()
    if aug.holes and row[3]:
        for k in range(aug.holes):
            hy, hx = row[4 + 2 * k], row[5 + 2 * k]
            out[hy:hy + aug.hole, hx:hx + aug.hole] = aug.fill
    return out


@pytest.mark.parametrize("spec", [
    {"name": "torchvision"},
    {"name": "torchvision", "pad_mode": "reflect"},
    {"name": "albumentations"},
    {"name": "albumentations", "pad_mode": "reflect",
     "cutout": {"holes": 3, "size": 5, "p": 0.5, "fill": 77}},
    {"name": "albumentations", "pad": 2, "flip": False, "cutout": {"holes": 1, "size": 40}},
])
def test_crop_flip_cutout_match_a_numpy_reference(spec):
    rng = np.random.default_rng(2)
    imgs = rng.integers(1, 256, (5, SIZE, SIZE, 3), dtype=np.uint8)
    aug = batched(spec, SIZE, ZERO, ONE)
    n = 64
    index = torch.from_numpy(rng.integers(0, 5, n))
    params = aug.draw(n, epoch_generator(3, 1))
    got = aug.crop_flip_cutout(torch.from_numpy(imgs), index, params).numpy()
    for k in range(n):
        want = reference_augment(imgs[int(index[k])], params[k].numpy(), aug)
        np.testing.assert_array_equal(got[k], want, err_msg=f"sample {k}")


def test_cutout_fill_is_cast_to_uint8_like_albumentations():
    aug = batched({"name": "albumentations", "cutout": {"fill": 127.9}}, SIZE, ZERO, ONE)
    assert aug.fill == int(np.array(127.9, dtype=np.uint8)) == 127


# ------------------------------------------------------------ determinism and resume
def device_batches(spec=None, n=40, batch=6, seed=0):
    rng = np.random.default_rng(4)
    imgs = rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
    labels = np.arange(n)  # a label names its image: the batch order can be read back
    aug = batched(spec or {"name": "albumentations"}, 16, [0.5] * 3, [0.25] * 3)
    return DeviceBatches(imgs, labels, aug, batch, seed, "cpu")


def collect(db, epoch, start=0):
    db.epoch, db.start_batch = epoch, start
    return [(x.clone(), y.clone()) for x, y in db]


def test_same_seed_and_epoch_give_the_same_batches():
    a, b = collect(device_batches(), 2), collect(device_batches(), 2)
    assert len(a) == 40 // 6
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    other_epoch, other_seed = collect(device_batches(), 3), collect(device_batches(seed=1), 2)
    assert not torch.equal(a[0][0], other_epoch[0][0])
    assert not torch.equal(a[0][0], other_seed[0][0])


def test_global_rng_is_left_alone():
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    collect(device_batches(), 0)
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("start", [0, 1, 3, 5, 6])
def test_resuming_at_a_batch_replays_exactly(start):
    full = collect(device_batches(), 4)
    db = device_batches()
    db.epoch, db.start_batch = 4, start
    assert len(db) == len(full) - start
    resumed = collect(device_batches(), 4, start)
    assert len(resumed) == len(full) - start
    for (xa, ya), (xb, yb) in zip(resumed, full[start:]):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_batch_order_is_the_per_image_samplers():
    db = device_batches()
    for epoch in (0, 1):
        got = [y.tolist() for _, y in collect(db, epoch)]
        want = [[i for i, _ in b] for b in EpochBatches(40, 6, 0, epoch, drop_last=True)]
        assert got == want


# ------------------------------------------- same distributions as the per-image pipelines
@pytest.fixture(scope="module")
def torchvision_pair():
    spec = {"name": "torchvision", "pad": 4, "flip": True}
    return decoded(per_image_samples(spec)), decoded(batched_samples(spec))


@pytest.fixture(scope="module")
def albumentations_pair():
    spec = {"name": "albumentations", "pad": 4, "flip": True, "cutout": {"holes": 1, "size": 8, "p": 1.0}}
    return decoded(per_image_samples(spec)), decoded(batched_samples(spec))


SHIFTS = range(-4, 5)


@pytest.mark.parametrize("pair", ["torchvision_pair", "albumentations_pair"])
def test_crop_offsets_and_flip_rate_match(pair, request):
    (py, px, pf, _), (by, bx, bf, _) = request.getfixturevalue(pair)
    for per_image, batch in ((py, by), (px, bx)):
        assert same_distribution(per_image, batch, SHIFTS) > P_MIN
        # both uniform over the 2 * pad + 1 offsets 0..8 (shifts -4..4), every offset seen
        assert uniform_pvalue(per_image, SHIFTS) > P_MIN and uniform_pvalue(batch, SHIFTS) > P_MIN
    assert abs(pf.mean() - 0.5) < 0.03 and abs(bf.mean() - 0.5) < 0.03
    assert same_distribution(pf.astype(int), bf.astype(int), [0, 1]) > P_MIN
    # offsets and flip are drawn independently
    assert stats.chi2_contingency(np.stack([counts(by[bf], SHIFTS), counts(by[~bf], SHIFTS)])).pvalue > P_MIN


def test_visible_cutout_area_matches_with_padding(albumentations_pair):
    """The hole is drawn on the cropped image; where it covers padding it is not visible."""
    (_, _, _, ph), (_, _, _, bh) = albumentations_pair
    pa, ba = ph.sum((1, 2)), bh.sum((1, 2))
    assert pa.max() == ba.max() == 64 and pa.min() > 0 and ba.min() > 0
    assert abs(pa.mean() - ba.mean()) < 1.0
    bins = [0, 40, 56, 63, 64]
    assert same_distribution(np.digitize(pa, bins), np.digitize(ba, bins), range(1, 6)) > P_MIN


def hole_corners(samples: np.ndarray):
    """Top-left corners and areas of the holes when there is no padding and no flip."""
    holes = samples[:, 2] == 0
    area = holes.sum((1, 2))
    ys = np.array([np.nonzero(h)[0].min() if h.any() else -1 for h in holes])
    xs = np.array([np.nonzero(h)[1].min() if h.any() else -1 for h in holes])
    return ys, xs, area


def test_cutout_position_is_uniform_and_fully_inside_like_albumentations():
    spec = {"name": "albumentations", "pad": 0, "flip": False, "cutout": {"holes": 1, "size": 8, "p": 1.0}}
    py, px, pa = hole_corners(per_image_samples(spec))
    by, bx, ba = hole_corners(batched_samples(spec))
    assert (pa == 64).all() and (ba == 64).all(), "one 8x8 hole, always entirely inside the image"
    corners = range(0, SIZE - 8 + 1)  # 0..24 inclusive
    for per_image, batch in ((py, by), (px, bx)):
        assert same_distribution(per_image, batch, corners) > P_MIN
        assert uniform_pvalue(per_image, corners) > P_MIN and uniform_pvalue(batch, corners) > P_MIN


def test_several_holes_and_cutout_probability_match():
    spec = {"name": "albumentations", "pad": 0, "flip": False,
            "cutout": {"holes": 2, "size": 6, "p": 0.5, "fill": 0}}
    _, _, pa = hole_corners(per_image_samples(spec))
    _, _, ba = hole_corners(batched_samples(spec))
    for area in (pa, ba):
        assert abs((area > 0).mean() - 0.5) < 0.04  # p = 0.5 for the whole transform
        assert set(np.unique(area)) <= {0} | set(range(36, 73))  # 1 or 2 overlapping 6x6 holes
    assert abs(pa[pa > 0].mean() - ba[ba > 0].mean()) < 1.0  # overlaps: same mean area
    bins = [1, 60, 72, 73]
    assert same_distribution(np.digitize(pa, bins), np.digitize(ba, bins), range(0, 4)) > P_MIN


def test_cutout_fill_value_matches_albumentations():
    spec = {"name": "albumentations", "pad": 0, "flip": False, "cutout": {"holes": 1, "size": 8, "fill": 100}}
    const = np.full((SIZE, SIZE, 3), 200, np.uint8)
    for samples in (per_image_samples(spec, 20, const), batched_samples(spec, 20, const)):
        assert set(np.unique(samples)) == {100, 200}
        assert ((samples == 100).sum((1, 2, 3)) == 3 * 64).all()


def test_reflect_padding_offsets_match_torchvision():
    """Reflect padding (reflect-101 in both): the offset distribution read back from the
    interior pixels, which always name their source."""
    spec = {"name": "torchvision", "pad": 4, "flip": False, "pad_mode": "reflect"}

    def shifts(samples):
        # the centre pixel is never padding: its source row/col minus its position
        return samples[:, 0, 16, 16].astype(int) - 1 - 16, samples[:, 1, 16, 16].astype(int) - 1 - 16

    (py, px), (by, bx) = shifts(per_image_samples(spec, 2000)), shifts(batched_samples(spec, 2000))
    for per_image, batch in ((py, by), (px, bx)):
        assert same_distribution(per_image, batch, SHIFTS) > P_MIN


def test_the_comparison_detects_a_wrong_offset_range():
    """Power check: a pipeline padding by 5 instead of 4 is told apart."""
    spec = {"name": "torchvision", "pad": 4, "flip": True}
    py, _, _, _ = decoded(per_image_samples(spec, 1500))
    wy, _, _, _ = decoded(batched_samples({**spec, "pad": 5}, 1500))
    assert same_distribution(py, wy, range(-5, 6)) < 1e-6
