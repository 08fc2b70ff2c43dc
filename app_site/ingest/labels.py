"""Tumour labels for ingested images: NIfTI files named in a manifest, or DICOM SEG objects.

Either way the label ends up on the image's own voxel grid, or is refused with the reason:
a label is never resampled onto an image it does not match.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom

from app_site.ingest.frames import SEGMENTATION_SOP_CLASS
from app_site.ingest.series import SeriesDecision
from app_site.ingest.volume import canonical, nifti_image, regularize, series_affine_ras

#: Label values a tumour label may hold: background, necrotic core, edema, enhancing tumour.
LABEL_VALUES = frozenset({0, 1, 2, 3})


class LabelError(Exception):
    """A label that cannot be used for its image; the message says why."""


@dataclass(frozen=True)
class SegmentationObject:
    """A DICOM SEG file and the series it segments."""

    path: Path
    referenced_series_uid: str


def check_label_values(values: np.ndarray, source: str) -> np.ndarray:
    """Checks a label array holds only tumour label values and returns it as uint8.

    Args:
        values: Label array.
        source: Where it came from, for the error message.

    Returns:
        The array as ``uint8``.

    Raises:
        LabelError: If values are not finite integers in :data:`LABEL_VALUES`.
    """
    if not np.all(np.isfinite(values)):
        raise LabelError(f"{source}: label holds NaN or infinite values")
    if not np.array_equal(values, np.round(values)):
        raise LabelError(f"{source}: label holds non-integer values")
    found = {int(v) for v in np.unique(values)}
    unexpected = sorted(found - LABEL_VALUES)
    if unexpected:
        raise LabelError(
            f"{source}: label values {unexpected} are not tumour labels "
            f"{sorted(LABEL_VALUES)} (0 background, 1 necrotic core, 2 edema, 3 enhancing)"
        )
    return values.astype(np.uint8)


def label_from_nifti(path: Path, image: nib.Nifti1Image) -> nib.Nifti1Image:
    """Loads a NIfTI label and checks it lies on the image's grid.

    Both must already be canonical (RAS) so that a label saved in another axis order still
    matches.

    Args:
        path: Label file.
        image: The canonical image it labels.

    Returns:
        The label as uint8, with the image's affine.

    Raises:
        LabelError: If the file is unreadable, or its shape, affine or values do not fit.
    """
    try:
        label = canonical(nib.load(path))
        values = np.asanyarray(label.dataobj)
    except Exception as error:  # nibabel and zlib raise many types for broken files
        raise LabelError(f"{path.name}: label unreadable ({type(error).__name__})") from error
    if values.ndim == 4 and values.shape[3] == 1:
        values = values[..., 0]
    if values.shape != image.shape:
        raise LabelError(f"{path.name}: label shape {values.shape} != image shape {image.shape}")
    tolerance = 0.01 * float(np.min(image.header.get_zooms()[:3]))
    mismatch = float(np.max(np.abs(label.affine - image.affine)))
    if mismatch > tolerance:
        raise LabelError(
            f"{path.name}: label affine differs from the image's by up to {mismatch:.3g} mm; "
            "the label must be saved in the series' geometry"
        )
    return nifti_image(check_label_values(values, path.name), image.affine)


def label_from_segmentation(
    segmentation: SegmentationObject, decision: SeriesDecision
) -> nib.Nifti1Image:
    """Rasterizes a DICOM SEG onto an accepted series' frames, then its regular grid.

    Segment number n becomes label value n; each SEG frame is placed on the series frame at
    the same position.

    Args:
        segmentation: The SEG object.
        decision: The accepted series it references.

    Returns:
        uint8 label on the series' grid, in the voxel order and with the affine of
        :func:`app_site.ingest.volume.load_series` (not yet canonical).

    Raises:
        LabelError: If the SEG does not fit the series or holds unexpected segments.
    """
    name = segmentation.path.name
    try:
        dataset = pydicom.dcmread(segmentation.path)
        masks = dataset.pixel_array
    except Exception as error:  # pydicom raises many types for broken files
        raise LabelError(f"{name}: DICOM SEG unreadable ({type(error).__name__})") from error
    if str(dataset.SOPClassUID) != SEGMENTATION_SOP_CLASS:
        raise LabelError(f"{name}: not a DICOM SEG object")
    masks = masks[None] if masks.ndim == 2 else masks
    first = decision.frames[0]
    if masks.shape[1:] != (first.rows, first.columns):
        raise LabelError(
            f"{name}: SEG frames are {masks.shape[1:]}, series is {(first.rows, first.columns)}"
        )
    normal = first.normal
    heights = np.array([f.position @ normal for f in decision.frames])
    spacing = float(np.min(np.diff(heights))) if len(heights) > 1 else 1.0
    stacked = np.zeros((first.columns, first.rows, len(decision.frames)), dtype=np.uint8)
    groups = dataset.get("PerFrameFunctionalGroupsSequence") or []
    if len(groups) != len(masks):
        raise LabelError(f"{name}: {len(groups)} per-frame groups for {len(masks)} SEG frames")
    try:
        _rasterize(groups, masks, heights, normal, spacing, stacked, name)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as error:
        raise LabelError(f"{name}: malformed DICOM SEG ({type(error).__name__})") from error
    return nifti_image(regularize(stacked, decision, nearest=True), series_affine_ras(decision))


def _rasterize(groups, masks, heights, normal, spacing, stacked, name) -> None:
    """Places each SEG frame on the series slice at its position."""
    for number, group in enumerate(groups):
        segment = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        check_label_values(np.array([segment]), f"{name} segment {segment}")
        position = np.asarray(group.PlanePositionSequence[0].ImagePositionPatient, dtype=np.float64)
        k = int(np.argmin(np.abs(heights - position @ normal)))
        if abs(heights[k] - position @ normal) > 0.01 * spacing:
            raise LabelError(
                f"{name}: frame {number + 1} lies at {position @ normal:.2f} mm along the "
                "normal, where the series has no slice"
            )
        stacked[:, :, k][masks[number].T > 0] = segment
