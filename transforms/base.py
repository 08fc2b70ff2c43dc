"""Base of the dictionary twins: apply one array transform to each key."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

from monai.config import NdarrayOrTensor
from monai.transforms import MapTransform, Transform


class ArrayTwin(MapTransform):
    """Applies the array transform ``self.transform`` to each of ``keys`` in a dictionary."""

    transform: Transform

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict:
        """Transforms each of ``keys`` in a copy of ``data``."""
        result = dict(data)
        for key in self.key_iterator(result):
            result[key] = self.transform(result[key])
        return result
