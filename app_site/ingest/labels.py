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
from pydicom.dataset import Dataset

from app_site.ingest.frames import SEGMENTATION_SOP_CLASS
from app_site.ingest.series import SeriesDecision
from app_site.ingest.volume import canonical, nifti_image, regularize, series_affine_ras

#: Label values a tumour label may hold: background, necrotic core, edema, enhancing tumour.
LABEL_VALUES = frozenset({0, 1, 2, 3})

#: A SEG frame lies in a series slice's plane when its orientation cosines differ by at most
#: this much, and its position lies at most this many pixels in-plane off the slice's.
_ORIENTATION_TOLERANCE = 1e-3
_MAX_OFFSET_PIXELS = 0.25


class LabelError(Exception):
    """A label that cannot be used for its image; the message says why."""


class SegmentationMismatch(LabelError):
    """A DICOM SEG drawn on other planes than a series group's: it labels another group."""


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
    the same position. A SEG drawn on other planes (another orientation, or shifted in-plane)
    labels another group of frames that shares the series UID, and is not applied here.

    Args:
        segmentation: The SEG object.
        decision: The accepted series it references.

    Returns:
        uint8 label on the series' grid, in the voxel order and with the affine of
        :func:`app_site.ingest.volume.load_series` (not yet canonical).

    Raises:
        SegmentationMismatch: If the SEG's frames do not lie in the planes of the series' slices.
        LabelError: If the SEG is unreadable, does not fit the series or holds unexpected
            segments.
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
    groups = dataset.get("PerFrameFunctionalGroupsSequence") or []
    if len(groups) != len(masks):
        raise LabelError(f"{name}: {len(groups)} per-frame groups for {len(masks)} SEG frames")
    shared = (dataset.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
    try:
        planes = [_plane(group, shared, name, number) for number, group in enumerate(groups, 1)]
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as error:
        raise LabelError(f"{name}: malformed DICOM SEG ({type(error).__name__})") from error
    mismatch = _plane_mismatch(planes, decision)
    if mismatch:
        raise SegmentationMismatch(f"DICOM SEG {name} not applied: {mismatch}")
    first = decision.frames[0]
    if masks.shape[1:] != (first.rows, first.columns):
        raise LabelError(
            f"{name}: SEG frames are {masks.shape[1:]}, series is {(first.rows, first.columns)}"
        )
    positions = [position for _, position in planes]
    try:
        stacked = _rasterize(groups, masks, positions, decision, name)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as error:
        raise LabelError(f"{name}: malformed DICOM SEG ({type(error).__name__})") from error
    return nifti_image(regularize(stacked, decision, nearest=True), series_affine_ras(decision))


def _plane(
    group: Dataset, shared: Dataset, name: str, number: int
) -> tuple[np.ndarray, np.ndarray]:
    """ImageOrientationPatient and ImagePositionPatient of SEG frame ``number`` (1-based).

    The orientation is read from the frame's own functional group, else the shared one.

    Raises:
        LabelError: If a value is NaN or infinite.
        ValueError: If a value does not have 6 (orientation) or 3 (position) entries.
    """
    plane = (group if "PlaneOrientationSequence" in group else shared).PlaneOrientationSequence[0]
    orientation = np.asarray(plane.ImageOrientationPatient, dtype=np.float64)
    position = np.asarray(group.PlanePositionSequence[0].ImagePositionPatient, dtype=np.float64)
    if orientation.shape != (6,) or position.shape != (3,):
        raise ValueError("plane orientation or position malformed")
    if not (np.all(np.isfinite(orientation)) and np.all(np.isfinite(position))):
        raise LabelError(f"{name}: frame {number} orientation or position holds NaN or infinity")
    return orientation, position


def _plane_mismatch(planes: list[tuple[np.ndarray, np.ndarray]], decision: SeriesDecision) -> str:
    """Why SEG frames (orientation, position) do not lie in the series' slice planes ('' if so).

    Each frame must share the series' orientation and lie on the line along the slice normal
    through the nearest slice (up to a quarter pixel), wherever it lies along that normal.
    """
    first = decision.frames[0]
    expected = np.r_[first.row_direction, first.column_direction]
    normal = first.normal
    positions = np.array([frame.position for frame in decision.frames])
    heights = positions @ normal
    tolerance = _MAX_OFFSET_PIXELS * min(first.pixel_spacing)
    for number, (orientation, position) in enumerate(planes, start=1):
        if np.max(np.abs(orientation - expected)) > _ORIENTATION_TOLERANCE:
            return (
                f"its frame {number} is oriented {_rounded(orientation)}, this group's slices "
                f"{_rounded(expected)}"
            )
        offset = position - positions[np.argmin(np.abs(heights - position @ normal))]
        in_plane = float(np.linalg.norm(offset - (offset @ normal) * normal))
        if in_plane > tolerance:
            return f"its frame {number} lies {in_plane:.3g} mm in-plane off this group's slices"
    return ""


def _rounded(values: np.ndarray) -> list[float]:
    return (np.round(values, 3) + 0.0).tolist()


def _rasterize(
    groups: list[Dataset],
    masks: np.ndarray,
    positions: list[np.ndarray],
    decision: SeriesDecision,
    name: str,
) -> np.ndarray:
    """Places each SEG frame on the series slice at its position; returns ``[i, j, frame]``."""
    first = decision.frames[0]
    normal = first.normal
    heights = np.array([frame.position @ normal for frame in decision.frames])
    spacing = float(np.min(np.diff(heights))) if len(heights) > 1 else 1.0
    stacked = np.zeros((first.columns, first.rows, len(decision.frames)), dtype=np.uint8)
    for number, (group, mask, position) in enumerate(
        zip(groups, masks, positions, strict=True), start=1
    ):
        segment = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        check_label_values(np.array([segment]), f"{name} segment {segment}")
        height = float(position @ normal)
        k = int(np.argmin(np.abs(heights - height)))
        if abs(heights[k] - height) > 0.01 * spacing:
            raise LabelError(
                f"{name}: frame {number} lies at {height:.2f} mm along the normal, where the "
                "series has no slice"
            )
        stacked[:, :, k][mask.T > 0] = segment
    return stacked
