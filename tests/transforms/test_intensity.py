"""Table-driven tests of the intensity transforms over numpy, torch and MetaTensor inputs."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from transforms.intensity import (
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
    pytest.param(NyulStandardize(np.linspace(0, 100, 11)), id="nyul"),
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
            NyulStandardize(np.linspace(0, 100, 11)),
            NyulStandardized(keys="image", standard_scale=np.linspace(0, 100, 11)),
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
    ],
)
def test_invalid_settings_are_refused(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


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
