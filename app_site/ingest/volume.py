"""Turning an accepted group of frames into a canonical (RAS) NIfTI image."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from app_site.ingest.frames import UnreadableFileError, decode_frames
from app_site.ingest.series import SeriesDecision

#: Converts LPS (DICOM) coordinates to RAS (NIfTI) and back.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def series_affine_ras(decision: SeriesDecision) -> np.ndarray:
    """Voxel ``(i, j, k)`` to RAS millimetres, for a volume stacked in decision order.

    ``i`` runs along a row (columns), ``j`` down a column (rows), ``k`` along the slice normal.

    Args:
        decision: An accepted decision (its ``slice_spacing`` is set).

    Returns:
        4x4 affine.
    """
    first = decision.frames[0]
    row_spacing, column_spacing = first.pixel_spacing
    affine = np.eye(4)
    affine[:3, 0] = first.row_direction * column_spacing
    affine[:3, 1] = first.column_direction * row_spacing
    affine[:3, 2] = first.normal * decision.slice_spacing
    affine[:3, 3] = first.position
    return LPS_TO_RAS @ affine


def load_series(decision: SeriesDecision) -> nib.Nifti1Image:
    """Decodes, rescales and stacks the frames of an accepted series.

    Each file is decoded once; RescaleSlope/Intercept are applied per frame. Series accepted
    for resampling are interpolated (linearly) onto the regular grid of
    :func:`series_affine_ras`.

    Args:
        decision: An accepted decision.

    Returns:
        NIfTI image in the series' own voxel order (not yet canonical): int16 when every
        value is an integer that fits, float32 otherwise.

    Raises:
        UnreadableFileError: If a file's pixels cannot be decoded or have the wrong shape.
    """
    by_file: dict = defaultdict(list)
    for k, frame in enumerate(decision.frames):
        by_file[frame.path].append((k, frame))
    first = decision.frames[0]
    stacked = np.empty((first.columns, first.rows, len(decision.frames)), dtype=np.float32)
    for path, members in by_file.items():
        pixels = decode_frames(path, members[0][1].raw_pixels)
        for k, frame in members:
            index = frame.frame_number or 0
            if index >= len(pixels) or pixels[index].shape != (frame.rows, frame.columns):
                raise UnreadableFileError(
                    f"{path.name}: pixel data does not hold frame {index + 1} of "
                    f"{frame.rows}x{frame.columns}"
                )
            stored = pixels[index].astype(np.float32)
            stacked[:, :, k] = (stored * frame.rescale_slope + frame.rescale_intercept).T
    volume = regularize(stacked, decision, nearest=False)
    integral = not decision.resampled and all(
        float(f.rescale_slope).is_integer() and float(f.rescale_intercept).is_integer()
        for f in decision.frames
    )
    return nifti_image(compact(volume, integral), series_affine_ras(decision))


def compact(volume: np.ndarray, integral: bool) -> np.ndarray:
    """Stores an integer-valued volume as int16 when its values fit.

    Args:
        volume: Float values.
        integral: Whether every value is an integer (integral rescale, no interpolation).

    Returns:
        ``volume`` as int16 when integral and within int16's range, else unchanged.
    """
    limits = np.iinfo(np.int16)
    if integral and limits.min <= volume.min() and volume.max() <= limits.max:
        return volume.astype(np.int16)
    return volume


def regularize(stacked: np.ndarray, decision: SeriesDecision, nearest: bool) -> np.ndarray:
    """Moves frames stacked in decision order onto the series' regular orthogonal grid.

    A no-op for regular series. For series accepted for resampling, each slice is shifted
    in-plane back under the first slice (gantry tilt), then slices are interpolated at uniform
    heights along the normal (gaps, non-uniform spacing).

    Args:
        stacked: ``[i, j, frame]`` values in decision order.
        decision: The accepted decision.
        nearest: Nearest-neighbour interpolation (labels) instead of linear (images).

    Returns:
        ``[i, j, k]`` values on the grid of :func:`series_affine_ras`.
    """
    if not decision.resampled:
        return stacked
    first = decision.frames[0]
    normal = first.normal
    relative = np.array([f.position for f in decision.frames]) - first.position
    heights = relative @ normal
    in_plane = relative - np.outer(heights, normal)
    row_spacing, column_spacing = first.pixel_spacing
    order = 0 if nearest else 1
    background = float(stacked.min())
    aligned = np.empty_like(stacked)
    for k in range(stacked.shape[2]):
        shift = (
            float(in_plane[k] @ first.row_direction) / column_spacing,
            float(in_plane[k] @ first.column_direction) / row_spacing,
        )
        aligned[:, :, k] = ndimage.shift(
            stacked[:, :, k], shift, order=order, mode="constant", cval=background
        )
    count = round(float(heights[-1]) / decision.slice_spacing) + 1
    targets = np.arange(count) * decision.slice_spacing
    below = np.clip(np.searchsorted(heights, targets, side="right") - 1, 0, len(heights) - 2)
    weight = np.clip((targets - heights[below]) / (heights[below + 1] - heights[below]), 0, 1)
    if nearest:
        return aligned[:, :, np.where(weight < 0.5, below, below + 1)]
    weight = weight.astype(np.float32)
    return aligned[:, :, below] * (1 - weight) + aligned[:, :, below + 1] * weight


def canonical(image: nib.Nifti1Image) -> nib.Nifti1Image:
    """Reorients an image to the closest canonical RAS+ voxel order (flips and permutations).

    Args:
        image: Any NIfTI image.

    Returns:
        The image with axes ordered and flipped so that i, j, k run closest to R, A, S; an
        oblique image stays oblique (its affine keeps the tilt), no voxel is resampled.
    """
    reoriented = nib.as_closest_canonical(image)
    return nifti_image(np.asanyarray(reoriented.dataobj), reoriented.affine)


def nifti_image(volume: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """Wraps a volume as NIfTI with the affine in both qform and sform, units millimetres.

    Args:
        volume: ``[i, j, k]`` values.
        affine: Voxel to RAS millimetres.

    Returns:
        The image.
    """
    image = nib.Nifti1Image(np.ascontiguousarray(volume), affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    image.header.set_xyzt_units(xyz="mm")
    return image


def save_nifti_atomic(image: nib.Nifti1Image, path: Path) -> None:
    """Writes an image under a temporary name, then renames it into place.

    Args:
        image: The image.
        path: Destination (``.nii`` or ``.nii.gz``).
    """
    path = Path(path)
    temporary = path.with_name(f".tmp-{path.name}")
    nib.save(image, temporary)
    os.replace(temporary, path)
