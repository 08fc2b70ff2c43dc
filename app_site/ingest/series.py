"""What a group of frames is: which frames form one volume, and whether its geometry is sound.

Pure functions of frame headers. Frames are grouped by SeriesInstanceUID and, inside one UID,
by orientation (folders mix localizer planes, and scanners reuse UIDs across reformats). A
group is sorted by position along its slice normal (never by InstanceNumber or file name),
then accepted, rejected or skipped with a reason a site admin can act on.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from app_site.ingest.frames import Frame

ACCEPTED, REJECTED, SKIPPED = "accepted", "rejected", "skipped"

#: Fewest slices that make a volume; single images and localizers are skipped.
MIN_SLICES = 2

#: Largest in-plane drift of a slice, in pixels, that still counts as an orthogonal stack.
_MAX_DRIFT_PIXELS = 0.25

#: Frames closer than this along the normal are at the same position.
_SAME_POSITION_MM = 1e-3

#: Orientation cosines are compared after rounding to this many decimals.
_ORIENTATION_DECIMALS = 3

#: A series resampled onto uniform slices may hold at most this many times its acquired
#: slices, and never more than :data:`MAX_RESAMPLED_SLICES`: a larger grid means an outlier
#: slice position, not missing slices.
MAX_FILL_FACTOR = 64
MAX_RESAMPLED_SLICES = 2048


@dataclass(frozen=True)
class SeriesDecision:
    """The verdict on one group of frames.

    Attributes:
        series_uid: SeriesInstanceUID of the group.
        frames: The group's frames, sorted by position along the slice normal.
        status: ``accepted``, ``rejected`` or ``skipped``.
        reason: Why; for an accepted series, what was resampled ('' when nothing).
        slice_spacing: Distance between output slices in millimetres, when accepted.
        resampled: True when the frames do not lie on a regular orthogonal grid and were
            accepted only because resampling was asked for.
    """

    series_uid: str
    frames: tuple[Frame, ...]
    status: str
    reason: str
    slice_spacing: float | None = None
    resampled: bool = False


def group_frames(frames: Iterable[Frame]) -> list[list[Frame]]:
    """Groups frames by series UID and orientation, in a deterministic order.

    A series in which some frame's orientation holds NaN or infinity stays one group: its
    frames cannot be told apart by plane, and :func:`decide` rejects it.

    Args:
        frames: Frames from any number of files.

    Returns:
        Groups ordered by series UID, then orientation.
    """
    by_series: dict[str, list[Frame]] = defaultdict(list)
    for frame in frames:
        by_series[frame.series_uid].append(frame)
    groups = []
    for series_uid in sorted(by_series):
        members = by_series[series_uid]
        if not all(np.all(np.isfinite(_orientation(frame))) for frame in members):
            groups.append(members)
            continue
        by_orientation: dict[tuple, list[Frame]] = defaultdict(list)
        for frame in members:
            rounded = np.round(_orientation(frame), _ORIENTATION_DECIMALS) + 0.0  # no -0.0
            by_orientation[tuple(rounded)].append(frame)
        groups.extend(by_orientation[key] for key in sorted(by_orientation))
    return groups


def decide(
    frames: list[Frame],
    modality: str | None = None,
    resample_gaps: bool = False,
    resample_tilt: bool = False,
) -> SeriesDecision:
    """Decides whether a group of frames (one UID, one orientation) is a usable volume.

    A group whose position, orientation, pixel spacing or rescale holds NaN or infinity is
    rejected naming the tag, and so is one whose resampled grid would be absurdly large (more
    than :data:`MAX_FILL_FACTOR` times its slices, or :data:`MAX_RESAMPLED_SLICES`).

    Args:
        frames: The group.
        modality: Only this modality is accepted (``MR`` or ``CT``); ``None`` accepts any.
        resample_gaps: Accept missing slices and non-uniform spacing, to be resampled onto
            uniform slices at the median spacing.
        resample_tilt: Accept gantry tilt (slices shifted in-plane), to be resampled onto an
            orthogonal grid.

    Returns:
        The decision, with frames sorted by position along the slice normal (by file when
        their geometry holds NaN or infinity).
    """
    first = frames[0]
    non_finite = _non_finite_header(frames)
    if non_finite:
        by_file = sorted(frames, key=lambda f: (str(f.path), f.frame_number or 0))
        return SeriesDecision(first.series_uid, tuple(by_file), REJECTED, non_finite)
    normal = first.normal
    ordered = tuple(sorted(frames, key=lambda f: (float(f.position @ normal), str(f.path))))

    def verdict(status: str, reason: str) -> SeriesDecision:
        return SeriesDecision(first.series_uid, ordered, status, reason)

    if modality is not None and first.modality != modality:
        return verdict(SKIPPED, f"modality {first.modality or 'unknown'}, {modality} requested")
    for kind in ("LOCALIZER", "PROJECTION IMAGE"):
        if any(kind in frame.image_type for frame in frames):
            return verdict(SKIPPED, f"{kind.lower()} (ImageType {kind}), not a volume")
    if any("MOSAIC" in frame.image_type for frame in frames):
        return verdict(
            SKIPPED,
            "Siemens mosaic (slices tiled in one image) is not supported: export the series "
            "with one file per slice, or convert it with dcm2niix and ingest the NIfTI",
        )
    if len(frames) < MIN_SLICES:
        return verdict(SKIPPED, "single slice in this orientation: not a 3D volume")
    inconsistent = _inconsistent_matrix(ordered)
    if inconsistent:
        return verdict(REJECTED, inconsistent)

    positions = np.array([f.position for f in ordered])
    steps = np.diff(positions, axis=0)
    along_normal = steps @ normal
    same_position = np.flatnonzero(along_normal < _SAME_POSITION_MM)
    if same_position.size:
        first_pair = ordered[same_position[0]], ordered[same_position[0] + 1]
        return verdict(
            REJECTED,
            f"{same_position.size} frame(s) share a slice position with another (several "
            "echoes, phases or time points in one series), first at "
            f"{' and '.join(_frame_name(frame) for frame in first_pair)}; split the series "
            "before ingesting",
        )
    spacing = float(np.median(along_normal))
    problems = []
    tilt = _tilt_problem(positions, normal, spacing, min(first.pixel_spacing))
    if tilt:
        if not resample_tilt:
            return verdict(REJECTED, f"{tilt}; --resample-tilt resamples it to an orthogonal grid")
        problems.append(tilt)
    heights = positions @ normal
    gaps = _spacing_problem(heights, along_normal, spacing)
    if gaps:
        if not resample_gaps:
            return verdict(REJECTED, f"{gaps}; --resample-gaps resamples it to uniform slices")
        problems.append(gaps)
    if problems:
        oversized = _oversized_grid(heights, spacing)
        if oversized:
            return verdict(REJECTED, oversized)
        reason = "resampled: " + "; ".join(problems)
        return SeriesDecision(first.series_uid, ordered, ACCEPTED, reason, spacing, True)
    return SeriesDecision(first.series_uid, ordered, ACCEPTED, "", float(np.mean(along_normal)))


def _frame_name(frame: Frame) -> str:
    """A frame's file name, with its frame number in a multi-frame file."""
    if frame.frame_number is None:
        return frame.path.name
    return f"{frame.path.name} frame {frame.frame_number + 1}"


