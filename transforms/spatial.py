"""Spatial transforms: canonical (RAS) orientation and resampling to a target voxel spacing.

Built on MONAI's ``Orientation`` and ``Spacing``, which read and update the affine of a
``MetaTensor``; the dictionary twins interpolate labels with nearest neighbour.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform, Orientation, Spacing, Transform

from transforms.base import ArrayTwin


class CanonicalOrientation(Transform):
    """Reorders and flips axes so they run closest to Right, Anterior, Superior.

    Input: a channel-first ``MetaTensor`` ``(C, *spatial)`` with an affine.
    """

    def __init__(self) -> None:
        self._orientation = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))

    def __call__(self, image: NdarrayOrTensor) -> NdarrayOrTensor:
        """Reorients ``image``."""
        return self._orientation(image)


class ResampleToSpacing(Transform):
    """Resamples to a target voxel spacing in millimetres.

    Args:
        spacing: Target spacing per spatial axis.
        mode: Interpolation: ``bilinear`` for images, ``nearest`` for labels.
    """

    def __init__(self, spacing: Sequence[float], mode: str = "bilinear"):
        if any(s <= 0 for s in spacing):
            raise ValueError(f"spacing must be positive, got {list(spacing)}")
        self.spacing = tuple(float(s) for s in spacing)
        self._spacing = Spacing(pixdim=self.spacing, mode=mode)

    def __call__(self, image: NdarrayOrTensor) -> NdarrayOrTensor:
        """Resamples ``image``."""
        return self._spacing(image)


class CanonicalOrientationd(ArrayTwin):
    """Dictionary twin of :class:`CanonicalOrientation`."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.transform = CanonicalOrientation()


class ResampleToSpacingd(MapTransform):
    """Dictionary twin of :class:`ResampleToSpacing`: labels use nearest neighbour.

    Args:
        keys: Keys to resample.
        spacing: Target spacing.
        label_keys: Keys among ``keys`` holding labels.
        allow_missing_keys: Skip absent keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        spacing: Sequence[float],
        label_keys: KeysCollection = (),
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        labels = {label_keys} if isinstance(label_keys, str) else set(label_keys)
        self.transforms = {
            key: ResampleToSpacing(spacing, "nearest" if key in labels else "bilinear")
            for key in self.keys
        }

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict:
        """Resamples each of ``keys``."""
        result = dict(data)
        for key in self.key_iterator(result):
            result[key] = self.transforms[key](result[key])
        return result
