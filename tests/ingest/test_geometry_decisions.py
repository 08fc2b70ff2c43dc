"""Geometry decisions on series with a known truth: a linear intensity field in patient space.

Linear interpolation reproduces a linear field exactly, so resampled outputs can be compared
with the field itself.
"""

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from app_site.ingest.series import MAX_FILL_FACTOR, MAX_RESAMPLED_SLICES
from fedseg.synth.dicom_series import SeriesIdentity, write_series
from fedseg.synth.scanner import site_profile

from .helpers import only, run_ingest

SLOPE = 0.05  # stored values carry the field (1000 to 3100) to 0.025


def field(lps: np.ndarray) -> np.ndarray:
    """The known truth: a linear function of LPS millimetres."""
    return 2000.0 + 3.0 * lps[0] + 2.0 * lps[1] + 5.0 * lps[2]


def write_linear_series(folder, in_plane_shift_mm=(0.0, 0.0, 0.0), size=16):
    """A site-1 (axial) series whose slice k is moved in-plane by k * in_plane_shift_mm."""
    scanner = site_profile(0, seed=0).scanner
    grid = scanner.grid(size)
    folder.mkdir(parents=True)
    identity = SeriesIdentity.random(np.random.default_rng(0), [str(folder)])
    placeholder = np.zeros(grid.array_shape, dtype=np.uint16)
    paths = write_series(placeholder, grid, scanner, identity, folder, np.random.default_rng(0))
    shift = np.asarray(in_plane_shift_mm)
    _, nj, ni = grid.array_shape
    j, i = np.meshgrid(np.arange(nj), np.arange(ni), indexing="ij")
    for k, path in enumerate(paths):
        dataset = pydicom.dcmread(path)
        position = grid.slice_position(k) + k * shift
        dataset.ImagePositionPatient = [f"{v:.6f}" for v in position]
        points = (
            position[:, None, None]
            + grid.direction[:, 0, None, None] * (i * grid.spacing[0])
            + grid.direction[:, 1, None, None] * (j * grid.spacing[1])
        )
        dataset.RescaleSlope = str(SLOPE)
        dataset.PixelData = np.rint(field(points) / SLOPE).astype(np.uint16).tobytes()
        dataset.save_as(path)
    return sorted(paths), grid


def field_at_voxels(image: nib.Nifti1Image) -> np.ndarray:
    shape = image.shape
    index = np.indices(shape).reshape(3, -1)
    ras = image.affine[:3, :3] @ index + image.affine[:3, 3:4]
    lps = ras * np.array([[-1.0], [-1.0], [1.0]])
    return field(lps).reshape(shape)


def test_regular_series_is_accepted_with_exact_values(tmp_path):
    write_linear_series(tmp_path / "in" / "series")
    report = run_ingest(tmp_path / "in", tmp_path / "out")
    (record,) = only(report, "accepted")
    assert not record["resampled"] and record["reason"] == ""
    image = nib.load(tmp_path / "out" / record["output"])
    np.testing.assert_allclose(np.asarray(image.dataobj), field_at_voxels(image), atol=0.03)


def test_missing_slice_is_rejected_then_interpolated_on_request(tmp_path):
    paths, grid = write_linear_series(tmp_path / "in" / "series")
    paths[5].unlink()
    report = run_ingest(tmp_path / "in", tmp_path / "rejected")
    (record,) = only(report, "rejected")
    height = grid.slice_position(4)[2]
    assert (
        f"gaps at {height:.2f} to {grid.slice_position(6)[2]:.2f} mm (1 missing)"
        in (record["reason"])
    )

    report = run_ingest(tmp_path / "in", tmp_path / "out", resample_gaps=True)
    (record,) = only(report, "accepted")
    image = nib.load(tmp_path / "out" / record["output"])
    assert image.shape[2] == grid.shape[2], "the missing slice is restored"
    np.testing.assert_allclose(np.asarray(image.dataobj), field_at_voxels(image), atol=0.03)


def test_non_uniform_spacing_is_rejected(tmp_path):
    paths, _ = write_linear_series(tmp_path / "in" / "series")
    dataset = pydicom.dcmread(paths[3])
    position = np.add(np.array(dataset.ImagePositionPatient, float), [0, 0, 0.7])
    dataset.ImagePositionPatient = [f"{v:.6f}" for v in position]
    dataset.save_as(paths[3])
    (record,) = run_ingest(tmp_path / "in", tmp_path / "out").records
    assert record["status"] == "rejected"
    assert record["reason"].startswith("non-uniform slice spacing")


def test_header_rounding_is_not_taken_for_tilt(tmp_path):
    write_linear_series(tmp_path / "in" / "series", in_plane_shift_mm=(0.004, -0.003, 0.0))
    (record,) = run_ingest(tmp_path / "in", tmp_path / "out").records
    assert record["status"] == "accepted" and not record["resampled"]