def _orientation(frame: Frame) -> np.ndarray:
    """A frame's six ImageOrientationPatient values."""
    return np.r_[frame.row_direction, frame.column_direction]


def _non_finite_header(frames: list[Frame]) -> str:
    """Names a geometry or rescale tag holding NaN or infinity in some frame ('' if none)."""
    for tag, values in (
        ("ImageOrientationPatient", _orientation),
        ("ImagePositionPatient", lambda frame: frame.position),
        ("PixelSpacing", lambda frame: frame.pixel_spacing),
        (
            "RescaleSlope or RescaleIntercept",
            lambda frame: (frame.rescale_slope, frame.rescale_intercept),
        ),
    ):
        bad = [frame for frame in frames if not np.all(np.isfinite(values(frame)))]
        if bad:
            return (
                f"{tag} holds NaN or infinite values in {len(bad)} of {len(frames)} frame(s), "
                f"first in {bad[0].path.name}"
            )
    return ""


def _oversized_grid(heights: np.ndarray, spacing: float) -> str:
    """Describes a uniform grid through sorted slice heights that would be absurdly large.

    Returns '' when the grid holds at most :data:`MAX_FILL_FACTOR` times the acquired slices
    and at most :data:`MAX_RESAMPLED_SLICES`.
    """
    count = float(heights[-1] - heights[0]) / spacing + 1
    limit = min(MAX_RESAMPLED_SLICES, MAX_FILL_FACTOR * len(heights))
    if count <= limit:
        return ""
    return (
        f"resampling would spread {len(heights)} slices over {count:.4g} slices of "
        f"{spacing:.4g} mm ({float(heights[0]):.2f} to {float(heights[-1]):.2f} mm), more than "
        f"the {limit} allowed: check the ImagePositionPatient of the outlying slices"
    )


def _inconsistent_matrix(frames: tuple[Frame, ...]) -> str:
    """Describes differing rows, columns or pixel spacing inside a group ('' if none)."""
    for name, values in (
        ("rows", {f.rows for f in frames}),
        ("columns", {f.columns for f in frames}),
        ("pixel spacing", {tuple(round(s, 4) for s in f.pixel_spacing) for f in frames}),
    ):
        if len(values) > 1:
            return f"inconsistent {name} inside the series: {sorted(values)}"
    return ""


def _tilt_problem(
    positions: np.ndarray, normal: np.ndarray, spacing: float, pixel_spacing: float
) -> str:
    """Describes slices that drift in-plane along the series ('' if none).

    A slice counts as drifted when it lies more than a quarter pixel away from the line along
    the normal through the first slice: header rounding stays far below that, while a real
    gantry tilt soon exceeds it.
    """
    relative = positions - positions[0]
    heights = relative @ normal
    in_plane = relative - np.outer(heights, normal)
    if np.max(np.linalg.norm(in_plane, axis=1)) <= _MAX_DRIFT_PIXELS * pixel_spacing:
        return ""
    shift = float(np.median(np.linalg.norm(np.diff(in_plane, axis=0), axis=1)))
    angle = math.degrees(math.atan2(shift, spacing))
    return (
        f"sheared geometry (gantry tilt about {angle:.1f} degrees): slices shift "
        f"{shift:.3g} mm in-plane per slice"
    )


def _spacing_problem(heights: np.ndarray, along_normal: np.ndarray, spacing: float) -> str:
    """Describes missing slices or non-uniform spacing ('' if spacing is uniform)."""
    tolerance = max(0.01, 0.01 * spacing)
    if np.max(np.abs(along_normal - spacing)) <= tolerance:
        return ""
    multiples = along_normal / spacing
    if np.all(np.abs(multiples - np.round(multiples)) * spacing <= tolerance):
        gaps = [
            f"{heights[k]:.2f} to {heights[k + 1]:.2f} mm ({round(m) - 1} missing)"
            for k, m in enumerate(multiples)
            if round(m) > 1
        ]
        return f"missing slices (spacing {spacing:.4g} mm), gaps at " + "; ".join(gaps)
    return (
        f"non-uniform slice spacing: {float(along_normal.min()):.4g} to "
        f"{float(along_normal.max()):.4g} mm"
    )
