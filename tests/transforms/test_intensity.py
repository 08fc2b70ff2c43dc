"""Table-driven tests of the intensity transforms over numpy, torch and MetaTensor inputs."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage

from transforms.intensity import (
    DECILE_PERCENTILES,
    NYUL_PERCENTILES,
    NYUL_TAIL_PERCENTILES,
    HUWindow,
    HUWindowd,
    NyulStandardize,
    NyulStandardized,
    PercentileClip,
    PercentileClipd,
    ZScore,
    ZScored,
    image_landmarks,
    piecewise_linear,
    rescale_landmarks,
    tail_indices,
)
from transforms.masks import foreground_mask, otsu_threshold


def phantom(seed: int = 0) -> np.ndarray:
    """A bright ball (two tissues) in a dark noisy background, channel-first."""
    rng = np.random.default_rng(seed)
    grid = np.indices((24, 24, 24)) - 11.5
    radius = np.sqrt((grid**2).sum(axis=0))
    image = np.where(radius < 10, 100.0, 5.0) + np.where(radius < 5, 60.0, 0.0)
    return (image + rng.normal(0, 2.0, image.shape)).astype(np.float32)[None]


INPUT_TYPES = [
    pytest.param(lambda a: a, id="numpy"),
    pytest.param(torch.as_tensor, id="torch"),
    pytest.param(lambda a: MetaTensor(torch.as_tensor(a), affine=torch.eye(4)), id="metatensor"),
]

TRANSFORMS = [
    pytest.param(PercentileClip(1, 99), id="clip"),
    pytest.param(HUWindow(50, 100), id="window"),
    pytest.param(ZScore(mask_method="head"), id="zscore"),
    pytest.param(ZScore(mean=10.0, std=2.0), id="zscore-fixed"),
    pytest.param(NyulStandardize(np.linspace(0, 100, 5)), id="nyul"),
]


@pytest.mark.parametrize("convert", INPUT_TYPES)
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_output_keeps_input_type_and_matches_numpy(convert, transform):
    image = phantom()
    expected = np.asarray(transform(image))
    result = transform(convert(image))
    assert type(result) is type(convert(image))
    assert tuple(result.shape) == image.shape
    np.testing.assert_allclose(np.asarray(result), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    ("array_transform", "dict_transform"),
    [
        (PercentileClip(2, 98), PercentileClipd(keys="image", lower=2, upper=98)),
        (HUWindow(0, 80), HUWindowd(keys="image", center=0, width=80)),
        (ZScore(), ZScored(keys="image")),
        (
            NyulStandardize(np.linspace(0, 100, 5)),
            NyulStandardized(keys="image", standard_scale=np.linspace(0, 100, 5)),
        ),
    ],
)
def test_dictionary_twins_transform_their_keys_only(array_transform, dict_transform):
    image, label = phantom(), np.ones((1, 24, 24, 24), np.uint8)
    result = dict_transform({"image": image, "label": label})
    np.testing.assert_allclose(result["image"], array_transform(image), rtol=1e-6)
    assert result["label"] is label


def test_zscore_uses_the_foreground():
    image = phantom()
    normalized = np.asarray(ZScore(mask_method="head")(image))
    mask = foreground_mask(image, "head")
    assert abs(normalized[0][mask].mean()) < 1e-5 and abs(normalized[0][mask].std() - 1) < 1e-4


def test_hu_window_clips_to_its_bounds():
    values = np.asarray(HUWindow(40, 400)(np.array([[-1000.0, 0.0, 3000.0]])))
    np.testing.assert_array_equal(values, [[-160.0, 0.0, 240.0]])


def test_nyul_maps_landmarks_onto_the_standard_and_extends_the_tails():
    source = np.array([10.0, 20.0, 40.0])
    target = np.array([0.0, 50.0, 100.0])
    values = np.array([0.0, 10.0, 15.0, 30.0, 40.0, 60.0])
    np.testing.assert_allclose(
        piecewise_linear(values, source, target), [-50.0, 0.0, 25.0, 75.0, 100.0, 150.0]
    )


@pytest.mark.parametrize(
    ("tail", "expected"),
    [
        pytest.param(None, [-50.0, 0.0, 25.0, 75.0, 100.0, 125.0, 150.0], id="end-segments"),
        pytest.param((0, 2), [-20.0, 0.0, 25.0, 75.0, 100.0, 140.0, 180.0], id="whole-range"),
        pytest.param((1, 2), [-12.5, 0.0, 25.0, 75.0, 100.0, 125.0, 150.0], id="upper-segment"),
        pytest.param((0, 1), [-50.0, 0.0, 25.0, 75.0, 100.0, 200.0, 300.0], id="lower-segment"),
    ],
)
def test_nyul_tails_take_the_chosen_slope(tail, expected):
    source = np.array([10.0, 20.0, 60.0])  # segment slopes 5 and 1.25; 2 end to end
    target = np.array([0.0, 50.0, 100.0])
    values = np.array([0.0, 10.0, 15.0, 40.0, 60.0, 80.0, 100.0])
    np.testing.assert_allclose(piecewise_linear(values, source, target, tail), expected)


@pytest.mark.parametrize(
    ("percentiles", "tail_percentiles", "expected"),
    [
        ((10, 25, 50, 75, 90), (25, 75), (1, 3)),
        ((10, 25, 50, 75, 90), (10.0, 90.0), (0, 4)),
        ((10, 25, 50, 75, 90), None, None),
        ((10, 25, 50, 75, 90), (20, 80), ValueError),
        ((10, 25, 50, 75, 90), (75, 25), ValueError),
        ((10, 25, 50, 75, 90), (50, 50), ValueError),
        ((10, 25, 50, 75, 90), (25, 50, 75), ValueError),
    ],
)
def test_tail_indices(percentiles, tail_percentiles, expected):
    if expected is ValueError:
        with pytest.raises(ValueError, match="two increasing landmark percentiles"):
            tail_indices(percentiles, tail_percentiles)
    else:
        assert tail_indices(percentiles, tail_percentiles) == expected


TISSUE_SIGNAL = {"grey": 0.72, "white": 1.0, "tumour": 1.4}


def brain(tumour_share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A brain's voxels (35 % grey matter, enhancing tumour, white matter the rest) with
    noise, as a channel-first image in which every voxel is foreground, and their tissues."""
    count = 40_000
    sizes = {"grey": int(0.35 * count), "tumour": int(tumour_share * count)}
    sizes["white"] = count - sizes["grey"] - sizes["tumour"]
    tissues = np.concatenate([np.full(n, name) for name, n in sizes.items()])
    signal = np.array([TISSUE_SIGNAL[name] for name in tissues])
    noisy = signal + np.random.default_rng(seed).normal(0.0, 0.02, count)
    return noisy.reshape(1, count, 1, 1), tissues


