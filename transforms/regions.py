"""BraTS regions from tumour labels: tumour core, whole tumour, enhancing tumour.

Labels: 0 background, 1 necrotic core, 2 edema, 3 enhancing tumour. Regions overlap, so they
are predicted as independent channels: TC = {1, 3}, WT = {1, 2, 3}, ET = {3}.
"""

from __future__ import annotations

import numpy as np
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import Transform
from monai.utils import convert_to_dst_type

from transforms.base import ArrayTwin

#: Region name -> label values it covers, in channel order.
REGIONS: dict[str, tuple[int, ...]] = {"TC": (1, 3), "WT": (1, 2, 3), "ET": (3,)}


class LabelsToRegions(Transform):
    """Turns a ``(1, *spatial)`` label map into ``(3, *spatial)`` binary region channels."""

    def __call__(self, label: NdarrayOrTensor) -> NdarrayOrTensor:
        """Converts ``label``."""
        values = np.asarray(label)
        if values.shape[0] != 1:
            raise ValueError(f"expected a one-channel label map, got shape {values.shape}")
        regions = np.concatenate([np.isin(values, list(v)) for v in REGIONS.values()])
        return convert_to_dst_type(regions.astype(np.float32), label, dtype=np.float32)[0]


class LabelsToRegionsd(ArrayTwin):
    """Dictionary twin of :class:`LabelsToRegions`."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.transform = LabelsToRegions()
