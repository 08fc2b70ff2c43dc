"""Shared helpers of the ingestion tests: input folders, ingestion runs, voxel comparisons."""

import hashlib
import shutil
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.data import get_testdata_file
from pydicom.sr.codedict import codes

from app_site.ingest.pipeline import IngestOptions, IngestReport, ingest

TEST_FILES = Path(get_testdata_file("CT_small.dcm")).parent


def data_file(name: str) -> Path:
    """A file of pydicom's test data or of pydicom-data (downloaded nowhere: both install)."""
    return Path(get_testdata_file(name))


def folder_of(tmp_path: Path, name: str, files: list[Path]) -> Path:
    """Copies files into a fresh input folder."""
    folder = tmp_path / name
    folder.mkdir(parents=True)
    for path in files:
        shutil.copy(path, folder / path.name)
    return folder


def run_ingest(source: Path, output: Path, **options) -> IngestReport:
    return ingest(IngestOptions(source=source, output=output, **options))


def only(report: IngestReport, status: str) -> list[dict]:
    return [r for r in report.records if r["status"] == status]


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def sitk_series(folder: Path, series_uid: str | None = None) -> sitk.Image:
    """SimpleITK's reading of a DICOM series (sorted by position, rescale applied)."""
    reader = sitk.ImageSeriesReader()
    if series_uid is None:
        files = reader.GetGDCMSeriesFileNames(str(folder))
    else:
        files = reader.GetGDCMSeriesFileNames(str(folder), series_uid)
    reader.SetFileNames(files)
    return sitk.Cast(reader.Execute(), sitk.sitkFloat32)


def assert_same_voxels(output: Path, reference: sitk.Image, atol: float = 1e-3) -> None:
    """Our NIfTI holds the reference's value at every voxel centre it shares with it.

    The reference is sampled (nearest neighbour) at our voxel centres; where both grids are the
    same grid this compares each voxel with the one at the same physical point.
    """
    ours = sitk.ReadImage(str(output), sitk.sitkFloat32)
    np.testing.assert_allclose(
        sorted(ours.GetSpacing()), sorted(reference.GetSpacing()), rtol=0, atol=1e-4
    )
    sampled = sitk.Resample(reference, ours, sitk.Transform(), sitk.sitkNearestNeighbor, np.nan)
    expected = sitk.GetArrayFromImage(sampled)
    assert not np.isnan(expected).any(), "our grid reaches outside the reference's"
    np.testing.assert_allclose(sitk.GetArrayFromImage(ours), expected, rtol=0, atol=atol)


def canonical_axcodes(path: Path) -> str:
    return "".join(nib.aff2axcodes(nib.load(path).affine))


def rescaled(dataset: pydicom.Dataset) -> np.ndarray:
    slope = float(dataset.get("RescaleSlope", 1) or 1)
    intercept = float(dataset.get("RescaleIntercept", 0) or 0)
    return dataset.pixel_array.astype(np.float32) * slope + intercept


def assert_no_absolute_paths(output: Path, source: Path) -> None:
    """``qc.json`` names files relative to the source: no absolute path of it, or beside it."""
    text = (output / "qc.json").read_text()
    for root in (source.resolve(), source.resolve().parent):
        assert str(root) not in text, f"qc.json holds the absolute path {root}"


def sorted_along_normal(paths: list[Path]) -> list[pydicom.Dataset]:
    """A series' datasets, sorted by position along their slice normal."""
    datasets = [pydicom.dcmread(p) for p in paths]
    orientation = np.array(datasets[0].ImageOrientationPatient, float)
    normal = np.cross(orientation[:3], orientation[3:])
    return sorted(datasets, key=lambda ds: float(normal @ np.array(ds.ImagePositionPatient, float)))


def write_segmentation(datasets: list[pydicom.Dataset], label_map: np.ndarray, path: Path) -> None:
    """Writes a binary DICOM SEG (highdicom) of tumour labels 1-3 drawn on ``datasets``.

    Args:
        datasets: The series' slices, sorted along the normal.
        label_map: ``[slice, row, column]`` label values, slices in the order of ``datasets``.
        path: The SEG file to write.
    """
    segments = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=name,
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Neoplasm,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for number, name in ((1, "necrotic core"), (2, "edema"), (3, "enhancing tumour"))
    ]
    segmentation = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=label_map,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=hd.UID(),
        series_number=100,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="fedseg tests",
        manufacturer_model_name="highdicom",
        software_versions="1",
        device_serial_number="1",
    )
    segmentation.save_as(path)
