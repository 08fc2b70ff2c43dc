"""Simulated hospitals: each site's scanner, acquisition protocol and patient population.

The site effect is what harmonization has to undo, so every stage of a real acquisition that
differs between sites differs here: grid (field of view, matrix, slice spacing, orientation),
slice-profile blur, receive-coil bias field, Rician noise, a monotone non-linear intensity
response with its own scale and offset, and integer storage with RescaleSlope/Intercept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from fedseg.synth.anatomy import SmoothField, Tissue
from fedseg.synth.geometry import AcquisitionGrid, rotation

#: T1-weighted post-contrast signal of each tissue relative to white matter.
TISSUE_SIGNAL: dict[Tissue, float] = {
    Tissue.BACKGROUND: 0.0,
    Tissue.SCALP: 1.10,
    Tissue.SKULL: 0.10,
    Tissue.CSF: 0.25,
    Tissue.GREY_MATTER: 0.72,
    Tissue.WHITE_MATTER: 1.00,
    Tissue.VENTRICLE: 0.22,
    Tissue.NECROTIC_CORE: 0.30,
    Tissue.EDEMA: 0.60,
    Tissue.ENHANCING_TUMOUR: 1.40,
}

_STORAGE_TYPES = {"uint16": np.uint16, "int16": np.int16}


@dataclass(frozen=True)
class ScannerProfile:
    """One site's scanner and acquisition protocol.

    Attributes:
        manufacturer: DICOM Manufacturer.
        model_name: DICOM ManufacturerModelName.
        field_strength_t: MagneticFieldStrength in tesla.
        orientation: ``axial``, ``sagittal`` or ``coronal`` base plane.
        tilt: ``(cos, sin)`` of an extra rotation about the left-right axis (oblique
            acquisition), or ``None``.
        fov_mm: In-plane field of view along the row direction, in millimetres.
        matrix_aspect: Rows divided by columns of the in-plane matrix.
        slice_spacing_factor: Slice spacing divided by in-plane pixel spacing.
        coverage_mm: Extent covered by the slices, in millimetres.
        in_plane_blur: Gaussian point-spread sigma in-plane, in voxels.
        slice_blur: Gaussian slice-profile sigma through-plane, in voxels.
        bias_std: Standard deviation of the log bias field.
        noise_std: Noise sigma relative to the white-matter signal.
        gamma: Exponent of the scanner's monotone intensity response.
        intensity_scale: Scale of the intensity response.
        intensity_offset: Offset of the intensity response.
        storage: Stored pixel type, ``uint16`` or ``int16``.
        rescale_slope: DICOM RescaleSlope.
        rescale_intercept: DICOM RescaleIntercept.
        descending_instances: InstanceNumber runs against slice position.
        shuffled_file_names: File names carry no slice order.
    """

    manufacturer: str
    model_name: str
    field_strength_t: float
    orientation: str
    tilt: tuple[float, float] | None
    fov_mm: float
    matrix_aspect: float
    slice_spacing_factor: float
    coverage_mm: float
    in_plane_blur: float
    slice_blur: float
    bias_std: float
    noise_std: float
    gamma: float
    intensity_scale: float
    intensity_offset: float
    storage: str
    rescale_slope: float
    rescale_intercept: float
    descending_instances: bool
    shuffled_file_names: bool

    def grid(self, size: int) -> AcquisitionGrid:
        """The acquisition grid of this protocol for a base matrix size.

        Args:
            size: Number of columns of the in-plane matrix; rows and slices follow from the
                protocol's aspect, slice spacing and coverage.

        Returns:
            The grid, centred on the scanner's isocentre.
        """
        columns = size
        rows = round(size * self.matrix_aspect)
        pixel_spacing = self.fov_mm / size
        slice_spacing = pixel_spacing * self.slice_spacing_factor
        slices = max(2, math.ceil(self.coverage_mm / slice_spacing))
        direction = _BASE_PLANES[self.orientation]
        if self.tilt is not None:
            direction = rotation(*self.tilt, axis=0) @ direction
        return AcquisitionGrid.centred(
            (columns, rows, slices),
            (pixel_spacing, pixel_spacing, slice_spacing),
            direction,
            np.zeros(3),
        )


@dataclass(frozen=True)
class PopulationProfile:
    """Who a site's patients are.

    Attributes:
        case_count_factor: Site's number of cases relative to the requested cases per site.
        tumour_radius_mm: Median radius of the enhancing tumour.
        tumour_radius_spread: Standard deviation of the log radius.
    """

    case_count_factor: float
    tumour_radius_mm: float
    tumour_radius_spread: float

    def case_count(self, cases_per_site: int) -> int:
        """Number of cases this site holds.

        Args:
            cases_per_site: The requested average number of cases per site.

        Returns:
            At least one case.
        """
        return max(1, math.floor(cases_per_site * self.case_count_factor + 0.5))

    def tumour_radius(self, rng: np.random.Generator) -> float:
        """Draws one tumour radius from the site's distribution, in millimetres."""
        return float(self.tumour_radius_mm * np.exp(rng.normal(0.0, self.tumour_radius_spread)))