@pytest.mark.parametrize(
    ("landmarks", "tumour_shares", "gap_range"),
    [
        pytest.param("default", (0.01, 0.06), (0.0, 0.25), id="default-1%-6%"),
        pytest.param("default", (0.06, 0.01), (0.0, 0.25), id="default-6%-1%"),
        pytest.param("default", (0.03, 0.03), (0.0, 0.25), id="default-same-burden"),
        pytest.param("classic", (0.01, 0.06), (1.0, np.inf), id="classic-1%-6%"),
        pytest.param("classic", (0.03, 0.03), (0.0, 0.05), id="classic-same-burden"),
    ],
)
def test_tumour_burden_moves_the_default_map_little(landmarks, tumour_shares, gap_range):
    """A linear scanner and a gamma-0.7 one; after Nyúl fitted on both, how far apart does
    enhancing tumour land, in units of the grey-white contrast? The classic deciles are exact
    when both brains hold as much tumour and far off when they do not (their 99th percentile
    lies in tumour or in white matter); the default stays close either way."""
    percentiles, tail = {
        "default": (NYUL_PERCENTILES, NYUL_TAIL_PERCENTILES),
        "classic": (DECILE_PERCENTILES, None),
    }[landmarks]
    (first, first_tissues), (second, second_tissues) = (brain(s, i) for i, s in
                                                        enumerate(tumour_shares))  # fmt: skip
    images = [100.0 * first, 3.0 * second**0.7 + 20.0]
    standard = np.mean(
        [rescale_landmarks(image_landmarks(i, percentiles, "nonzero")) for i in images], axis=0
    )
    transform = NyulStandardize(standard, percentiles, "nonzero", tail)
    means = [
        {t: np.asarray(transform(image))[0].ravel()[tissues == t].mean() for t in TISSUE_SIGNAL}
        for image, tissues in zip(images, (first_tissues, second_tissues), strict=True)
    ]
    contrast = np.mean([m["white"] - m["grey"] for m in means])
    gap = abs(means[0]["tumour"] - means[1]["tumour"]) / contrast
    assert gap_range[0] <= gap < gap_range[1]


