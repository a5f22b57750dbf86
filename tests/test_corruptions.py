"""The corruptions of the shift stage (config.yaml `shift.corruptions`) against their definitions.

Each check runs the configured parameters through `corruptions.corrupt` exactly as the stage
does, on a few small images: flat mid-gray ones where a statistic is the definition (noise
levels, salt-and-pepper counts), or a smooth natural-like image (gradients with a disc and a
bar) where the result is compared with the operation computed directly with OpenCV/NumPy, or
where the image must change more as the severity grows. RGB is 32 x 32 x 3 (CIFAR), grayscale
28 x 28 x 1 (Fashion-MNIST).
"""

from __future__ import annotations

import random

import cv2
import numpy as np
import pytest
from conftest import ROOT, load_config

from cifar_ensembles.config.convert import from_data
from cifar_ensembles.config.spec import ShiftSpec
from cifar_ensembles.errors import UserError
from cifar_ensembles.transforms import corruptions
from cifar_ensembles.transforms.corruptions import (
    NEEDS_RGB,
    SEVERITIES,
    TRANSFORMS,
    corrupt,
    corrupt_all,
    set_seed,
)

SHIFT = from_data(ShiftSpec, load_config()["shift"], "shift")
RGB, GRAY = (32, 32, 3), (28, 28, 1)
SHAPES = pytest.mark.parametrize("shape", [RGB, GRAY], ids=["rgb", "gray"])
# The 19 files of CIFAR-10-C (15 corruptions and 4 extra ones): `shift.source` reads <name>.npy.
CIFAR10C_FILES = {
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
    "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
    "jpeg_compression", "gaussian_blur", "saturate", "spatter", "speckle_noise",
}
# Transforms that draw random numbers (the others are deterministic functions of the image).
RANDOM = {"gaussian_noise", "shot_noise", "impulse_noise", "glass_blur", "motion_blur", "fog",
          "elastic_transform"}


def natural(shape, shift: int = 0) -> np.ndarray:
    """A smooth image with edges: per-channel gradients, a bright disc and a dark bar (uint8)."""
    h, w, c = shape
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([80 + 120 * xx, 60 + 100 * yy, 150 - 60 * xx * yy][:c], -1)
    img[(yy - 0.4) ** 2 + (xx - 0.5) ** 2 < 0.06] += 60
    img[int(0.6 * h):int(0.8 * h), int(0.15 * w):int(0.45 * w)] -= 50
    return np.roll(np.clip(img, 0, 255).astype(np.uint8), shift, axis=1)


def naturals(shape, n: int = 8) -> np.ndarray:
    return np.stack([natural(shape, k) for k in range(0, 2 * n, 2)])


def flat(shape, n: int = 4, value: int = 128) -> np.ndarray:
    return np.full((n, *shape), value, np.uint8)


def params(name: str, severity: int) -> dict:
    return SHIFT.corruptions[name].severities[severity - 1]


def where(name: str, severity: int) -> str:
    return f"shift.corruptions.{name}.severities[{severity - 1}]"


def run(name: str, severity: int, images: np.ndarray, seed: int = 0) -> np.ndarray:
    """The corruption at one severity, as the stage applies it (the set's own seed)."""
    c = SHIFT.corruptions[name]
    return corrupt(images, c.transform, params(name, severity), set_seed(seed, name, severity),
                   where(name, severity))


def value(name: str, severity: int, key: str) -> float:
    """A fixed parameter: the config writes a constant as the range [v, v]."""
    v = params(name, severity)[key]
    if isinstance(v, list):
        assert v[0] == v[1], f"{name} severity {severity}: {key} is a range, not one value"
        return v[0]
    return v


