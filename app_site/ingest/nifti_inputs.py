"""NIfTI volumes found in the ingested folder: sanity checks and label pairing.

A NIfTI image is identified by its path relative to the ingested folder (the manifest's
``series_uid`` column may name it). ``X_seg.nii.gz``, ``X_label.nii.gz``, ``X_labels.nii.gz``
or ``X_mask.nii.gz`` beside ``X.nii.gz`` is a candidate label of X and is not ingested as an
image; neither is a file that the manifest names as a label. Extensions and suffixes match in
any letter case. A file with a label suffix and no image of its stem beside it is an orphan
label, not an image, unless the manifest names it as an image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from app_site.ingest.volume import canonical, compact, nifti_image

NIFTI_SUFFIXES = (".nii", ".nii.gz")
LABEL_SUFFIXES = ("_seg", "_label", "_labels", "_mask")


class NiftiInputError(Exception):
    """A NIfTI volume that cannot be ingested; the message says why."""


@dataclass(frozen=True)
class NiftiPairing:
    """NIfTI files of a folder tree sorted into images and labels.

    Attributes:
        images: Files to ingest as images.
        labels: Image to its candidate label files beside it, sorted (one is unambiguous).
        orphans: Files named like a label with no image of their stem beside them, mapped to
            the image file name they lack.
    """

    images: list[Path]
    labels: dict[Path, list[Path]]
    orphans: dict[Path, str]


def is_nifti(path: Path) -> bool:
    """Whether a path names a NIfTI file (``.nii`` or ``.nii.gz``, any letter case)."""
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: Path) -> str:
    """File name without ``.nii`` or ``.nii.gz`` (any letter case)."""
    name = path.name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else name[: -len(".nii")]


def nifti_extension(path: Path) -> str:
    """The file's NIfTI extension as written (``.nii.gz``, ``.NII``...)."""
    return path.name[len(nifti_stem(path)) :]


def label_prefix(path: Path) -> str | None:
    """The stem before a label suffix (``X`` for ``X_seg.nii.gz``), or ``None`` without one."""
    stem = nifti_stem(path)
    for suffix in LABEL_SUFFIXES:
        if stem.lower().endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return None


def pair_labels(
    paths: list[Path],
    named_labels: frozenset[Path] = frozenset(),
    named_images: frozenset[Path] = frozenset(),
) -> NiftiPairing:
    """Splits NIfTI files into images, their candidate labels paired by name, and orphans.

    Args:
        paths: NIfTI files of one folder tree.
        named_labels: Label files named elsewhere (the manifest's), resolved: never images.
        named_images: Image files the manifest names: always images, never labels.

    Returns:
        The pairing. An image with several candidate labels is left for the caller to resolve
        (its manifest entry, else a rejection naming the candidates).
    """
    usable = [p for p in paths if p.resolve() not in named_labels]
    by_stem = {(p.parent, nifti_stem(p).casefold()): p for p in usable}
    labels: dict[Path, list[Path]] = {}
    missing: dict[Path, str] = {}
    for path in usable:
        prefix = label_prefix(path)
        if prefix is None or path in named_images:
            continue
        image = by_stem.get((path.parent, prefix.casefold()))
        if image is None:
            missing[path] = prefix + nifti_extension(path)
        else:
            labels.setdefault(image, []).append(path)
    orphans = {path: name for path, name in missing.items() if path not in labels}
    candidates = {label for found in labels.values() for label in found}
    images = [p for p in usable if p not in candidates and p not in orphans]
    return NiftiPairing(
        images=images,
        labels={image: sorted(found) for image, found in labels.items() if image in images},
        orphans=orphans,
    )


def load_nifti_image(path: Path) -> nib.Nifti1Image:
    """Loads and checks a NIfTI image, returning it canonical (RAS).

    Values are stored as int16 when every one is an integer that fits, else as float32 (the
    compaction DICOM series get).

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
    integral = bool(np.array_equal(values, np.rint(values)))
    return canonical(nifti_image(compact(values, integral), affine))