def test_nyul_removes_a_monotone_non_linear_scanner_response():
    """Two 'scanners' see the same anatomy through different gamma curves; after Nyúl with a
    standard fitted on both, the same tissue lands at the same value."""
    anatomy = phantom()
    scanner_a = anatomy**1.0
    scanner_b = 3.0 * np.clip(anatomy, 0, None) ** 0.7 + 20.0
    landmarks = [image_landmarks(image, mask_method="head") for image in (scanner_a, scanner_b)]
    standard = np.mean([rescale_landmarks(lm) for lm in landmarks], axis=0)
    a, b = (np.asarray(NyulStandardize(standard)(s))[0] for s in (scanner_a, scanner_b))
    centre = (slice(10, 14),) * 3
    shell = (slice(3, 5), slice(11, 13), slice(11, 13))
    before = abs(scanner_a[0][centre].mean() - scanner_b[0][centre].mean())
    assert abs(a[centre].mean() - b[centre].mean()) < 0.05 * before
    assert abs(a[shell].mean() - b[shell].mean()) < 3.0


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: PercentileClip(50, 10), "lower < upper"),
        (lambda: HUWindow(0, 0), "width must be positive"),
        (lambda: ZScore(mean=1.0), "both mean and std"),
        (lambda: NyulStandardize([0, 1], percentiles=[1, 50, 99]), "one standard landmark"),
        (lambda: NyulStandardize([0, 1, 2], percentiles=[50, 10, 99]), "must increase"),
        (
            lambda: NyulStandardize([0, 1, 2], percentiles=[1, 50, 99]),
            "two increasing landmark percentiles",
        ),
    ],
)
def test_invalid_settings_are_refused(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


def head_phantom(cut_top: bool) -> tuple[np.ndarray, np.ndarray]:
    """A T1-like head: bright scalp, dark skull, a large bright brain; 4 mm voxels.

    Returns the channel-first image and the true head. With ``cut_top`` the field of view ends
    inside the head, leaving the scalp an open shell.
    """
    depth = 24 if cut_top else 30
    grid = np.indices((30, 30, depth)).astype(np.float64)
    radius = np.sqrt(((grid - np.array([14.5, 14.5, 14.5])[:, None, None, None]) ** 2).sum(0))
    image = np.select([radius < 10.0, radius < 12.0, radius < 13.5], [1.0, 0.1, 1.1], 0.0)
    noisy = image + np.random.default_rng(0).normal(0.0, 0.02, image.shape)
    return noisy.astype(np.float32)[None], radius < 13.5


@pytest.mark.parametrize("cut_top", [False, True], ids=["whole-head", "cut-by-field-of-view"])
def test_head_mask_is_the_head_even_where_dark_skull_parts_scalp_and_brain(cut_top):
    """The brain is the largest component above Otsu's threshold here; the head mask must still
    be the head (scalp included), so that ``brain`` depth is measured from the scalp."""
    image, head = head_phantom(cut_top)
    mask = foreground_mask(image, "head")
    overlap = (mask & head).sum() / (mask | head).sum()
    assert overlap > 0.95
    brain = foreground_mask(image, "brain", spacing=(4.0, 4.0, 4.0))
    deep = ndimage.distance_transform_edt(head, sampling=4.0) > 20.0
    assert (brain & deep).sum() / (brain | deep).sum() > 0.9


def test_masks():
    image = phantom()
    threshold = otsu_threshold(image)
    assert 5 < threshold < 100
    head = foreground_mask(image, "head")
    assert 3500 < head.sum() < 4500  # ball of radius 10: 4189 voxels
    brain = foreground_mask(image, "brain", spacing=(4.0, 4.0, 4.0))  # 20 mm = 5 voxels deep
    assert 400 < brain.sum() < 600 and not (brain & ~head).any()  # radius ~5: 523 voxels
    tiny = foreground_mask(image, "brain", spacing=(0.5, 0.5, 0.5))  # 5 mm head: no depth
    np.testing.assert_array_equal(tiny, head)
    assert foreground_mask(np.zeros((1, 4, 4, 4)), "nonzero").all(), "never empty"
    with pytest.raises(ValueError, match="mask method"):
        foreground_mask(image, "skull")
