"""Independent verification of simulated hospitals, through SimpleITK's DICOM reader.

This reads what ``fedseg synth`` wrote the way a third-party tool would, and checks what
downstream steps rely on: every case is one complete DICOM series whose geometry equals its
label's, and the label holds tumour values only, exactly where the tissue map has tumour.
(That writer and reader agree voxel for voxel is tested in the test suite with volumes whose
values encode their own indices.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from app_site.ingest.manifest import ManifestEntry, read_manifest
from fedseg.synth.anatomy import TUMOUR_LABELS

#: Largest difference accepted between DICOM and NIfTI geometry. NIfTI stores its affine in
#: float32, which represents positions of a few hundred millimetres to about 1e-5 mm.
GEOMETRY_TOLERANCE_MM = 1e-4
DIRECTION_TOLERANCE = 1e-5


class SynthCheckError(Exception):
    """Raised when simulated hospitals do not pass the check; lists every problem found."""


@dataclass(frozen=True)
class CaseCheck:
    """What the check measured on one case."""

    site: str
    case_id: str
    n_files: int
    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    oblique: bool
    max_geometry_error_mm: float
    tumour_voxels: int


def check_hospitals(out: Path) -> list[CaseCheck]:
    """Checks every case of every site listed in ``out/synth.json``.

    Args:
        out: Folder written by ``fedseg synth``.

    Returns:
        One record per case.

    Raises:
        FileNotFoundError: If ``out`` holds no ``synth.json``.
        SynthCheckError: If any case fails; the message lists all failures.
    """
    record_path = Path(out) / "synth.json"
    if not record_path.is_file():
        raise FileNotFoundError(f"{record_path}: not found; is {out} a `fedseg synth` output?")
    record = json.loads(record_path.read_text())
    checks: list[CaseCheck] = []
    problems: list[str] = []
    for site in record["sites"]:
        site_folder = Path(out) / site["name"]
        manifest = read_manifest(site_folder / "manifest.csv")
        if len(manifest) != site["cases"]:
            problems.append(
                f"{site_folder / 'manifest.csv'}: {len(manifest)} cases, "
                f"synth.json says {site['cases']}"
            )
        for entry in manifest:
            try:
                checks.append(_check_case(site_folder, site["name"], entry))
            except SynthCheckError as error:
                problems.append(str(error))
    if problems:
        raise SynthCheckError("\n".join(problems))
    return checks


def read_dicom_series(folder: Path, series_uid: str) -> sitk.Image:
    """Reads one DICOM series with SimpleITK, slices sorted by position.

    Args:
        folder: Folder holding the series' files.
        series_uid: SeriesInstanceUID to read.

    Returns:
        The image, with RescaleSlope/Intercept applied.

    Raises:
        SynthCheckError: If the folder holds no file of that series.
    """
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid)
    if not files:
        raise SynthCheckError(f"{folder}: no DICOM files of series {series_uid}")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return reader.Execute()


def _check_case(site_folder: Path, site: str, entry: ManifestEntry) -> CaseCheck:
    case_id = entry.case_id
    series_folder = site_folder / "dicom" / case_id
    image = read_dicom_series(series_folder, entry.series_uid)
    label = sitk.ReadImage(str(entry.label))
    tissues = sitk.ReadImage(str(site_folder / "tissues" / f"{case_id}.nii.gz"))
    n_files = len(list(series_folder.glob("*.dcm")))
    where = f"{entry.label} vs {series_folder}"

    if image.GetSize() != label.GetSize():
        raise SynthCheckError(f"{where}: size {label.GetSize()} != {image.GetSize()}")
    if n_files != image.GetSize()[2]:
        raise SynthCheckError(f"{series_folder}: {n_files} files for {image.GetSize()[2]} slices")
    geometry_error = max(
        float(np.max(np.abs(np.subtract(image.GetOrigin(), label.GetOrigin())))),
        float(np.max(np.abs(np.subtract(image.GetSpacing(), label.GetSpacing())))),
    )
    direction_error = float(np.max(np.abs(np.subtract(image.GetDirection(), label.GetDirection()))))
    if geometry_error > GEOMETRY_TOLERANCE_MM or direction_error > DIRECTION_TOLERANCE:
        raise SynthCheckError(
            f"{where}: geometry differs (origin/spacing {geometry_error:.2e} mm, "
            f"direction {direction_error:.2e})"
        )

    label_array = sitk.GetArrayViewFromImage(label)
    values = set(np.unique(label_array).tolist())
    allowed = {0, *TUMOUR_LABELS.values()}
    if not values <= allowed:
        raise SynthCheckError(f"{where}: label values {sorted(values - allowed)} not in {allowed}")
    tissue_array = sitk.GetArrayViewFromImage(tissues)
    if not np.array_equal(label_array > 0, np.isin(tissue_array, list(TUMOUR_LABELS))):
        raise SynthCheckError(f"{where}: tumour label and tissue map disagree")
    direction = np.reshape(image.GetDirection(), (3, 3))
    return CaseCheck(
        site=site,
        case_id=case_id,
        n_files=n_files,
        size=tuple(image.GetSize()),
        spacing=tuple(round(s, 3) for s in image.GetSpacing()),
        oblique=not np.allclose(np.abs(direction), np.round(np.abs(direction))),
        max_geometry_error_mm=geometry_error,
        tumour_voxels=int(np.count_nonzero(label_array)),
    )
