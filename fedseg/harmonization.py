"""Intensity harmonization shared by sites, server and command line.

Configuration, the exact combination of per-site statistics, the artifact, and the transform
it defines.

Methods, chosen from the modality as nnU-Net does:

* ``nyul`` (MR default): each image's foreground percentiles are rescaled to a standard range;
  the standard scale is their mean over all images. A site declares the sum of its images'
  rescaled landmarks and its image count, so the federated fit equals the centralized one.
  By default the landmarks are the 10th, 25th, 50th, 75th and 90th percentiles and the map
  continues beyond them with the interquartile slope, so that the volume of pathology in a
  histogram's tails moves the map less; the classic deciles with 1st and 99th percentile ends
  and end-segment tails remain available (``percentiles=transforms.intensity.DECILE_PERCENTILES,
  tail_percentiles=None``).
* ``zscore`` (MR): each image is normalized by its own foreground mean and deviation; there
  is nothing to fit, but sites still declare their image counts.
* ``ct``: a Hounsfield window, then a z-score with the mean and deviation of all sites'
  windowed foreground voxels, from declared sums, sums of squares and counts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from monai.transforms import Compose, Transform

from fedseg.artifacts import read_artifact
from transforms.intensity import (
    NYUL_PERCENTILES,
    NYUL_TAIL_PERCENTILES,
    STANDARD_RANGE,
    HUWindow,
    NyulStandardize,
    ZScore,
    tail_indices,
)
from transforms.masks import MASK_METHODS

ARTIFACT_KIND = "fedseg.harmonization"
#: 2: landmarks, tail slopes and the head mask of the robust Nyúl (version 1 artifacts were
#: fitted with other masks and landmarks and are refused: fit again).
ARTIFACT_VERSION = 2
METHODS = ("nyul", "zscore", "ct")
DEFAULT_MIN_IMAGES = 5


class HarmonizationError(Exception):
    """Statistics that cannot be computed or combined; the message says why."""


def default_method(modality: str) -> str:
    """The method for a modality: Nyúl for MR, HU window + z-score for CT."""
    if modality == "CT":
        return "ct"
    if modality == "MR":
        return "nyul"
    raise HarmonizationError(f"no harmonization method for modality {modality!r} (MR or CT)")


def check_method_fits_modality(method: str, modality: str) -> None:
    """Refuses the ``ct`` method (a Hounsfield-unit window) for images that are not CT.

    Args:
        method: ``nyul``, ``zscore``, ``ct`` or ``none``.
        modality: The images' modality.

    Raises:
        HarmonizationError: If ``method`` is ``ct`` and ``modality`` is not.
    """
    if method == "ct" and modality != "CT":
        raise HarmonizationError(
            f"harmonization method ct windows Hounsfield units, but the images are {modality}; "
            f"use {default_method(modality)} (the default for {modality})"
        )


@dataclass(frozen=True)
class HarmonizationConfig:
    """How harmonization is fitted; travels with the job to every site.

    Attributes:
        method: ``nyul``, ``zscore`` or ``ct``.
        mask_method: Label-free foreground mask (see :mod:`transforms.masks`).
        percentiles: Nyúl landmark percentiles.
        tail_percentiles: Two of ``percentiles`` whose landmarks' slope continues the Nyúl map
            beyond the end landmarks, or ``None`` for the end segments' slopes.
        standard_range: Where Nyúl maps each image's end landmarks.
        hu_window: CT window (centre, width) in HU.
        min_images: Fewest images a site must hold before it sends statistics.
    """

    method: str = "nyul"
    mask_method: str = "brain"
    percentiles: tuple[float, ...] = NYUL_PERCENTILES
    tail_percentiles: tuple[float, float] | None = NYUL_TAIL_PERCENTILES
    standard_range: tuple[float, float] = STANDARD_RANGE
    hu_window: tuple[float, float] = (40.0, 400.0)
    min_images: int = DEFAULT_MIN_IMAGES

    def __post_init__(self) -> None:
        """Rejects unusable settings."""
        if self.method not in METHODS:
            raise HarmonizationError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.mask_method not in MASK_METHODS:
            raise HarmonizationError(f"mask must be one of {MASK_METHODS}")
        if self.min_images < 1:
            raise HarmonizationError(f"min_images must be at least 1, got {self.min_images}")
        try:
            tail_indices(self.percentiles, self.tail_percentiles)
        except ValueError as error:
            raise HarmonizationError(str(error)) from error

    def to_dict(self) -> dict:
        """Plain-JSON form (sent to sites as task data)."""
        return {key: list(v) if isinstance(v, tuple) else v for key, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: Mapping) -> HarmonizationConfig:
        """Inverse of :meth:`to_dict`; unknown keys are errors."""
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise HarmonizationError(f"unknown harmonization settings: {sorted(unknown)}")
        converted = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**converted)


@dataclass
class SiteStatistics:
    """The aggregate a site declares: nothing but these numbers leaves it.

    Attributes:
        method: The method they are for.
        image_count: Number of images summarized.
        landmark_sum: Nyúl: sum of the images' rescaled landmarks.
        voxel_count: CT: number of windowed foreground voxels.
        voxel_sum: CT: their sum.
        voxel_sum_sq: CT: the sum of their squares.
    """

    method: str
    image_count: int
    landmark_sum: list[float] = field(default_factory=list)
    voxel_count: int = 0
    voxel_sum: float = 0.0
    voxel_sum_sq: float = 0.0

    def to_dict(self) -> dict:
        """Plain-JSON form, as sent to the server."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping) -> SiteStatistics:
        """Reads what a site sent, refusing anything beyond the declared fields."""
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise HarmonizationError(f"undeclared statistics fields: {sorted(unknown)}")
        return cls(**values)