def test_gantry_tilt_is_detected_and_resampled_to_an_orthogonal_grid(tmp_path):
    shift = (0.0, 0.9, 0.0)  # each slice 0.9 mm further posterior: tilt about left-right
    _, grid = write_linear_series(tmp_path / "in" / "series", in_plane_shift_mm=shift)
    (record,) = run_ingest(tmp_path / "in", tmp_path / "rejected").records
    angle = np.degrees(np.arctan2(0.9, grid.spacing[2]))
    assert record["status"] == "rejected"
    assert f"gantry tilt about {angle:.1f} degrees" in record["reason"]
    assert "--resample-tilt" in record["reason"]

    report = run_ingest(tmp_path / "in", tmp_path / "out", resample_tilt=True)
    (record,) = only(report, "accepted")
    assert record["resampled"] and "gantry tilt" in record["reason"]
    image = nib.load(tmp_path / "out" / record["output"])
    assert not record["oblique"]
    values, truth = np.asarray(image.dataobj), field_at_voxels(image)
    # Rows shifted in from outside the field of view hold background; compare the rest.
    margin = int(np.ceil(0.9 * grid.shape[2] / grid.spacing[1])) + 1
    inside = (slice(None), slice(margin, image.shape[1] - margin), slice(None))
    np.testing.assert_allclose(values[inside], truth[inside], atol=0.03)


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        ("rows", "inconsistent rows inside the series"),
        ("pixel_spacing", "inconsistent pixel spacing inside the series"),
        ("duplicate", "share a slice position"),
    ],
)
def test_inconsistent_series_are_rejected(tmp_path, tamper, reason):
    paths, _ = write_linear_series(tmp_path / "in" / "series")
    dataset = pydicom.dcmread(paths[2])
    if tamper == "rows":
        dataset.Rows = dataset.Rows - 1
        dataset.PixelData = dataset.PixelData[: dataset.Rows * dataset.Columns * 2]
    elif tamper == "pixel_spacing":
        dataset.PixelSpacing = [f"{float(v) * 1.1:.4f}" for v in dataset.PixelSpacing]
    else:
        dataset.SOPInstanceUID = generate_uid()
        dataset.ImagePositionPatient = pydicom.dcmread(paths[3]).ImagePositionPatient
    dataset.save_as(paths[2])
    (record,) = run_ingest(tmp_path / "in", tmp_path / "out").records
    assert record["status"] == "rejected" and reason in record["reason"]


def test_a_localizer_sharing_the_series_uid_is_grouped_apart(tmp_path):
    paths, _ = write_linear_series(tmp_path / "in" / "series")
    localizer = pydicom.dcmread(paths[0])
    localizer.SOPInstanceUID = generate_uid()
    localizer.ImageOrientationPatient = ["0", "1", "0", "0", "0", "-1"]  # sagittal
    localizer.save_as(tmp_path / "in" / "series" / "localizer.dcm")
    report = run_ingest(tmp_path / "in", tmp_path / "out")
    assert len(only(report, "accepted")) == 1
    (skipped,) = only(report, "skipped")
    assert skipped["n_files"] == 1 and "single slice" in skipped["reason"]
    assert skipped["series_uid"] == only(report, "accepted")[0]["series_uid"]


def test_modality_filter(tmp_path):
    write_linear_series(tmp_path / "in" / "series")
    (record,) = run_ingest(tmp_path / "in", tmp_path / "out", modality="CT").records
    assert record["status"] == "skipped" and record["reason"] == "modality MR, CT requested"


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")
@pytest.mark.parametrize("resample", [False, True], ids=["plain", "resampling"])
@pytest.mark.parametrize(
    ("tag", "value"),
    [
        ("ImagePositionPatient", ["nan", "0", "0"]),
        ("ImagePositionPatient", ["0", "inf", "0"]),
        ("ImageOrientationPatient", ["1", "0", "0", "0", "nan", "0"]),
        ("PixelSpacing", ["inf", "1"]),
        ("RescaleSlope", "nan"),
    ],
)
def test_non_finite_header_values_reject_the_whole_series_naming_the_tag(
    tmp_path, tag, value, resample
):
    paths, _ = write_linear_series(tmp_path / "in" / "series")
    dataset = pydicom.dcmread(paths[3])
    setattr(dataset, tag, value)
    dataset.save_as(paths[3])
    report = run_ingest(
        tmp_path / "in", tmp_path / "out", resample_gaps=resample, resample_tilt=resample
    )
    (record,) = report.records
    assert record["status"] == "rejected" and record["n_files"] == len(paths)
    assert f"holds NaN or infinite values in 1 of {len(paths)} frame(s)" in record["reason"]
    assert tag in record["reason"] and paths[3].name in record["reason"]


def test_an_outlier_slice_is_not_gap_filled_into_a_huge_grid(tmp_path):
    paths, _ = write_linear_series(tmp_path / "in" / "series")
    dataset = pydicom.dcmread(paths[-1])
    position = np.array(dataset.ImagePositionPatient, float)
    position[2] += 20000.0  # 20 m beyond the others: a typo, not 1400 missing slices
    dataset.ImagePositionPatient = [f"{v:.6f}" for v in position]
    dataset.save_as(paths[-1])
    (record,) = run_ingest(tmp_path / "in", tmp_path / "out", resample_gaps=True).records
    assert record["status"] == "rejected" and record["n_files"] == len(paths)
    assert record["reason"].startswith(f"resampling would spread {len(paths)} slices over")
    assert (
        f"more than the {min(MAX_RESAMPLED_SLICES, MAX_FILL_FACTOR * len(paths))}"
        in (record["reason"])
    )
    assert not list((tmp_path / "out" / "images").iterdir())


def test_a_gap_filled_grid_at_the_limit_is_accepted(tmp_path):
    paths, grid = write_linear_series(tmp_path / "in" / "series", size=8)
    spacing = grid.spacing[2]
    limit = MAX_FILL_FACTOR * len(paths)
    dataset = pydicom.dcmread(paths[-1])
    height = (limit - 1) * spacing - 0.001  # just inside the limit, whatever the rounding
    position = grid.slice_position(0) + height * grid.direction[:, 2]
    dataset.ImagePositionPatient = [f"{v:.6f}" for v in position]
    dataset.save_as(paths[-1])
    (record,) = run_ingest(tmp_path / "in", tmp_path / "out", resample_gaps=True).records
    assert record["status"] == "accepted" and record["shape"][2] == limit
