"""Writes a simulated volume as a real single-frame MR DICOM series (one file per slice)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from fedseg.synth.geometry import AcquisitionGrid
from fedseg.synth.scanner import ScannerProfile

#: ImplementationVersionName of the files ``fedseg synth`` writes.
_IMPLEMENTATION_VERSION = "FEDSEG_SYNTH_1"


@dataclass(frozen=True)
class SeriesIdentity:
    """Identifiers of one simulated study and series.

    The patient fields are made up, but present, so that ingestion has identifiers to keep out
    of its outputs and logs.
    """

    patient_name: str
    patient_id: str
    patient_birth_date: str
    patient_sex: str
    study_date: str
    accession_number: str
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    series_number: int

    @classmethod
    def random(cls, rng: np.random.Generator, entropy: list[str]) -> SeriesIdentity:
        """Draws identifiers; UIDs are derived from ``entropy``, so they are reproducible.

        Args:
            rng: Source of the made-up patient details.
            entropy: Strings that identify this series uniquely within the simulation
                (seed, site, case).

        Returns:
            The identity.
        """
        birth = (int(rng.integers(1940, 2005)), int(rng.integers(1, 13)), int(rng.integers(1, 29)))
        return cls(
            patient_name=f"SYNTHETIC^PATIENT{int(rng.integers(10**5, 10**6))}",
            patient_id=f"{int(rng.integers(10**7, 10**8))}",
            patient_birth_date="{:04d}{:02d}{:02d}".format(*birth),
            patient_sex=str(rng.choice(["F", "M"])),
            study_date=f"2025{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}",
            accession_number=f"A{int(rng.integers(10**6, 10**7))}",
            study_instance_uid=generate_uid(entropy_srcs=[*entropy, "study"]),
            series_instance_uid=generate_uid(entropy_srcs=[*entropy, "series"]),
            frame_of_reference_uid=generate_uid(entropy_srcs=[*entropy, "frame-of-reference"]),
            series_number=int(rng.integers(2, 20)),
        )


def write_series(
    stored: np.ndarray,
    grid: AcquisitionGrid,
    scanner: ScannerProfile,
    identity: SeriesIdentity,
    folder: Path,
    rng: np.random.Generator,
) -> list[Path]:
    """Writes one file per slice of ``stored`` into ``folder``.

    InstanceNumber follows slice position, or runs against it when the scanner profile says
    so; file names follow InstanceNumber, or are shuffled when the profile says so.

    Args:
        stored: ``[k, j, i]`` stored pixel values (uint16 or int16).
        grid: Geometry of ``stored``.
        scanner: Profile providing vendor tags, rescale and naming habits.
        identity: Study/series identifiers.
        folder: Existing folder to write into.
        rng: Source of the shuffled file names.

    Returns:
        Paths written, in slice order.
    """
    n_slices = stored.shape[0]
    dataset = _series_template(stored, grid, scanner, identity)
    instance_numbers = np.arange(1, n_slices + 1)
    if scanner.descending_instances:
        instance_numbers = instance_numbers[::-1]
    if scanner.shuffled_file_names:
        names = [f"{int(n):08X}.dcm" for n in rng.choice(16**8, size=n_slices, replace=False)]
    else:
        names = [f"IM{int(n):05d}.dcm" for n in instance_numbers]
    normal = grid.direction[:, 2]
    paths = []
    for k in range(n_slices):
        sop_uid = generate_uid(entropy_srcs=[identity.series_instance_uid, str(k)])
        position = grid.slice_position(k)
        dataset.file_meta.MediaStorageSOPInstanceUID = sop_uid
        dataset.SOPInstanceUID = sop_uid
        dataset.InstanceNumber = int(instance_numbers[k])
        dataset.ImagePositionPatient = [_decimal(v) for v in position]
        dataset.SliceLocation = _decimal(float(position @ normal))
        dataset.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        path = folder / names[k]
        dataset.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _series_template(
    stored: np.ndarray,
    grid: AcquisitionGrid,
    scanner: ScannerProfile,
    identity: SeriesIdentity,
) -> Dataset:
    """Everything that is the same for every slice of the series."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = _IMPLEMENTATION_VERSION

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.SOPClassUID = MRImageStorage
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = identity.study_date
    ds.StudyTime = ds.SeriesTime = "101500"
    ds.AccessionNumber = identity.accession_number
    ds.Modality = "MR"
    ds.Manufacturer = scanner.manufacturer
    ds.ManufacturerModelName = scanner.model_name
    ds.MagneticFieldStrength = _decimal(scanner.field_strength_t)
    ds.StudyDescription = "BRAIN TUMOUR PROTOCOL"
    ds.SeriesDescription = "T1 3D POST CONTRAST"
    ds.PatientName = identity.patient_name
    ds.PatientID = identity.patient_id
    ds.PatientBirthDate = identity.patient_birth_date
    ds.PatientSex = identity.patient_sex
    ds.BodyPartExamined = "BRAIN"
    ds.ScanningSequence = "GR"
    ds.SequenceVariant = "SP"
    ds.MRAcquisitionType = "3D"
    ds.SliceThickness = _decimal(grid.spacing[2])
    ds.SpacingBetweenSlices = _decimal(grid.spacing[2])
    ds.StudyInstanceUID = identity.study_instance_uid
    ds.SeriesInstanceUID = identity.series_instance_uid
    ds.StudyID = "1"
    ds.SeriesNumber = identity.series_number
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = [
        _decimal(v) for v in (*grid.direction[:, 0], *grid.direction[:, 1])
    ]
    ds.FrameOfReferenceUID = identity.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = stored.shape[1]
    ds.Columns = stored.shape[2]
    # PixelSpacing is (between rows, between columns) = (dj, di).
    ds.PixelSpacing = [_decimal(grid.spacing[1]), _decimal(grid.spacing[0])]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if np.issubdtype(stored.dtype, np.signedinteger) else 0
    ds.RescaleIntercept = _decimal(scanner.rescale_intercept)
    ds.RescaleSlope = _decimal(scanner.rescale_slope)
    ds.RescaleType = "US"
    return ds


def _decimal(value: float) -> str:
    """Formats a number as a short DICOM decimal string (at most 16 characters)."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    text = "0" if text in ("-0", "") else text
    if len(text) > 16:
        raise ValueError(f"{value!r} does not fit a DICOM decimal string")
    return text