def combine_statistics(
    config: HarmonizationConfig, statistics: Mapping[str, SiteStatistics], modality: str
) -> dict:
    """Combines per-site statistics into the artifact content (without its hash).

    Args:
        config: The fit's configuration.
        statistics: Site name to declared statistics.
        modality: Modality of the images.

    Returns:
        The artifact payload.

    Raises:
        HarmonizationError: If there are no statistics, they are for another method, or the
            method does not fit the modality.
    """
    check_method_fits_modality(config.method, modality)
    if not statistics:
        raise HarmonizationError("no site sent statistics")
    for site, stats in statistics.items():
        if stats.method != config.method:
            raise HarmonizationError(f"{site} sent {stats.method} statistics, not {config.method}")
    images = sum(s.image_count for s in statistics.values())
    payload = {
        "kind": ARTIFACT_KIND,
        "format_version": ARTIFACT_VERSION,
        "modality": modality,
        "config": config.to_dict(),
        "n_sites": len(statistics),
        "n_images": images,
        "site_images": {site: s.image_count for site, s in sorted(statistics.items())},
    }
    if config.method == "nyul":
        total = np.sum([np.asarray(s.landmark_sum, np.float64) for s in statistics.values()], 0)
        payload["standard_scale"] = (total / images).tolist()
    elif config.method == "ct":
        voxels = sum(s.voxel_count for s in statistics.values())
        if voxels == 0:
            raise HarmonizationError("no foreground voxel inside the HU window at any site")
        mean = sum(s.voxel_sum for s in statistics.values()) / voxels
        variance = sum(s.voxel_sum_sq for s in statistics.values()) / voxels - mean * mean
        payload["mean"] = mean
        payload["std"] = float(np.sqrt(max(variance, 0.0)))
    return payload


def read_harmonization_artifact(path: Path, expected_hash: str | None = None) -> dict:
    """Reads and verifies a harmonization artifact (see :func:`fedseg.artifacts.read_artifact`)."""
    return read_artifact(path, ARTIFACT_KIND, ARTIFACT_VERSION, expected_hash)


def artifact_transform(artifact: dict) -> Transform:
    """The array transform an artifact defines, for channel-first images.

    Args:
        artifact: A verified artifact.

    Returns:
        The transform.
    """
    config = HarmonizationConfig.from_dict(artifact["config"])
    if config.method == "nyul":
        return NyulStandardize(
            artifact["standard_scale"],
            config.percentiles,
            config.mask_method,
            config.tail_percentiles,
        )
    if config.method == "zscore":
        return ZScore(mask_method=config.mask_method)
    center, width = config.hu_window
    return Compose(
        [
            HUWindow(center, width),
            ZScore(mask_method=config.mask_method, mean=artifact["mean"], std=artifact["std"]),
        ]
    )