def mad(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference in gray levels."""
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def per_image(fn, images: np.ndarray) -> np.ndarray:
    """`fn` (an OpenCV operation on one H x W x C image) over a batch, channel axis kept."""
    return np.stack([np.asarray(fn(image)).reshape(image.shape) for image in images])


# ------------------------------------------------------------------ the configuration
def test_config_has_15_corruptions_with_5_severities_and_their_sources():
    assert len(SHIFT.corruptions) == 15
    for name, c in SHIFT.corruptions.items():
        assert name in CIFAR10C_FILES, f"{name}: not a CIFAR-10-C file name (shift.source reads <name>.npy)"
        assert c.transform in TRANSFORMS
        assert len(c.severities) == len(SEVERITIES) == 5
        assert c.reference.strip(), f"{name}: no reference for its parameters"


# ------------------------------------------------------------------ definitions: noise
@SHAPES
def test_gaussian_noise_std_is_std_range_times_255_per_channel(shape):
    """N(0, (std_range x 255)^2) added to each channel independently. albumentations adds the
    float noise to uint8 images by truncating it toward zero, which shrinks the std by about
    0.4 gray levels: the expected std is that of the truncated normal."""
    images = flat(shape, n=8)
    reference_rng = np.random.default_rng(0)
    for s in SEVERITIES:
        sigma = value("gaussian_noise", s, "std_range") * 255
        assert params("gaussian_noise", s)["per_channel"] is True
        expected = np.trunc(reference_rng.normal(0, sigma, 1_000_000)).std()
        noise = run("gaussian_noise", s, images).astype(np.float64) - 128
        assert abs(noise.mean()) < 0.05 * sigma
        for ch in range(shape[2]):
            std = noise[..., ch].std()
            assert abs(std / expected - 1) < 0.04, (s, ch, std, expected, sigma)
        if shape[2] == 3:  # independent per channel: uncorrelated
            r = np.corrcoef(noise.reshape(-1, 3).T)
            assert np.all(np.abs(r[~np.eye(3, dtype=bool)]) < 0.08), r


@SHAPES
def test_shot_noise_is_poisson_in_linear_light(shape):
    """Poisson(x_lin / scale) x scale on x_lin = x^2.2 (x in [0, 1]), back through ^(1/2.2): on a
    flat image of value v the std is (delta method) d(x^(1/2.2))/dx_lin x sqrt(v^2.2 x scale)."""
    images = flat(shape, n=8)
    v = 128 / 255
    lin = v**2.2
    stds = []
    for s in SEVERITIES:
        scale = value("shot_noise", s, "scale_range")
        predicted = (1 / 2.2) * lin ** (1 / 2.2 - 1) * np.sqrt(lin * scale) * 255
        out = run("shot_noise", s, images).astype(np.float64)
        stds.append(out.std())
        assert abs(out.std() / predicted - 1) < 0.06, (s, out.std(), predicted)
        assert abs(out.mean() - 128) < 2
    assert stds == sorted(stds)


@SHAPES
def test_impulse_noise_sets_amount_of_the_pixels_to_0_or_255_half_each(shape):
    h, w, c = shape
    images = flat(shape, n=4)
    for s in SEVERITIES:
        amount = value("impulse_noise", s, "amount")
        assert value("impulse_noise", s, "salt_vs_pepper") == 0.5
        out = run("impulse_noise", s, images)
        n = int(h * w * amount)  # whole pixels, every channel alike
        for image in out:
            salt = np.all(image == 255, axis=-1).sum()
            pepper = np.all(image == 0, axis=-1).sum()
            untouched = np.all(image == 128, axis=-1).sum()
            assert (salt, pepper, untouched) == (int(n * 0.5), n - int(n * 0.5), h * w - n), (s, salt, pepper)


# ------------------------------------------------------------------ definitions: photometric
@SHAPES
def test_contrast_blends_with_the_image_mean(shape):
    """(x - m) c + m, m the image's mean: albumentations' ColorJitter takes the mean of the
    luminance (cv2 RGB2GRAY) for RGB images, one value for all channels; make_cifar_c.py takes
    per-channel means, which differ from it on coloured images (the documented adaptation)."""
    images = naturals(shape)
    for s in SEVERITIES:
        c = value("contrast", s, "contrast")
        p = params("contrast", s)
        assert p["brightness"] == [1, 1] and p["saturation"] == [1, 1] and p["hue"] == [0, 0]
        gray = images[..., 0] if shape[2] == 1 else np.stack(
            [cv2.cvtColor(x, cv2.COLOR_RGB2GRAY) for x in images])
        m = gray.reshape(len(images), -1).mean(axis=1)[:, None, None, None]
        expected = np.clip((images - m) * c + m, 0, 255)
        out = run("contrast", s, images).astype(np.float64)
        assert np.abs(out - expected).max() <= 1.0, s
        assert out.std() < images.std()


@SHAPES
def test_brightness_adds_c_times_255(shape):
    """x + c x 255, clipped (albumentations adds the whole gray levels of c x 255)."""
    images = naturals(shape)
    for s in SEVERITIES:
        c = value("brightness", s, "brightness_limit")
        assert value("brightness", s, "contrast_limit") == 0
        out = run("brightness", s, images).astype(np.float64)
        assert np.abs(out - np.clip(images + c * 255, 0, 255)).max() <= 1.0, s
    assert (run("brightness", 5, images) == 255).any(), "the test image should reach the clipping"


# ------------------------------------------------------------------ definitions: OpenCV operations
@SHAPES
def test_pixelate_is_area_downscale_then_nearest_upscale(shape):
    h, w, _ = shape
    images = naturals(shape)
    for s in SEVERITIES:
        scale = value("pixelate", s, "scale_range")
        assert params("pixelate", s)["interpolation_pair"] == {"downscale": cv2.INTER_AREA,
                                                               "upscale": cv2.INTER_NEAREST}

        def direct(x, scale=scale):
            small = cv2.resize(x, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
            return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)

        assert np.array_equal(run("pixelate", s, images), per_image(direct, images)), s


@SHAPES
def test_jpeg_is_opencv_imencode_at_the_quality(shape):
    images = naturals(shape)
    mode = cv2.IMREAD_GRAYSCALE if shape[2] == 1 else cv2.IMREAD_UNCHANGED
    for s in SEVERITIES:
        q = value("jpeg_compression", s, "quality_range")

        def direct(x, q=q):
            ok, encoded = cv2.imencode(".jpg", x, [cv2.IMWRITE_JPEG_QUALITY, int(q)])
            assert ok
            return cv2.imdecode(encoded, mode)

        assert np.array_equal(run("jpeg_compression", s, images), per_image(direct, images)), s


@SHAPES
def test_gaussian_blur_is_opencv_gaussian_blur_with_the_sigma(shape):
    """cv2.GaussianBlur with that sigma; albumentations sizes the kernel as PIL does
    (int(3.5 sigma) x 2 + 1), OpenCV by itself (ksize 0): both within one gray level."""
    images = naturals(shape)
    growth = []
    for s in SEVERITIES:
        sigma = value("gaussian_blur", s, "sigma_limit")
        out = run("gaussian_blur", s, images).astype(np.int64)
        k = int(sigma * 3.5) * 2 + 1
        for ksize in ((k, k), (0, 0)):
            expected = per_image(lambda x, k=ksize, sigma=sigma: cv2.GaussianBlur(x, k, sigma), images)
            assert np.abs(out - expected).max() <= 1, (s, ksize)
        growth.append(mad(out, images))
    assert growth == sorted(growth) and growth[0] > 0


@SHAPES
def test_snow_bleach_multiplies_the_lightness_of_darker_pixels(shape):
    """albumentations' `bleach` snow is deterministic: in HLS, every pixel whose lightness is
    below snow_point x 255 / 2 + 255 / 3 (98 to 149 for snow_point 0.1-0.5) gets its lightness
    times brightness_coeff. It is a lightness threshold, not a share of the image's pixels."""
    images = naturals(shape)
    for s in SEVERITIES:
        p = params("snow", s)
        assert p["method"] == "bleach"
        threshold = value("snow", s, "snow_point_range") * 255 / 2 + 255 / 3

        def direct(x, threshold=threshold, coeff=p["brightness_coeff"]):
            rgb = cv2.cvtColor(x, cv2.COLOR_GRAY2RGB) if x.shape[-1] == 1 else x
            hls = cv2.cvtColor(rgb, cv2.COLOR_RGB2HLS)
            lightness = hls[..., 1].astype(np.float32)
            lightness[lightness < threshold] *= coeff
            hls[..., 1] = np.clip(lightness, 0, 255).astype(np.uint8)
            out = cv2.cvtColor(hls, cv2.COLOR_HLS2RGB)
            return cv2.cvtColor(out, cv2.COLOR_RGB2GRAY) if x.shape[-1] == 1 else out

        assert np.array_equal(run("snow", s, images), per_image(direct, images)), s


# ------------------------------------------------------------------ growing with severity
def changes(name: str, shape) -> list[float]:
    images = naturals(shape, n=16)
    return [mad(run(name, s, images), images) for s in SEVERITIES]


@SHAPES
@pytest.mark.parametrize("name", ["zoom_blur", "motion_blur", "snow"])
def test_change_grows_with_severity(name, shape):
    d = changes(name, shape)
    assert all(a < b for a, b in zip(d, d[1:])), d


@SHAPES
def test_defocus_grows_with_severity(shape):
    """Disk radius 1, 1, 1, 2, 2 with alias blur 0.4, 0.5, 0.6, 0.2, 0.1: severities 4 and 5 have
    the same whole-pixel radius, and an alias blur of 0.2 or 0.1 px on the 3 x 3 smoothing of
    the disk leaves it unchanged to within 1e-5, so their images do not differ (non-decreasing
    there, not increasing)."""
    d = changes("defocus_blur", shape)
    assert d[0] < d[1] < d[2] < d[3] <= d[4], d


@SHAPES
def test_glass_blur_grows_with_its_iterations(shape):
    """Two rounds of pixel swaps (severities 4, 5) change the image more than one (1-3); within
    one round the swaps dominate and sigma 0.05-0.4 barely matters, so 1-3 are not ordered."""
    d = changes("glass_blur", shape)
    assert min(d[3:]) > max(d[:3]), d


@SHAPES
def test_elastic_transform_grows_with_alpha_nearly(shape):
    """Alpha 10-50 px with sigma 4: the displacement grows with alpha, but past alpha 40 the
    displaced pixels increasingly come from the image's (reflected) border, so the mean change
    levels off: increasing for 1-4, severity 5 within 10% of 4."""
    d = changes("elastic_transform", shape)
    assert d[0] < d[1] < d[2] < d[3] and d[4] > 0.9 * d[3], d


@SHAPES
def test_fog_whitens_more_at_every_severity(shape):
    """Fog as make_cifar_c.py makes it: a plasma haze that brightens the image, more at every
    severity (its texture adds variation, so the pixel spread need not fall)."""
    images = naturals(shape, n=16)
    means = [run("fog", s, images).astype(np.float64).mean() for s in SEVERITIES]
    assert images.mean() < means[0] and all(a < b for a, b in zip(means, means[1:])), means
    d = changes("fog", shape)
    assert all(a < b for a, b in zip(d, d[1:])), d


@SHAPES
def test_pixelate_grows_in_block_size(shape):
    """The mean change of nearest-neighbour pixelation is not monotone (on 32 px a 30-px grid
    shifts parts of the image by a whole pixel, a 28-px one others), but the block size grows:
    on a ramp whose rows all differ, exactly H - round(H x scale) rows repeat the row above,
    more at every severity."""
    h, w, c = shape
    yy, xx = np.mgrid[0:h, 0:w]
    ramp = np.repeat((6 * yy + xx).astype(np.uint8)[None, ..., None], c, axis=-1)
    repeated = []
    for s in SEVERITIES:
        out = run("pixelate", s, ramp)[0]
        repeated.append(int(np.all(out[1:] == out[:-1], axis=(1, 2)).sum()))
        assert repeated[-1] == h - round(h * value("pixelate", s, "scale_range")), s
    assert all(a < b for a, b in zip(repeated, repeated[1:])), repeated


# ------------------------------------------------------------------ every corruption, both layouts
@SHAPES
@pytest.mark.parametrize("name", list(SHIFT.corruptions))
def test_every_corruption_runs_and_keeps_the_layout(name, shape):
    images = naturals(shape, n=3)
    out = corrupt_all(images, SHIFT.corruptions[name].transform, SHIFT.corruptions[name].severities, 0, name,
                      f"shift.corruptions.{name}")
    assert out.shape == (5, *images.shape) and out.dtype == np.uint8
    for s in SEVERITIES:
        assert not np.array_equal(out[s - 1], images), f"{name} severity {s} left the images unchanged"


@pytest.mark.parametrize("name", ["snow"])
def test_colour_transforms_see_grayscale_as_rgb_and_give_back_its_luminance(name):
    import albumentations as A

    c = SHIFT.corruptions[name]
    assert c.transform in NEEDS_RGB
    images = naturals(GRAY, n=3)
    for s in (1, 5):
        pipeline = A.Compose([corruptions.build_transform(c.transform, params(name, s), name)],
                             seed=set_seed(0, name, s))

        def through_rgb(x, pipeline=pipeline):
            y = pipeline(image=cv2.cvtColor(x, cv2.COLOR_GRAY2RGB))["image"]
            return cv2.cvtColor(y, cv2.COLOR_RGB2GRAY)

        expected = per_image(through_rgb, images)
        assert np.array_equal(run(name, s, images), expected)


# ------------------------------------------------------------------ determinism
@pytest.mark.parametrize("name", list(SHIFT.corruptions))
def test_same_seed_same_bytes_other_seed_other_bytes(name):
    images = naturals(RGB, n=2)
    first = run(name, 3, images, seed=0)
    random.seed(123)  # the global generators play no part
    np.random.seed(123)
    cv2.setRNGSeed(123)
    assert first.tobytes() == run(name, 3, images, seed=0).tobytes()
    if name in RANDOM:
        assert first.tobytes() != run(name, 3, images, seed=1).tobytes()
    else:  # a deterministic operation: the seed does not matter
        assert first.tobytes() == run(name, 3, images, seed=1).tobytes()


def test_set_seeds_differ_by_seed_corruption_and_severity():
    seeds = {set_seed(seed, name, s) for seed in (0, 1) for name in SHIFT.corruptions for s in SEVERITIES}
    assert len(seeds) == 2 * 15 * 5
    assert set_seed(0, "gaussian_noise", 1) == set_seed(0, "gaussian_noise", 1)


def test_severities_draw_different_noise():
    images = flat(RGB, n=2)
    c = SHIFT.corruptions["gaussian_noise"]
    same = dict(c.severities[0])
    out = corrupt_all(images, c.transform, [same] * 5, 0, "gaussian_noise", "gaussian_noise")
    assert len({x.tobytes() for x in out}) == 5  # the same parameters, another seed per severity


def test_a_set_does_not_depend_on_the_other_corruptions_or_severities():
    """Severity s of a corruption is the same bytes alone as among all sets: its seed comes from
    (shift.seed, its name, s) only. Another name for the same corruption draws other numbers."""
    images = naturals(RGB, n=2)
    c = SHIFT.corruptions["gaussian_noise"]
    alone = corrupt(images, c.transform, c.severities[2], set_seed(0, "gaussian_noise", 3), "x")
    for other in ("shot_noise", "fog", "snow"):  # other corruptions first
        o = SHIFT.corruptions[other]
        corrupt_all(images, o.transform, o.severities, 0, other, other)
    together = corrupt_all(images, c.transform, c.severities, 0, "gaussian_noise", "gaussian_noise")
    assert together[2].tobytes() == alone.tobytes()
    renamed = corrupt_all(images, c.transform, c.severities, 0, "noise", "noise")
    assert renamed[2].tobytes() != alone.tobytes()


# ------------------------------------------------------------------ bad parameters: one line each
def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


def test_unknown_transform_names_the_field():
    with pytest.raises(UserError) as err:
        corrupt(flat(RGB, 1), "Frost", {}, 0, "shift.corruptions.frost")
    assert one_line(err).startswith("shift.corruptions.frost.transform: 'Frost' is not one of")
    config = load_config()["shift"]
    config["corruptions"]["gaussian_noise"]["transform"] = "GaussianNoise"
    with pytest.raises(UserError) as err:
        from_data(ShiftSpec, config, "shift")
    assert one_line(err).startswith("shift.corruptions.gaussian_noise.transform:")


@pytest.mark.parametrize("transform, bad", [
    ("GaussNoise", {"std_range": [0.5, 0.1]}),  # a range upside down
    ("ImageCompression", {"quality_range": [0, 0]}),
    ("RandomFog", {"fog_coef_range": [2, 2]}),
    ("GlassBlur", {"sigma": 0.1, "max_delta": 0, "iterations": 1}),
    ("RandomSnow", {"snow_point_range": [0.1, 0.1], "method": "flakes"}),
])
def test_bad_parameter_values_name_the_field(transform, bad):
    with pytest.raises(UserError) as err:
        corrupt(flat(RGB, 1), transform, bad, 0, "shift.corruptions.x.severities[2]")
    message = one_line(err)
    assert message.startswith(f"shift.corruptions.x.severities[2]: {transform} does not accept"), message


@pytest.mark.parametrize("transform, bad", [
    ("GaussNoise", {"std_rang": [0.04, 0.04]}),  # a typo: albumentations would use its defaults
    ("GaussNoise", {"var_limit": [10, 20]}),  # albumentations 1.x's name
    ("MotionBlur", {"blur_limit": [2, 2]}),  # albumentations would silently use 3
])
def test_parameters_albumentations_would_ignore_or_change_are_refused(transform, bad):
    with pytest.raises(UserError) as err:
        corrupt(flat(RGB, 1), transform, bad, 0, "shift.corruptions.x.severities[0]")
    message = one_line(err)
    assert message.startswith(f"shift.corruptions.x.severities[0]: {transform} does not accept"), message


def test_parameters_that_fail_on_the_images_name_the_field():
    """Valid for albumentations, impossible on a 32 px image (a 0 px downscale)."""
    with pytest.raises(UserError) as err:
        corrupt(flat(RGB, 1), "Downscale", {"scale_range": [0.01, 0.01]}, 0,
                "shift.corruptions.pixelate.severities[4]")
    message = one_line(err)
    assert message.startswith("shift.corruptions.pixelate.severities[4]: Downscale"), message
    assert "32 x 32 x 3" in message


def test_wrong_number_of_severities_names_the_field():
    c = SHIFT.corruptions["contrast"]
    with pytest.raises(UserError) as err:
        corrupt_all(flat(RGB, 1), c.transform, c.severities[:4], 0, "contrast", "shift.corruptions.contrast")
    assert one_line(err) == "shift.corruptions.contrast.severities: 4 parameter sets, expected 5"


def test_config_transforms_are_the_schema_list():
    """The transforms corruptions.py accepts are the schema's (one list, two places)."""
    import yaml

    schema = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    corruption = schema["$defs"]["CorruptionSpec"]
    assert corruption["properties"]["transform"]["enum"] == list(TRANSFORMS)
