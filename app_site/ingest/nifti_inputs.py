"""NIfTI volumes found in the ingested folder: sanity checks and label pairing.

A NIfTI image is identified by its path relative to the ingested folder (the manifest's
``series_uid`` column may name it). ``X_seg.nii.gz``, ``X_label.nii.gz``, ``X_labels.nii.gz``
or ``X_mask.nii.gz`` beside ``X.nii.gz`` is taken as X's label and is not ingested as an image;
neither is a file that the manifest names as a label.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from app_site.ingest.volume import canonical, nifti_image

NIFTI_SUFFIXES = (".nii", ".nii.gz")
LABEL_SUFFIXES = ("_seg", "_label", "_labels", "_mask")


class NiftiInputError(Exception):
    """A NIfTI volume that cannot be ingested; the message says why."""


def is_nifti(path: Path) -> bool:
    """Whether a path names a NIfTI file."""
    return path.name.endswith(NIFTI_SUFFIXES)


def nifti_stem(path: Path) -> str:
    """File name without ``.nii`` or ``.nii.gz``."""
    name = path.name
    return name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name[: -len(".nii")]


def pair_labels(
    paths: list[Path], named_labels: frozenset[Path] = frozenset()
) -> tuple[list[Path], dict[Path, Path]]:
    """Splits NIfTI files into images and labels paired by name.

    Args:
        paths: NIfTI files of one folder tree.
        named_labels: Label files named elsewhere (the manifest's), resolved: never images.

    Returns:
        The images, and a map from image to its label file.
    """
    by_folder_stem = {(p.parent, nifti_stem(p)): p for p in paths}
    labels: dict[Path, Path] = {}
    label_files = set()
    for path in paths:
        stem = nifti_stem(path)
        for suffix in LABEL_SUFFIXES:
            image = by_folder_stem.get((path.parent, stem[: -len(suffix)]))
            if stem.endswith(suffix) and image is not None:
                labels[image] = path
                label_files.add(path)
    images = [p for p in paths if p not in label_files and p.resolve() not in named_labels]
    return images, labels


def load_nifti_image(path: Path) -> nib.Nifti1Image:
    """Loads and checks a NIfTI image, returning it canonical (RAS) as float32.

    Args:
        path: The file.

    Returns:
        The canonical image.

    Raises:
        NiftiInputError: If the file is unreadable, not 3D, has an unusable affine or holds
            NaN or infinite values.
    """
    try:
        image = nib.load(path)
        values = np.asanyarray(image.dataobj, dtype=np.float32)
    except Exception as error:  # nibabel raises many types for broken files
        raise NiftiInputError(f"{path.name}: unreadable NIfTI ({type(error).__name__})") from error
    if values.ndim == 4 and values.shape[3] == 1:
        values = values[..., 0]
    if values.ndim != 3:
        raise NiftiInputError(f"{values.ndim}D volume of shape {values.shape}; expected 3D")
    affine = image.affine
    if not np.all(np.isfinite(affine)):
        raise NiftiInputError("affine holds NaN or infinite values")
    axes = affine[:3, :3]
    zooms = np.linalg.norm(axes, axis=0)
    if np.any(zooms < 1e-6) or abs(np.linalg.det(axes)) < 1e-9:
        raise NiftiInputError("affine is singular (a voxel size is zero)")
    directions = axes / zooms
    if np.max(np.abs(directions.T @ directions - np.eye(3))) > 1e-3:
        raise NiftiInputError("affine is sheared (voxel axes are not orthogonal)")
    bad = int(np.count_nonzero(~np.isfinite(values)))
    if bad:
        raise NiftiInputError(f"{bad} voxel(s) hold NaN or infinite values")
    return canonical(nifti_image(values, affine))
