"""Intensity transforms: percentile clipping, CT windowing, z-score and Nyúl standardization.

Each array transform has a dictionary twin (``Xxx`` / ``Xxxd``) as in MONAI. Inputs are
channel-first ``(C, *spatial)`` numpy arrays or torch tensors (MONAI MetaTensors keep their
metadata); outputs have the input's type and device, as float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import Transform
from monai.utils import convert_data_type, convert_to_dst_type

from transforms.base import ArrayTwin
from transforms.masks import foreground_mask

#: Percentiles of the default Nyúl landmarks: the 10th and 90th as ends, the quartiles and the
#: median between. Pathology (edema, enhancing tumour) fills up to about a tenth of either tail
#: of a brain's histogram, so landmarks further out move with its volume rather than with the
#: scanner.
NYUL_PERCENTILES = (10.0, 25.0, 50.0, 75.0, 90.0)

#: Percentiles whose landmarks give the default slope beyond the end landmarks: the
#: interquartile range, the scale least moved by pathology (as in a median/IQR z-score).
NYUL_TAIL_PERCENTILES = (25.0, 75.0)

#: Percentiles of the classic Nyúl landmarks: ends at the 1st and 99th, the deciles between
#: (used with end-segment tails, ``tail_percentiles=None``).
DECILE_PERCENTILES = (1.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 99.0)

#: Range the end landmarks are mapped to before averaging (Nyúl's s1, s2).
STANDARD_RANGE = (0.0, 100.0)


def _as_numpy(image: NdarrayOrTensor) -> np.ndarray:
    return convert_data_type(image, np.ndarray, dtype=np.float32)[0]


def _like(values: np.ndarray, image: NdarrayOrTensor) -> NdarrayOrTensor:
    return convert_to_dst_type(values.astype(np.float32), image, dtype=np.float32)[0]


def image_landmarks(
    image: NdarrayOrTensor,
    percentiles: Sequence[float] = NYUL_PERCENTILES,
    mask_method: str = "head",
) -> np.ndarray:
    """Intensity landmarks of one image: percentiles of its foreground.

    Args:
        image: ``(C, *spatial)`` image; the first channel is used.
        percentiles: Increasing percentiles in [0, 100].
        mask_method: Foreground mask (see :mod:`transforms.masks`).

    Returns:
        float64 landmarks, one per percentile, non-decreasing.
    """
    mask = foreground_mask(image, mask_method)
    values = _as_numpy(image)[0][mask]
    return np.percentile(values.astype(np.float64), percentiles)


def rescale_landmarks(
    landmarks: np.ndarray, standard_range: tuple[float, float] = STANDARD_RANGE
) -> np.ndarray:
    """Maps an image's end landmarks linearly onto the standard range (Nyúl's training step).

    Args:
        landmarks: One image's landmarks.
        standard_range: Where the first and last landmark go.

    Returns:
        The rescaled landmarks.

    Raises:
        ValueError: If the end landmarks are equal (a constant image).
    """
    span = landmarks[-1] - landmarks[0]
    if span <= 0:
        raise ValueError("image foreground has no intensity range; cannot place landmarks")
    low, high = standard_range
    return low + (landmarks - landmarks[0]) / span * (high - low)


def tail_indices(
    percentiles: Sequence[float], tail_percentiles: Sequence[float] | None
) -> tuple[int, int] | None:
    """Positions of the tail percentiles among the landmark percentiles.

    Args:
        percentiles: Landmark percentiles.
        tail_percentiles: Two increasing landmark percentiles whose slope continues the map
            beyond the end landmarks, or ``None`` for the end segments' own slopes.

    Returns:
        Their two indices into ``percentiles``, or ``None``.

    Raises:
        ValueError: If the tail percentiles are not two increasing landmark percentiles.
    """
    if tail_percentiles is None:
        return None
    chosen = [float(p) for p in tail_percentiles]
    available = [float(p) for p in percentiles]
    if len(chosen) != 2 or chosen[0] >= chosen[1] or not set(chosen) <= set(available):
        raise ValueError(
            f"tail percentiles must be two increasing landmark percentiles, got {chosen}"
        )
    return available.index(chosen[0]), available.index(chosen[1])


def piecewise_linear(
    values: np.ndarray,
    source: np.ndarray,
    target: np.ndarray,
    tail: tuple[int, int] | None = None,
) -> np.ndarray:
    """Maps values through the piecewise-linear function ``source -> target``.

    Beyond the first and last landmarks the map continues linearly (robust tails rather than
    clipping), so intensities outside the landmark range keep their order: with the slope
    between the landmarks ``tail`` when given, else with each end segment's own slope. An end
    segment spans little more than noise when the tissue beyond it is rare, and extending it
    stretches that tissue by an image's noise rather than its contrast.

    Args:
        values: Intensities to map.
        source: Increasing landmarks of the image.
        target: Landmarks of the standard scale.
        tail: Indices of the two landmarks whose slope the tails take, or ``None``.

    Returns:
        Mapped intensities, float32.
    """
    source = _strictly_increasing(np.asarray(source, dtype=np.float64))
    target = np.asarray(target, dtype=np.float64)
    mapped = np.interp(values, source, target)
    low, high = (tail, tail) if tail is not None else ((0, 1), (-2, -1))
    low_slope = _slope(source, target, *low)
    high_slope = _slope(source, target, *high)
    below, above = values < source[0], values > source[-1]
    mapped[below] = target[0] + (values[below] - source[0]) * low_slope
    mapped[above] = target[-1] + (values[above] - source[-1]) * high_slope
    return mapped.astype(np.float32)


def _slope(source: np.ndarray, target: np.ndarray, first: int, second: int) -> float:
    return float((target[second] - target[first]) / (source[second] - source[first]))


def _strictly_increasing(landmarks: np.ndarray) -> np.ndarray:
    """Nudges tied landmarks (flat histograms) apart so interpolation stays defined."""
    if np.all(np.diff(landmarks) > 0):
        return landmarks
    span = max(float(landmarks[-1] - landmarks[0]), 1.0)
    step = span * 1e-6
    return np.maximum.accumulate(landmarks + np.arange(len(landmarks)) * step)


class PercentileClip(Transform):
    """Clips intensities to percentiles of the foreground.

    Args:
        lower: Lower percentile.
        upper: Upper percentile.
        mask_method: Foreground the percentiles are taken over.
    """

    def __init__(self, lower: float = 0.5, upper: float = 99.5, mask_method: str = "head"):
        if not 0.0 <= lower < upper <= 100.0:
            raise ValueError(f"need 0 <= lower < upper <= 100, got {lower}, {upper}")
        self.lower, self.upper, self.mask_method = lower, upper, mask_method

    def __call__(self, image: NdarrayOrTensor) -> NdarrayOrTensor:
        """Clips ``(C, *spatial)`` ``image``."""
        array = _as_numpy(image)
        values = array[0][foreground_mask(image, self.mask_method)]
        low, high = np.percentile(values, (self.lower, self.upper))
        return _like(np.clip(array, low, high), image)


class HUWindow(Transform):
    """Clips CT values to a Hounsfield window ``center +- width / 2``.

    Args:
        center: Window centre in HU.
        width: Window width in HU.
    """

    def __init__(self, center: float = 40.0, width: float = 400.0):
        if width <= 0:
            raise ValueError(f"window width must be positive, got {width}")
        self.center, self.width = center, width

    @property
    def bounds(self) -> tuple[float, float]:
        """The window's lower and upper HU."""
        return self.center - self.width / 2.0, self.center + self.width / 2.0

    def __call__(self, image: NdarrayOrTensor) -> NdarrayOrTensor:
        """Clips ``image`` to the window."""
        return _like(np.clip(_as_numpy(image), *self.bounds), image)