@dataclass(frozen=True)
class SiteProfile:
    """A simulated hospital: its scanner and its patients."""

    scanner: ScannerProfile
    population: PopulationProfile


# Columns: LPS unit vectors of the row (i), column (j) and slice normal (k) axes.
_BASE_PLANES = {
    "axial": np.eye(3),
    "coronal": np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]]),
    "sagittal": np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]),
}

_SITE_PROFILES = (
    SiteProfile(
        ScannerProfile(
            manufacturer="SIEMENS",
            model_name="MAGNETOM Skyra",
            field_strength_t=3.0,
            orientation="axial",
            tilt=None,
            fov_mm=230.0,
            matrix_aspect=1.0,
            slice_spacing_factor=1.0,
            coverage_mm=190.0,
            in_plane_blur=0.3,
            slice_blur=0.5,
            bias_std=0.08,
            noise_std=0.02,
            gamma=1.0,
            intensity_scale=1800.0,
            intensity_offset=0.0,
            storage="uint16",
            rescale_slope=1.0,
            rescale_intercept=0.0,
            descending_instances=False,
            shuffled_file_names=False,
        ),
        PopulationProfile(case_count_factor=1.25, tumour_radius_mm=16.0, tumour_radius_spread=0.2),
    ),
    SiteProfile(
        ScannerProfile(
            manufacturer="GE MEDICAL SYSTEMS",
            model_name="SIGNA Artist",
            field_strength_t=1.5,
            orientation="axial",
            tilt=None,
            fov_mm=240.0,
            matrix_aspect=1.0,
            slice_spacing_factor=1.6,
            coverage_mm=190.0,
            in_plane_blur=0.5,
            slice_blur=0.8,
            bias_std=0.15,
            noise_std=0.05,
            gamma=0.7,
            intensity_scale=900.0,
            intensity_offset=40.0,
            storage="int16",
            rescale_slope=0.5,
            rescale_intercept=200.0,
            descending_instances=True,
            shuffled_file_names=False,
        ),
        PopulationProfile(case_count_factor=1.0, tumour_radius_mm=22.0, tumour_radius_spread=0.15),
    ),
    SiteProfile(
        ScannerProfile(
            manufacturer="Philips Medical Systems",
            model_name="Ingenia",
            field_strength_t=3.0,
            orientation="axial",
            tilt=(0.96, 0.28),
            fov_mm=220.0,
            matrix_aspect=0.875,
            slice_spacing_factor=1.2,
            coverage_mm=180.0,
            in_plane_blur=0.4,
            slice_blur=0.6,
            bias_std=0.12,
            noise_std=0.03,
            gamma=1.35,
            intensity_scale=2.4,
            intensity_offset=0.3,
            storage="uint16",
            rescale_slope=0.001,
            rescale_intercept=0.0,
            descending_instances=False,
            shuffled_file_names=True,
        ),
        PopulationProfile(case_count_factor=0.75, tumour_radius_mm=11.0, tumour_radius_spread=0.25),
    ),
    SiteProfile(
        ScannerProfile(
            manufacturer="CANON_MEC",
            model_name="Vantage Orian",
            field_strength_t=1.5,
            orientation="sagittal",
            tilt=None,
            fov_mm=240.0,
            matrix_aspect=1.0,
            slice_spacing_factor=1.1,
            coverage_mm=170.0,
            in_plane_blur=0.4,
            slice_blur=0.6,
            bias_std=0.2,
            noise_std=0.04,
            gamma=0.85,
            intensity_scale=3000.0,
            intensity_offset=100.0,
            storage="uint16",
            rescale_slope=2.0,
            rescale_intercept=0.0,
            descending_instances=True,
            shuffled_file_names=True,
        ),
        PopulationProfile(case_count_factor=1.0, tumour_radius_mm=19.0, tumour_radius_spread=0.3),
    ),
)


