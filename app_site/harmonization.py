"""Harmonization at a site: declared statistics of its dataset, and applying an artifact.

A dataset is a folder written by ``fedseg ingest``; every image its ``datalist.json`` lists is
used (harmonization needs no label). Statistics are computed from a label-free foreground
mask that is available again at inference time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor

from app_site.ingest.volume import nifti_image, save_nifti_atomic
from fedseg.harmonization import (
    HarmonizationConfig,
    HarmonizationError,
    SiteStatistics,
    artifact_transform,
)
from transforms.intensity import HUWindow, image_landmarks, rescale_landmarks
from transforms.masks import foreground_mask


def dataset_images(dataset: Path) -> list[Path]:
    """All image files a dataset's ``datalist.json`` lists (training, validation and test).

    Args:
        dataset: Folder written by ``fedseg ingest``.

    Returns:
        Image paths, sorted.

    Raises:
        FileNotFoundError: If the datalist or an image it lists is missing.
    """
    datalist_path = Path(dataset) / "datalist.json"
    if not datalist_path.is_file():
        raise FileNotFoundError(f"{datalist_path}: not found; run `fedseg ingest` first")
    datalist = json.loads(datalist_path.read_text())
    images = sorted(
        {
            Path(dataset) / item["image"]
            for key in ("training", "validation", "test")
            for item in datalist.get(key, [])
        }
    )
    for image in images:
        if not image.is_file():
            raise FileNotFoundError(f"{image}: listed in {datalist_path} but missing")
    return images


def dataset_modality(dataset: Path) -> str:
    """The single modality of a dataset, from its ``datalist.json``.

    Raises:
        HarmonizationError: If the dataset holds no or several modalities.
    """
    datalist = json.loads((Path(dataset) / "datalist.json").read_text())
    modalities = sorted(set(datalist.get("modality", {}).values()))
    if not modalities:
        raise HarmonizationError(
            f"{dataset}: datalist.json names no modality (NIfTI inputs hold none); re-ingest "
            "with --modality MR|CT to declare it"
        )
    if len(modalities) != 1:
        raise HarmonizationError(
            f"{dataset}: harmonization needs one modality per dataset, found {modalities}"
        )
    return modalities[0]


def load_channel_first(path: Path) -> MetaTensor:
    """Loads a NIfTI image as a float32 ``(1, *spatial)`` MetaTensor carrying its affine."""
    image = nib.load(path)
    values = np.asarray(image.dataobj, dtype=np.float32)[None]
    return MetaTensor(torch.from_numpy(values), affine=torch.as_tensor(image.affine))


def site_statistics(dataset: Path, config: HarmonizationConfig) -> SiteStatistics:
    """Computes the aggregate this site declares for a harmonization fit.

    Args:
        dataset: The site's ingested dataset.
        config: The fit's configuration.

    Returns:
        The statistics (sums and counts only).

    Raises:
        HarmonizationError: If the site holds fewer images than ``config.min_images`` (it then
            sends nothing), or an image has no usable foreground.
    """
    images = dataset_images(dataset)
    if len(images) < config.min_images:
        raise HarmonizationError(
            f"{dataset}: {len(images)} image(s), fewer than the {config.min_images} a site "
            "needs before it shares statistics; nothing was sent"
        )
    statistics = SiteStatistics(method=config.method, image_count=len(images))
    landmark_sum = np.zeros(len(config.percentiles), dtype=np.float64)
    for path in images:
        image = load_channel_first(path)
        if config.method == "nyul":
            landmarks = image_landmarks(image, config.percentiles, config.mask_method)
            try:
                landmark_sum += rescale_landmarks(landmarks, config.standard_range)
            except ValueError as error:
                raise HarmonizationError(f"{path.name}: {error}") from error
        elif config.method == "ct":
            windowed = HUWindow(*config.hu_window)(image)
            values = np.asarray(windowed)[0][foreground_mask(windowed, config.mask_method)]
            statistics.voxel_count += int(values.size)
            statistics.voxel_sum += float(values.sum(dtype=np.float64))
            statistics.voxel_sum_sq += float(np.square(values, dtype=np.float64).sum())
    if config.method == "nyul":
        statistics.landmark_sum = landmark_sum.tolist()
    return statistics


@dataclass(frozen=True)
class LandmarkDeviation:
    """How far a site's mean rescaled landmark lies from the standard scale."""

    percentile: float
    site_mean: float
    standard: float

    @property
    def deviation(self) -> float:
        """Site mean minus standard, in standard-scale units."""
        return self.site_mean - self.standard


def check_dataset(artifact: dict, dataset: Path) -> list[LandmarkDeviation]:
    """Compares a dataset's landmarks with a Nyúl artifact's standard scale.

    Args:
        artifact: A verified Nyúl artifact.
        dataset: The site's dataset.

    Returns:
        One entry per landmark.

    Raises:
        HarmonizationError: If the artifact is not a Nyúl artifact.
    """
    config = HarmonizationConfig.from_dict(artifact["config"])
    if config.method != "nyul":
        raise HarmonizationError(f"check compares Nyúl landmarks; this artifact is {config.method}")
    statistics = site_statistics(dataset, replace(config, min_images=1))
    site_mean = np.asarray(statistics.landmark_sum) / statistics.image_count
    return [
        LandmarkDeviation(percentile, float(mean), float(standard))
        for percentile, mean, standard in zip(
            config.percentiles, site_mean, artifact["standard_scale"], strict=True
        )
    ]


def apply_to_dataset(artifact: dict, dataset: Path, output: Path) -> list[Path]:
    """Writes every image of a dataset harmonized, under its own file name, into ``output``.

    Args:
        artifact: A verified artifact.
        dataset: The site's dataset (read only).
        output: Folder for the harmonized images (float32 NIfTI, same affine).

    Returns:
        The files written.
    """
    transform = artifact_transform(artifact)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for path in dataset_images(dataset):
        harmonized = np.asarray(transform(load_channel_first(path)))[0]
        target = output / path.name
        save_nifti_atomic(nifti_image(harmonized, nib.load(path).affine), target)
        written.append(target)
    return written


def check_artifact_modality(artifact: dict, dataset: Path) -> None:
    """Refuses an artifact fitted on another modality than a dataset's images.

    Args:
        artifact: A verified harmonization artifact.
        dataset: Folder written by ``fedseg ingest``.

    Raises:
        HarmonizationError: If the dataset's modality is not the artifact's, or the dataset
            holds no or several modalities.
    """
    modality = dataset_modality(dataset)
    if modality != artifact["modality"]:
        raise HarmonizationError(
            f"{dataset}: holds {modality} images, but the harmonization artifact was fitted on "
            f"{artifact['modality']} images; fit an artifact on {modality} data"
        )