class ZScore(Transform):
    """Subtracts a mean and divides by a standard deviation.

    With ``mean`` and ``std`` given (for example fitted across sites for CT) they are used for
    every image; otherwise each image uses its own foreground statistics.

    Args:
        mask_method: Foreground the image's own statistics are taken over.
        mean: Fixed mean, or ``None``.
        std: Fixed standard deviation, or ``None``.
        eps: Guards against division by zero.
    """

    def __init__(
        self,
        mask_method: str = "head",
        mean: float | None = None,
        std: float | None = None,
        eps: float = 1e-8,
    ):
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        if std is not None and std <= 0:
            raise ValueError(f"std must be positive, got {std}")
        self.mask_method, self.mean, self.std, self.eps = mask_method, mean, std, eps

    def __call__(self, image: NdarrayOrTensor) -> NdarrayOrTensor:
        """Normalizes ``(C, *spatial)`` ``image``."""
        array = _as_numpy(image)
        if self.mean is None:
            values = array[0][foreground_mask(image, self.mask_method)]
            mean, std = float(values.mean()), float(values.std())
        else:
            mean, std = self.mean, self.std
        return _like((array - mean) / (std + self.eps), image)


class NyulStandardize(Transform):
    """Maps an image's landmarks piecewise linearly onto a learned standard scale (Nyúl).

    Args:
        standard_scale: Standard landmarks (from a fitted harmonization artifact).
        percentiles: Percentiles the landmarks stand for.
        mask_method: Foreground the image's landmarks are taken over.
        tail_percentiles: Two landmark percentiles whose slope continues the map beyond the
            end landmarks, or ``None`` for the end segments' slopes (classic Nyúl).
    """

    def __init__(
        self,
        standard_scale: Sequence[float],
        percentiles: Sequence[float] = NYUL_PERCENTILES,
        mask_method: str = "head",
        tail_percentiles: Sequence[float] | None = NYUL_TAIL_PERCENTILES,
    ):
        if len(standard_scale) != len(percentiles) or len(percentiles) < 2:
            raise ValueError("need one standard landmark per percentile, at least two")
        if np.any(np.diff(percentiles) <= 0):
            raise ValueError(f"percentiles must increase, got {list(percentiles)}")
        self.standard_scale = np.asarray(standard_scale, dtype=np.float64)
        self.percentiles = tuple(float(p) for p in percentiles)
        self.mask_method = mask_method
        self.tail = tail_indices(self.percentiles, tail_percentiles)

    def __call__(self, image: NdarrayOrTensor) -> NdarrayOrTensor:
        """Standardizes ``(C, *spatial)`` ``image``."""
        array = _as_numpy(image)
        landmarks = image_landmarks(image, self.percentiles, self.mask_method)
        mapped = piecewise_linear(
            array.astype(np.float64), landmarks, self.standard_scale, self.tail
        )
        return _like(mapped, image)


class PercentileClipd(ArrayTwin):
    """Dictionary twin of :class:`PercentileClip`."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False, **kwargs):
        super().__init__(keys, allow_missing_keys)
        self.transform = PercentileClip(**kwargs)


class HUWindowd(ArrayTwin):
    """Dictionary twin of :class:`HUWindow`."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False, **kwargs):
        super().__init__(keys, allow_missing_keys)
        self.transform = HUWindow(**kwargs)


class ZScored(ArrayTwin):
    """Dictionary twin of :class:`ZScore`."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False, **kwargs):
        super().__init__(keys, allow_missing_keys)
        self.transform = ZScore(**kwargs)


class NyulStandardized(ArrayTwin):
    """Dictionary twin of :class:`NyulStandardize`."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False, **kwargs):
        super().__init__(keys, allow_missing_keys)
        self.transform = NyulStandardize(**kwargs)
