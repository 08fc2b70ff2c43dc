"""A random head with a brain tumour, defined in patient millimetres and sampled on any grid.

The subject is continuous: every structure is an ellipsoid or sphere whose boundary is pushed in
and out by smooth random fields (sums of plane waves). Sampling it on an acquisition grid, oblique
or not, gives the tissue map of that acquisition; the tumour label is derived from the same map,
so image and label agree voxel for voxel by construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from fedseg.synth.geometry import AcquisitionGrid, rotation


class Tissue(IntEnum):
    """Tissue classes of the phantom (evaluation ground truth; hospitals never have it)."""

    BACKGROUND = 0
    SCALP = 1
    SKULL = 2
    CSF = 3
    GREY_MATTER = 4
    WHITE_MATTER = 5
    VENTRICLE = 6
    NECROTIC_CORE = 7
    EDEMA = 8
    ENHANCING_TUMOUR = 9


#: Tumour label values written to ``labels/<case>.nii.gz`` (BraTS convention).
TUMOUR_LABELS: dict[Tissue, int] = {
    Tissue.NECROTIC_CORE: 1,
    Tissue.EDEMA: 2,
    Tissue.ENHANCING_TUMOUR: 3,
}

# Shells of the head, as fractions of the (perturbed) head ellipsoid's normalized radius.
_SCALP_INNER = 0.93
_SKULL_INNER = 0.86
_BRAIN_OUTER = 0.82
# Grey/white boundary, as a fraction of the brain's normalized radius, before gyral folding.
_CORTEX_INNER = 0.80


@dataclass(frozen=True)
class SmoothField:
    """A smooth random scalar field: a sum of plane waves over millimetre coordinates.

    Attributes:
        wave_vectors: ``(n, 3)`` angular wave vectors in radians per millimetre.
        phases: ``(n,)`` phases in radians.
        amplitudes: ``(n,)`` amplitude of each wave.
    """

    wave_vectors: np.ndarray
    phases: np.ndarray
    amplitudes: np.ndarray

    @classmethod
    def random(
        cls,
        rng: np.random.Generator,
        n_waves: int,
        wavelength_mm: tuple[float, float],
        std: float,
    ) -> SmoothField:
        """Draws a field with wavelengths in a range and a given standard deviation.

        Args:
            rng: Source of randomness.
            n_waves: Number of plane waves; more gives a less regular pattern.
            wavelength_mm: Shortest and longest wavelength in millimetres.
            std: Standard deviation of the field over space.

        Returns:
            The field.
        """
        directions = rng.normal(size=(n_waves, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        wavelengths = rng.uniform(*wavelength_mm, size=n_waves)
        wave_vectors = directions * (2.0 * np.pi / wavelengths)[:, None]
        phases = rng.uniform(0.0, 2.0 * np.pi, size=n_waves)
        # A sum of n sinusoids of amplitude a has variance n * a**2 / 2.
        amplitudes = np.full(n_waves, std * np.sqrt(2.0 / n_waves))
        return cls(wave_vectors, phases, amplitudes)

    def __call__(self, points: np.ndarray) -> np.ndarray:
        """Evaluates the field.

        Args:
            points: ``(3, ...)`` coordinates in millimetres.

        Returns:
            Field values with the shape of ``points[0]`` and its dtype.
        """
        values = np.zeros(points.shape[1:], dtype=points.dtype)
        for wave_vector, phase, amplitude in zip(
            self.wave_vectors, self.phases, self.amplitudes, strict=True
        ):
            argument = (
                points[0] * wave_vector[0] + points[1] * wave_vector[1] + points[2] * wave_vector[2]
            )
            argument += phase
            values += amplitude * np.sin(argument)
        return values


@dataclass(frozen=True)
class Subject:
    """One simulated patient: head shape and pose, brain folding, ventricles and a tumour.

    Coordinates are in the head frame: LPS millimetres relative to ``head_centre``, rotated by
    ``head_rotation``.
    """

    head_centre: np.ndarray
    head_rotation: np.ndarray
    head_semi_axes: np.ndarray
    head_boundary: SmoothField
    gyral_folding: SmoothField
    ventricle_semi_axes: np.ndarray
    ventricle_boundary: SmoothField
    tumour_centre: np.ndarray
    tumour_radius_mm: float
    necrosis_fraction: float
    edema_extent: float
    tumour_boundary: SmoothField
    edema_boundary: SmoothField

    @classmethod
    def random(cls, rng: np.random.Generator, tumour_radius_mm: float) -> Subject:
        """Draws a subject.

        Args:
            rng: Source of randomness.
            tumour_radius_mm: Radius of the enhancing tumour (its edema reaches further).

        Returns:
            The subject.
        """
        yaw, pitch = np.deg2rad(rng.uniform(-5.0, 5.0, size=2))
        head_rotation = rotation(np.cos(yaw), np.sin(yaw), axis=2) @ rotation(
            np.cos(pitch), np.sin(pitch), axis=0
        )
        head_semi_axes = np.array([72.0, 92.0, 84.0]) * rng.uniform(0.94, 1.06, size=3)
        brain_semi_axes = head_semi_axes * _BRAIN_OUTER
        # Tumour centre: a random direction, well inside the brain, so that most of it fits.
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        depth = rng.uniform(0.15, 0.55)
        tumour_centre = direction * depth * brain_semi_axes
        necrotic = rng.uniform() < 0.8
        return cls(
            head_centre=rng.normal(0.0, 4.0, size=3),
            head_rotation=head_rotation,
            head_semi_axes=head_semi_axes,
            head_boundary=SmoothField.random(rng, 6, (60.0, 160.0), 0.02),
            gyral_folding=SmoothField.random(rng, 10, (14.0, 30.0), 0.06),
            ventricle_semi_axes=np.array([5.0, 20.0, 9.0]) * rng.uniform(0.8, 1.25, size=3),
            ventricle_boundary=SmoothField.random(rng, 4, (20.0, 50.0), 0.08),
            tumour_centre=tumour_centre,
            tumour_radius_mm=float(tumour_radius_mm),
            necrosis_fraction=float(rng.uniform(0.35, 0.65)) if necrotic else 0.0,
            edema_extent=float(rng.uniform(1.4, 2.1)),
            tumour_boundary=SmoothField.random(rng, 6, (12.0, 40.0), 0.10),
            edema_boundary=SmoothField.random(rng, 6, (15.0, 50.0), 0.15),
        )

    def head_frame(self, world_points: np.ndarray) -> np.ndarray:
        """Maps LPS points into the head frame.

        Args:
            world_points: ``(3, ...)`` LPS millimetres.

        Returns:
            ``(3, ...)`` head-frame millimetres, same dtype.
        """
        centred = world_points - self.head_centre.astype(world_points.dtype).reshape(
            (3,) + (1,) * (world_points.ndim - 1)
        )
        rotation = self.head_rotation.T.astype(world_points.dtype)
        return np.tensordot(rotation, centred, axes=1)

    def tissue_map(self, grid: AcquisitionGrid) -> np.ndarray:
        """Samples the subject's tissues on an acquisition grid.

        Args:
            grid: Where the voxels lie.

        Returns:
            ``uint8`` array of :class:`Tissue` values, indexed ``[k, j, i]``.
        """
        points = self.head_frame(grid.world_points())
        head_radius = _ellipsoid_radius(points, self.head_semi_axes)
        head_radius *= 1.0 + self.head_boundary(points)
        tissues = np.full(grid.array_shape, Tissue.BACKGROUND, dtype=np.uint8)
        tissues[head_radius <= 1.0] = Tissue.SCALP
        tissues[head_radius <= _SCALP_INNER] = Tissue.SKULL
        tissues[head_radius <= _SKULL_INNER] = Tissue.CSF
        brain = head_radius <= _BRAIN_OUTER
        tissues[brain] = Tissue.GREY_MATTER
        brain_radius = head_radius / _BRAIN_OUTER + self.gyral_folding(points)
        tissues[brain & (brain_radius <= _CORTEX_INNER)] = Tissue.WHITE_MATTER
        self._paint_deep_structures(points, tissues)
        self._paint_tumour(points, brain, tissues)
        return tissues

    def _paint_deep_structures(self, points: np.ndarray, tissues: np.ndarray) -> None:
        """Adds the lateral ventricles and the deep grey nuclei beside them."""
        boundary = 1.0 + self.ventricle_boundary(points)
        for side in (-1.0, 1.0):
            nucleus_centre = np.array([side * 16.0, 2.0, 0.0])
            nucleus = _ellipsoid_radius(points - _column(nucleus_centre, points), [9.0, 14.0, 11.0])
            tissues[nucleus * boundary <= 1.0] = Tissue.GREY_MATTER
        for side in (-1.0, 1.0):
            ventricle_centre = np.array([side * (self.ventricle_semi_axes[0] + 2.0), 0.0, 10.0])
            ventricle = _ellipsoid_radius(
                points - _column(ventricle_centre, points), self.ventricle_semi_axes
            )
            tissues[ventricle * boundary <= 1.0] = Tissue.VENTRICLE

    def _paint_tumour(self, points: np.ndarray, brain: np.ndarray, tissues: np.ndarray) -> None:
        """Adds edema, enhancing rim and necrotic core, kept inside the brain."""
        offset = points - _column(self.tumour_centre, points)
        distance = np.sqrt(np.einsum("a...,a...->...", offset, offset))
        edema_radius = distance / (self.tumour_radius_mm * self.edema_extent)
        edema_radius *= 1.0 + self.edema_boundary(points)
        tumour_radius = distance / self.tumour_radius_mm
        tumour_radius *= 1.0 + self.tumour_boundary(points)
        tissues[brain & (edema_radius <= 1.0)] = Tissue.EDEMA
        tissues[brain & (tumour_radius <= 1.0)] = Tissue.ENHANCING_TUMOUR
        tissues[brain & (tumour_radius <= self.necrosis_fraction)] = Tissue.NECROTIC_CORE


def tumour_label(tissues: np.ndarray) -> np.ndarray:
    """Derives the tumour label (0 background, 1 necrotic core, 2 edema, 3 enhancing).

    Args:
        tissues: Tissue map as returned by :meth:`Subject.tissue_map`.

    Returns:
        ``uint8`` label array of the same shape.
    """
    lookup = np.zeros(len(Tissue), dtype=np.uint8)
    for tissue, value in TUMOUR_LABELS.items():
        lookup[tissue] = value
    return lookup[tissues]


def _ellipsoid_radius(points: np.ndarray, semi_axes: np.ndarray | list[float]) -> np.ndarray:
    """Normalized ellipsoid radius: 1 on the surface of the ellipsoid centred at 0."""
    squared = np.zeros(points.shape[1:], dtype=points.dtype)
    for axis in range(3):
        squared += (points[axis] / semi_axes[axis]) ** 2
    return np.sqrt(squared)


def _column(vector: np.ndarray, like: np.ndarray) -> np.ndarray:
    """Reshapes a 3-vector to broadcast against ``(3, ...)`` points of ``like``'s dtype."""
    return np.asarray(vector, dtype=like.dtype).reshape((3,) + (1,) * (like.ndim - 1))
