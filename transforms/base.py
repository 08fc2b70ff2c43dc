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


class Applyd(ArrayTwin):
    """Applies a given array transform (for example one defined by an artifact) to keys.

    Args:
        keys: Keys to transform.
        transform: The array transform.
        allow_missing_keys: Skip absent keys.
    """

    def __init__(self, keys, transform: Transform, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.transform = transform
