"""Foreground masks that need no label, so the same mask is available at training and inference.

Shape convention: ``(C, H, W[, D])`` channel-first arrays; the mask is computed from the first
channel and returned as a boolean array of the spatial shape.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: Mask methods: ``otsu`` thresholds at Otsu's level; ``head`` fills the holes of that slice by
#: slice (along the last axis), keeps the largest connected component and fills its holes;
#: ``brain`` keeps the part of the head deeper than ``BRAIN_DEPTH_MM`` from its surface,
#: dropping scalp and skull; ``nonzero`` keeps voxels different from zero.
MASK_METHODS = ("otsu", "head", "brain", "nonzero")

#: Depth below the head surface where the ``brain`` mask starts: scalp, skull and the CSF
#: around the brain are about this thick in adults.
BRAIN_DEPTH_MM = 20.0


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold: the level that maximizes the between-class variance of a histogram.

    Args:
        values: Intensities (any shape).
        bins: Histogram bins.

    Returns:
        The threshold; the minimum when all values are equal.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return low
    counts, edges = np.histogram(values, bins=bins, range=(low, high))
    centres = (edges[:-1] + edges[1:]) / 2.0
    weight_below = np.cumsum(counts)
    weight_above = weight_below[-1] - weight_below
    sum_below = np.cumsum(counts * centres)
    mean_below = sum_below / np.maximum(weight_below, 1)
    mean_above = (sum_below[-1] - sum_below) / np.maximum(weight_above, 1)
    between = weight_below * weight_above * (mean_below - mean_above) ** 2
    return float(centres[int(np.argmax(between))])


def foreground_mask(
    image: np.ndarray, method: str = "head", spacing: tuple[float, ...] | None = None
) -> np.ndarray:
    """Computes a label-free foreground mask of a channel-first image.

    Args:
        image: ``(C, *spatial)`` array; the first channel is used. A MONAI ``MetaTensor``
            supplies its voxel spacing.
        method: One of :data:`MASK_METHODS`.
        spacing: Voxel spacing in millimetres (default: the MetaTensor's, else 1 mm).

    Returns:
        Boolean mask of the spatial shape; never empty (a ``brain`` mask too small falls back
        to the head, an empty mask to all voxels).

    Raises:
        ValueError: For an unknown method.
    """
    if method not in MASK_METHODS:
        raise ValueError(f"mask method must be one of {MASK_METHODS}, got {method!r}")
    if spacing is None:
        pixdim = getattr(image, "pixdim", None)
        spacing = tuple(float(s) for s in pixdim) if pixdim is not None else None
    channel = np.asarray(image[0], dtype=np.float32)
    if method == "nonzero":
        mask = channel != 0
    else:
        mask = channel > otsu_threshold(channel)
        if method in ("head", "brain"):
            mask = _largest_component(_fill_holes_by_slice(mask))
            mask = ndimage.binary_fill_holes(mask)
        if method == "brain":
            depth = ndimage.distance_transform_edt(mask, sampling=spacing or 1.0)
            deep = depth > BRAIN_DEPTH_MM
            mask = deep if deep.any() else mask  # a head too small for the depth: keep it all
    if not mask.any():
        return np.ones(channel.shape, dtype=bool)
    return mask


def _fill_holes_by_slice(mask: np.ndarray) -> np.ndarray:
    """Fills the holes of each slice along the last axis.

    The bright scalp is a closed ring in every slice across the head, so filling it joins the
    brain to the scalp even where dark skull and CSF lie below the threshold between them. A
    3-D fill would not: the scalp is an open shell wherever the field of view cuts the head.
    Without this, the largest component is the brain alone on scanners whose skull and CSF
    are dark enough, the head on the others, and a depth measured from its surface means
    different anatomy at different sites.
    """
    filled = np.empty_like(mask)
    for index in range(mask.shape[-1]):
        filled[..., index] = ndimage.binary_fill_holes(mask[..., index])
    return filled


def _largest_component(mask: np.ndarray) -> np.ndarray:
    components, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(np.argmax(sizes))