def site_profile(site_index: int, seed: int) -> SiteProfile:
    """The profile of the ``site_index``-th simulated hospital (0-based).

    The first four sites have fixed, distinct profiles (vendor, field strength, orientation,
    storage). Further sites reuse those scanners with their intensity response, noise, bias and
    tumour sizes redrawn from the seed, so every site stays distinct.

    Args:
        site_index: 0-based site number.
        seed: Seed of the whole simulation.

    Returns:
        The site's profile.
    """
    base = _SITE_PROFILES[site_index % len(_SITE_PROFILES)]
    if site_index < len(_SITE_PROFILES):
        return base
    rng = np.random.default_rng([seed, site_index, 0x5173])
    scanner = replace(
        base.scanner,
        gamma=round(float(base.scanner.gamma * rng.uniform(0.8, 1.25)), 3),
        intensity_scale=round(float(base.scanner.intensity_scale * rng.uniform(0.7, 1.4)), 4),
        noise_std=round(float(rng.uniform(0.02, 0.05)), 3),
        bias_std=round(float(rng.uniform(0.05, 0.2)), 3),
    )
    population = replace(
        base.population,
        tumour_radius_mm=round(float(rng.uniform(10.0, 22.0)), 1),
        case_count_factor=round(float(rng.uniform(0.75, 1.25)), 2),
    )
    return SiteProfile(scanner, population)


def acquire(
    tissues: np.ndarray,
    grid: AcquisitionGrid,
    scanner: ScannerProfile,
    rng: np.random.Generator,
) -> np.ndarray:
    """Simulates the scanner's image of a tissue map, as stored integers.

    Args:
        tissues: ``[k, j, i]`` tissue map on ``grid``.
        grid: The acquisition grid.
        scanner: The site's scanner profile.
        rng: Source of randomness (subject texture, bias field, noise).

    Returns:
        Stored pixel values ``[k, j, i]`` of the scanner's storage type; the physical value is
        ``stored * rescale_slope + rescale_intercept``.
    """
    signal_table = np.array([TISSUE_SIGNAL[t] for t in Tissue], dtype=np.float32)
    signal_table *= rng.uniform(0.97, 1.03, size=len(Tissue)).astype(np.float32)
    signal = signal_table[tissues]
    points = grid.world_points()
    texture = SmoothField.random(rng, 6, (8.0, 30.0), 0.03)
    signal *= 1.0 + texture(points)
    physical = scanner_response(signal, points, scanner, rng)
    stored_type = _STORAGE_TYPES[scanner.storage]
    limits = np.iinfo(stored_type)
    stored = np.rint((physical - scanner.rescale_intercept) / scanner.rescale_slope)
    return np.clip(stored, limits.min, limits.max).astype(stored_type)


def scanner_response(
    signal: np.ndarray,
    points: np.ndarray,
    scanner: ScannerProfile,
    rng: np.random.Generator,
) -> np.ndarray:
    """What a scanner makes of a noise-free signal: blur, bias field, noise, response curve.

    Args:
        signal: ``[k, j, i]`` signal relative to white matter (about 1), float32.
        points: ``(3, k, j, i)`` millimetre coordinates of the voxels (for the bias field).
        scanner: The scanner profile.
        rng: Source of randomness (bias field, noise).

    Returns:
        Physical intensities (before integer storage), float32.
    """
    sigma_in_plane = scanner.in_plane_blur
    signal = ndimage.gaussian_filter(
        signal, sigma=(scanner.slice_blur, sigma_in_plane, sigma_in_plane), mode="nearest"
    )
    bias = SmoothField.random(rng, 4, (180.0, 400.0), scanner.bias_std)
    signal *= np.exp(bias(points))
    real = signal + rng.normal(0.0, scanner.noise_std, size=signal.shape).astype(np.float32)
    imaginary = rng.normal(0.0, scanner.noise_std, size=signal.shape).astype(np.float32)
    magnitude = np.sqrt(real * real + imaginary * imaginary)
    return scanner.intensity_offset + scanner.intensity_scale * magnitude**scanner.gamma
