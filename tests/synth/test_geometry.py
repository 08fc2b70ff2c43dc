import numpy as np
import pytest
import SimpleITK as sitk

from app_site.ingest.manifest import read_manifest
from fedseg.synth.check import read_dicom_series
from fedseg.synth.dicom_series import SeriesIdentity, write_series
from fedseg.synth.geometry import AcquisitionGrid, rotation
from fedseg.synth.hospitals import write_nifti
from fedseg.synth.scanner import site_profile


def test_every_series_has_exactly_its_labels_geometry(hospitals):
    out, sites = hospitals
    compared = 0
    for site in sites:
        for row in read_manifest(out / site.name / "manifest.csv"):
            image = read_dicom_series(out / site.name / "dicom" / row.case_id, row.series_uid)
            label = sitk.ReadImage(str(row.label))
            assert image.GetSize() == label.GetSize()
            # NIfTI stores its affine as float32: ~1e-5 mm at a few hundred millimetres.
            np.testing.assert_allclose(image.GetSpacing(), label.GetSpacing(), rtol=0, atol=1e-5)
            np.testing.assert_allclose(image.GetOrigin(), label.GetOrigin(), rtol=0, atol=1e-4)
            np.testing.assert_allclose(
                image.GetDirection(), label.GetDirection(), rtol=0, atol=1e-6
            )
            compared += 1
    assert compared == sum(len(site.cases) for site in sites)


def test_sites_cover_oblique_and_non_axial_acquisitions(hospitals):
    out, sites = hospitals
    directions = {}
    for site in sites:
        row = read_manifest(out / site.name / "manifest.csv")[0]
        image = read_dicom_series(out / site.name / "dicom" / row.case_id, row.series_uid)
        directions[site.name] = np.reshape(image.GetDirection(), (3, 3))
    oblique = [
        name for name, d in directions.items() if not np.allclose(np.abs(d), np.round(np.abs(d)))
    ]
    assert oblique == ["site-3"]
    # site-4 is sagittal: its slice normal runs left-right.
    assert abs(directions["site-4"][0, 2]) == pytest.approx(1.0)
    assert np.allclose(directions["site-1"], np.eye(3))


def test_slice_positions_and_affine_describe_the_same_grid():
    grid = AcquisitionGrid.centred(
        (5, 4, 3), (1.5, 1.5, 2.25), rotation(0.96, 0.28, axis=0), np.array([1.0, -2.0, 3.0])
    )
    points = grid.world_points(np.float64)
    for k in range(3):
        np.testing.assert_allclose(points[:, k, 0, 0], grid.slice_position(k), atol=1e-9)
    voxel = np.array([4, 3, 2, 1.0])
    np.testing.assert_allclose(grid.affine_lps @ voxel, np.r_[points[:, 2, 3, 4], 1.0])
    ras = grid.affine_ras @ voxel
    np.testing.assert_allclose(ras[:3], points[:, 2, 3, 4] * [-1, -1, 1])
    # The grid's centre is within rounding of the requested centre.
    np.testing.assert_allclose(points.reshape(3, -1).mean(axis=1), [1.0, -2.0, 3.0], atol=0.06)


@pytest.mark.parametrize(
    ("shape", "spacing", "direction", "message"),
    [
        ((1, 4, 4), (1, 1, 1), np.eye(3), "at least 2 voxels"),
        ((4, 4, 4), (1, 0, 1), np.eye(3), "spacing must be positive"),
        ((4, 4, 4), (1, 1, 1), np.diag([1.0, 1.0, -1.0]), "proper rotation"),
    ],
)
def test_invalid_grids_are_refused(shape, spacing, direction, message):
    with pytest.raises(ValueError, match=message):
        AcquisitionGrid.centred(shape, spacing, direction, np.zeros(3))


def test_rotation_needs_a_real_angle():
    with pytest.raises(ValueError, match="do not describe an angle"):
        rotation(0.9, 0.3, axis=0)
    np.testing.assert_allclose(rotation(0.96, 0.28, axis=2) @ [1.0, 0, 0], [0.96, 0.28, 0])


@pytest.mark.parametrize("site_index", [0, 1, 2, 3], ids=lambda s: f"site-{s + 1}")
def test_dicom_and_nifti_writers_put_each_voxel_at_the_same_point(tmp_path, site_index):
    """A volume whose values encode their own indices reads back identically from both files."""
    profile = site_profile(site_index, seed=0)
    grid = profile.scanner.grid(16)
    nk, nj, ni = grid.array_shape
    k, j, i = np.meshgrid(np.arange(nk), np.arange(nj), np.arange(ni), indexing="ij")
    encoded = (i + 20 * j + 400 * k).astype(np.int16)
    identity = SeriesIdentity.random(np.random.default_rng(0), ["writer-test"])
    series = tmp_path / "series"
    series.mkdir()
    write_series(encoded, grid, profile.scanner, identity, series, np.random.default_rng(1))
    write_nifti(encoded, grid, tmp_path / "encoded.nii.gz")

    from_dicom = read_dicom_series(series, identity.series_instance_uid)
    from_nifti = sitk.ReadImage(str(tmp_path / "encoded.nii.gz"))
    slope, intercept = profile.scanner.rescale_slope, profile.scanner.rescale_intercept
    stored = np.rint((sitk.GetArrayFromImage(from_dicom) - intercept) / slope)
    np.testing.assert_array_equal(stored, encoded)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(from_nifti), encoded)
    # The same voxel index maps to the same patient point in both readers.
    for index in [(0, 0, 0), (ni - 1, 0, 0), (0, nj - 1, 0), (ni - 1, nj - 1, nk - 1)]:
        np.testing.assert_allclose(
            from_dicom.TransformIndexToPhysicalPoint(index),
            from_nifti.TransformIndexToPhysicalPoint(index),
            atol=1e-4,
        )
        np.testing.assert_allclose(
            from_dicom.TransformIndexToPhysicalPoint(index),
            (grid.affine_lps @ [*index, 1])[:3],
            atol=1e-6,
        )
