"""Acquisition grids: where each voxel of a simulated series lies in patient space.

Conventions (shared by the DICOM writer and the NIfTI label writer, so both describe one grid):

* Volumes are numpy arrays indexed ``[k, j, i]``: slice, row, column (the order SimpleITK's
  ``GetArrayFromImage`` returns and the order DICOM stores one slice as ``[row, column]``).
* ``direction`` holds the unit vectors of the ``i`` (along a row), ``j`` (down a column) and ``k``
  (slice normal) axes as its columns, in DICOM's patient frame LPS (x to the patient's left,
  y to posterior, z to superior).
* ``spacing`` is ``(di, dj, dk)`` in millimetres; ``origin`` is the LPS centre of voxel (0, 0, 0).

Every number that ends up in a DICOM decimal string is a short exact decimal (direction cosines
such as 0.96 and 0.28, spacings in micrometres, origins in tenths of a millimetre), so slice
positions are exact decimals too and the geometry a reader recovers from the DICOM tags is the
geometry the label was written with.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Decimals of a millimetre kept in voxel spacings.
SPACING_DECIMALS = 3

#: Decimals of a millimetre kept in positions: enough to hold exact products of spacings and
#: two-decimal direction cosines, so rounding only removes binary floating-point noise.
POSITION_DECIMALS = 6

#: Converts LPS coordinates to RAS (NIfTI's world frame) and back.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def rotation(cos_angle: float, sin_angle: float, axis: int) -> np.ndarray:
    """Rotation about one patient axis (0: left-right, 1: anterior-posterior, 2: head-foot).

    Passing the cosine and sine rather than an angle lets callers use exact decimals
    (for example 0.96 and 0.28, a 16.26 degree tilt) that survive DICOM's decimal strings.

    Args:
        cos_angle: Cosine of the angle.
        sin_angle: Sine of the angle; ``cos_angle**2 + sin_angle**2`` must be 1.
        axis: Axis to rotate about.

    Returns:
        A 3x3 rotation matrix.

    Raises:
        ValueError: If cosine and sine do not describe an angle or the axis is not 0, 1 or 2.
    """
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
    if not np.isclose(cos_angle**2 + sin_angle**2, 1.0, atol=1e-12):
        raise ValueError(f"cos {cos_angle} and sin {sin_angle} do not describe an angle")
    first, second = [a for a in range(3) if a != axis]
    matrix = np.eye(3)
    matrix[first, first] = matrix[second, second] = cos_angle
    matrix[first, second] = -sin_angle
    matrix[second, first] = sin_angle
    return matrix


@dataclass(frozen=True)
class AcquisitionGrid:
    """The voxel grid of one simulated series.

    Attributes:
        shape: Number of voxels ``(ni, nj, nk)``: columns, rows, slices.
        spacing: Voxel size ``(di, dj, dk)`` in millimetres.
        direction: 3x3 matrix whose columns are the LPS unit vectors of the i, j, k axes.
        origin: LPS position of the centre of voxel (0, 0, 0), in millimetres.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    direction: np.ndarray
    origin: np.ndarray

    @classmethod
    def centred(
        cls,
        shape: tuple[int, int, int],
        spacing: tuple[float, float, float],
        direction: np.ndarray,
        centre: np.ndarray,
    ) -> AcquisitionGrid:
        """Builds a grid whose centre lies near ``centre`` (origin rounded to 0.1 mm).

        Args:
            shape: Voxels along i, j, k.
            spacing: Voxel size along i, j, k in millimetres (rounded to micrometres).
            direction: Columns are the LPS unit vectors of i, j, k.
            centre: LPS point the middle of the grid should cover.

        Returns:
            The grid.

        Raises:
            ValueError: If a dimension is smaller than 2 voxels, a spacing is not positive or
                the direction is not a rotation.
        """
        if min(shape) < 2:
            raise ValueError(f"a grid needs at least 2 voxels along each axis, got {shape}")
        rounded_spacing = tuple(round(float(s), SPACING_DECIMALS) for s in spacing)
        if min(rounded_spacing) <= 0:
            raise ValueError(f"voxel spacing must be positive, got {spacing}")
        direction = np.asarray(direction, dtype=np.float64)
        if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-12) or not np.isclose(
            np.linalg.det(direction), 1.0
        ):
            raise ValueError("direction must be a proper rotation matrix")
        half_extent = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0 * rounded_spacing
        origin = np.round(np.asarray(centre, dtype=np.float64) - direction @ half_extent, 1)
        return cls(tuple(int(n) for n in shape), rounded_spacing, direction, origin)

    @property
    def array_shape(self) -> tuple[int, int, int]:
        """Shape of a volume on this grid as a ``[k, j, i]`` numpy array."""
        ni, nj, nk = self.shape
        return (nk, nj, ni)

    @property
    def affine_lps(self) -> np.ndarray:
        """4x4 matrix mapping voxel indices ``(i, j, k, 1)`` to LPS millimetres."""
        affine = np.eye(4)
        affine[:3, :3] = self.direction * np.asarray(self.spacing)
        affine[:3, 3] = self.origin
        return affine

    @property
    def affine_ras(self) -> np.ndarray:
        """4x4 matrix mapping voxel indices ``(i, j, k, 1)`` to RAS millimetres (NIfTI)."""
        affine = self.affine_lps
        affine[:3, :] = LPS_TO_RAS @ affine[:3, :]
        return affine

    @property
    def is_oblique(self) -> bool:
        """Whether any axis is tilted away from the patient axes."""
        return not np.allclose(np.abs(self.direction), np.round(np.abs(self.direction)))

    def slice_position(self, k: int) -> np.ndarray:
        """LPS position of the first voxel of slice ``k`` (DICOM ImagePositionPatient).

        Args:
            k: Slice index along the slice normal, 0-based.

        Returns:
            The position in millimetres.
        """
        position = self.origin + self.direction[:, 2] * (self.spacing[2] * k)
        return np.round(position, POSITION_DECIMALS)

    def world_points(self, dtype: type = np.float32) -> np.ndarray:
        """LPS coordinates of every voxel centre.

        Args:
            dtype: Floating type of the result.

        Returns:
            Array of shape ``(3, nk, nj, ni)``: x, y, z of each voxel.
        """
        nk, nj, ni = self.array_shape
        steps = self.direction * np.asarray(self.spacing)  # column a = step along axis a
        k, j, i = (np.arange(n, dtype=dtype) for n in (nk, nj, ni))
        points = np.empty((3, nk, nj, ni), dtype=dtype)
        for axis in range(3):
            points[axis] = (
                self.origin[axis]
                + steps[axis, 2] * k[:, None, None]
                + steps[axis, 1] * j[None, :, None]
                + steps[axis, 0] * i[None, None, :]
            )
        return points
