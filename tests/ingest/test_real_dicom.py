"""Ingestion of real DICOM files that install with pydicom and pydicom-data."""

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from app_site.ingest.frames import decode_frames, read_dicom_file

from .helpers import (
    TEST_FILES,
    assert_no_absolute_paths,
    assert_same_voxels,
    canonical_axcodes,
    data_file,
    folder_of,
    only,
    rescaled,
    run_ingest,
    sitk_series,
)

CT5N = TEST_FILES / "dicomdirtests" / "98892001" / "CT5N"
CT2 = TEST_FILES / "dicomdirtests" / "77654033" / "CT2"
MR2 = TEST_FILES / "dicomdirtests" / "98892003" / "MR2"
MR700 = TEST_FILES / "dicomdirtests" / "98892003" / "MR700"


def test_ct5n_is_sorted_by_position_not_instance_number(tmp_path):
    numbers = {
        pydicom.dcmread(p).InstanceNumber: float(pydicom.dcmread(p).ImagePositionPatient[2])
        for p in CT5N.iterdir()
    }
    assert sorted(numbers, key=numbers.get) == sorted(numbers, reverse=True), "the trap is real"
    report = run_ingest(CT5N, tmp_path / "out")
    (record,) = only(report, "accepted")
    assert record["shape"] == [16, 16, 5] and record["n_files"] == 5
    assert record["spacing"] == pytest.approx([0.4883, 0.4883, 2.5], abs=1e-4)
    output = tmp_path / "out" / record["output"]
    assert canonical_axcodes(output) == "RAS"
    assert_same_voxels(output, sitk_series(CT5N))


def test_ct2_gap_is_rejected_with_its_position_and_resampled_on_request(tmp_path):
    report = run_ingest(CT2, tmp_path / "rejected")
    (record,) = only(report, "rejected")
    assert "missing slices" in record["reason"] and "-99.48 to 103.02 mm" in record["reason"]
    assert "161 missing" in record["reason"] and "--resample-gaps" in record["reason"]
    assert record["source"] == "."

    report = run_ingest(CT2, tmp_path / "resampled", resample_gaps=True)
    (record,) = only(report, "accepted")
    assert record["resampled"] and record["reason"].startswith("resampled: missing slices")
    volume = np.asarray(nib.load(tmp_path / "resampled" / record["output"]).dataobj)
    assert volume.shape == (16, 16, 165)
    # Known truth: the original slices sit at heights 0, 162, 163 and 164 (1.25 mm apart).
    slices = sorted(
        (pydicom.dcmread(p) for p in CT2.iterdir()),
        key=lambda ds: float(ds.ImagePositionPatient[2]),
    )
    # Canonical RAS flips the DICOM row and column axes of an axial LPS series.
    for k, dataset in zip((0, 162, 163, 164), slices, strict=True):
        np.testing.assert_allclose(volume[::-1, ::-1, k], rescaled(dataset).T, atol=1e-3)


def test_mr2_localizers_are_all_skipped_and_nothing_is_accepted(tmp_path):
    report = run_ingest(MR2, tmp_path / "out")
    assert not only(report, "accepted") and not only(report, "rejected")
    assert len(only(report, "skipped")) == 7
    assert all("single slice" in r["reason"] for r in report.records)
    assert {r["series_uid"] for r in report.records} == {
        pydicom.dcmread(p).SeriesInstanceUID for p in MR2.iterdir()
    }


def test_mr700_projection_images_are_skipped(tmp_path):
    report = run_ingest(MR700, tmp_path / "out")
    assert len(report.records) == 7
    assert all("projection image" in r["reason"] for r in only(report, "skipped"))


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_RLE.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
    ],
)
def test_compressed_and_legacy_transfer_syntaxes_decode_exactly(tmp_path, name):
    """A 3-slice series made of one real encoded file (pixel data left as encoded)."""
    reference = pydicom.dcmread(data_file("MR_small.dcm"))
    source = tmp_path / "in"
    source.mkdir()
    series_uid = generate_uid()
    normal = np.cross(
        np.array(reference.ImageOrientationPatient[:3], float),
        np.array(reference.ImageOrientationPatient[3:], float),
    )
    for k in range(3):
        dataset = pydicom.dcmread(data_file(name))
        dataset.SeriesInstanceUID = series_uid
        dataset.SOPInstanceUID = generate_uid()
        position = np.array(reference.ImagePositionPatient, float) + 5.0 * k * normal
        dataset.ImagePositionPatient = [f"{v:.4f}" for v in position]
        dataset.save_as(source / f"slice{k}.dcm")
    report = run_ingest(source, tmp_path / "out")
    (record,) = only(report, "accepted")
    volume = np.asarray(nib.load(tmp_path / "out" / record["output"]).dataobj)
    expected = rescaled(reference)
    assert volume.shape[2] == 3
    for k in range(3):
        np.testing.assert_array_equal(volume[:, :, k], expected.T[::-1, ::-1])


def test_enhanced_ct_reads_per_frame_positions_and_rescale(tmp_path):
    path = data_file("eCT_Supplemental.dcm")
    report = run_ingest(folder_of(tmp_path, "in", [path]), tmp_path / "out")
    (record,) = only(report, "accepted")
    assert record["n_files"] == 1 and record["n_frames"] == 2
    assert record["spacing"] == pytest.approx([0.3887, 0.3887, 10.0], abs=1e-4)
    image = nib.load(tmp_path / "out" / record["output"])
    dataset = pydicom.dcmread(path)
    shared = dataset.SharedFunctionalGroupsSequence[0]
    transform = shared.PixelValueTransformationSequence[0]
    frames = dataset.pixel_array.astype(np.float32) * float(transform.RescaleSlope) + float(
        transform.RescaleIntercept
    )
    heights = [
        float(group.PlanePositionSequence[0].ImagePositionPatient[2])
        for group in dataset.PerFrameFunctionalGroupsSequence
    ]
    volume = np.asarray(image.dataobj)
    # Row direction is -x (patient right): canonical RAS keeps columns, flips rows (-y).
    for frame, height in zip(frames, heights, strict=True):
        k = int(np.argmin(np.abs(image.affine[2, 3] + np.arange(2) * 10.0 - height)))
        np.testing.assert_array_equal(volume[:, :, k], frame.T[:, ::-1])
    assert sorted(heights) == pytest.approx([image.affine[2, 3], image.affine[2, 3] + 10.0])


def test_enhanced_mr_without_functional_groups_is_rejected_by_name(tmp_path):
    report = run_ingest(folder_of(tmp_path, "in", [data_file("emri_small.dcm")]), tmp_path / "o")
    (record,) = report.records
    assert record["status"] == "rejected" and record["file"] == "emri_small.dcm"
    assert "multi-frame file without per-frame functional groups" in record["reason"]


def test_segmentation_of_a_missing_series_is_recorded(tmp_path):
    report = run_ingest(folder_of(tmp_path, "in", [data_file("liver.dcm")]), tmp_path / "o")
    (record,) = report.records
    assert record["status"] == "skipped" and record["file"] == "liver.dcm"
    assert "DICOM SEG for series 1.2.392.200103" in record["reason"]


def test_whole_pydicom_test_tree_is_recorded_without_a_crash(tmp_path):
    report = run_ingest(TEST_FILES, tmp_path / "out")
    qc = json.loads((tmp_path / "out" / "qc.json").read_text())
    files = [p for p in TEST_FILES.rglob("*") if p.is_file() and not p.name.startswith(".")]
    recorded = sum(r["n_files"] for r in qc["series"])
    assert recorded == len(files), "every file is accounted for in qc.json"
    assert qc["counts"]["accepted"] == 1
    for record in only(report, "rejected") + only(report, "skipped"):
        assert record["reason"]
        assert record.get("file") or record.get("source") or record.get("series_uid")
    assert_no_absolute_paths(tmp_path / "out", TEST_FILES)


def test_corrupt_truncated_and_foreign_files_get_records_naming_them(tmp_path):
    source = folder_of(tmp_path, "in", list(CT5N.iterdir()))
    victim = sorted(source.iterdir())[2]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 300])  # pixel data cut short
    (source / "notes.txt").write_text("scanner maintenance log\n")
    (source / "garbage.dcm").write_bytes(b"\0" * 128 + b"DICM" + bytes(range(256)) * 4)
    report = run_ingest(source, tmp_path / "out")
    by_file = {r.get("file"): r for r in report.records}
    assert by_file["notes.txt"]["status"] == "skipped"
    assert by_file["notes.txt"]["reason"] == "not a DICOM file"
    assert by_file["garbage.dcm"]["status"] == "rejected"
    (series,) = [r for r in report.records if r.get("series_uid")]
    assert series["status"] == "rejected" and "pixel data unreadable" in series["reason"]
    assert victim.name in series["reason"]
    assert_no_absolute_paths(tmp_path / "out", source)


def test_files_that_cannot_be_opened_get_records(tmp_path):
    """A broken link, and a link to a file whose reading fails (even as root: chmod 000 does
    not stop root, but reading /proc/self/mem from its start fails with EIO)."""
    source = folder_of(tmp_path, "in", list(CT5N.iterdir()))
    (source / "moved.dcm").symlink_to(tmp_path / "gone.dcm")
    (source / "failing.dcm").symlink_to("/proc/self/mem")
    report = run_ingest(source, tmp_path / "out")
    by_file = {r.get("file"): r for r in report.records}
    assert by_file["moved.dcm"]["status"] == "rejected"
    assert by_file["moved.dcm"]["reason"].startswith("unreadable file (FileNotFoundError: ")
    assert by_file["failing.dcm"]["status"] == "rejected"
    assert by_file["failing.dcm"]["reason"] == (
        "unreadable file (OSError: [Errno 5] Input/output error)"
    )
    assert len(only(report, "accepted")) == 1
    assert_no_absolute_paths(tmp_path / "out", source)


def test_hidden_files_and_everything_in_hidden_folders_are_ignored(tmp_path):
    source = folder_of(tmp_path, "in", list(CT5N.iterdir()))
    a_slice = sorted(source.iterdir())[0]
    for hidden in (".git/objects/ab", ".DS_Store", "sub/.Trash", "sub/.cache"):
        (source / hidden).mkdir(parents=True)
    (source / ".git" / "objects" / "ab" / "cdef0123").write_bytes(b"x\x9c packed git object")
    (source / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    shutil.copy(a_slice, source / ".DS_Store" / a_slice.name)  # would duplicate a slice
    shutil.copy(a_slice, source / "sub" / ".Trash" / "deleted.dcm")
    (source / "sub" / ".cache" / "notes.txt").write_text("cache")
    (source / ".hidden.dcm").write_bytes(a_slice.read_bytes())
    (record,) = run_ingest(source, tmp_path / "out").records
    assert record["status"] == "accepted" and record["n_files"] == 5


@pytest.mark.parametrize(
    "path",
    [
        *sorted(CT5N.iterdir())[:2],
        TEST_FILES / "MR_small.dcm",
        TEST_FILES / "CT_small.dcm",
        TEST_FILES / "MR_small_implicit.dcm",
        TEST_FILES / "MR_small_bigendian.dcm",
        TEST_FILES / "MR_small_RLE.dcm",
    ],
    ids=lambda p: p.name,
)
def test_direct_pixel_reading_matches_pydicom(path):
    (frame,) = read_dicom_file(path).frames
    decoded = decode_frames(path, frame.raw_pixels)
    np.testing.assert_array_equal(decoded[0], pydicom.dcmread(path).pixel_array)
    compressed = pydicom.dcmread(path).file_meta.TransferSyntaxUID.is_compressed
    big_endian = "bigendian" in path.name
    assert (frame.raw_pixels is None) == (compressed or big_endian)


def test_nibabel_siemens_and_philips_files(tmp_path):
    """nibabel's DICOM test data: Siemens mosaics (one without its pixel data), gzipped files,
    a file with no series UID."""
    import nibabel

    source = Path(nibabel.__file__).parent / "nicom" / "tests" / "data"
    report = run_ingest(source, tmp_path / "out")
    by_file = {r.get("file"): r for r in report.records if r.get("file")}
    mosaics = [r for r in report.records if "Siemens mosaic" in r["reason"]]
    assert len(mosaics) == 1 and {r["status"] for r in mosaics} == {"skipped"}
    assert by_file["csa_slice_norm.dcm"]["status"] == "rejected"
    assert "(no PixelData)" in by_file["csa_slice_norm.dcm"]["reason"]
    assert by_file["philips_mprage.dcm.gz"]["reason"].startswith("gzip-compressed file")
    assert by_file["decimal_rescale.dcm"]["status"] == "rejected"
    assert "no SeriesInstanceUID" in by_file["decimal_rescale.dcm"]["reason"]
    assert_no_absolute_paths(tmp_path / "out", source)


@pytest.mark.parametrize(
    ("cut_before", "missing"),
    [(b"\x28\x00\x10\x00", "no Rows/Columns/PixelData"), (b"\xe0\x7f\x10\x00", "no PixelData")],
    ids=["in-header", "before-pixels"],
)
def test_a_truncated_slice_rejects_its_file_and_its_series(tmp_path, cut_before, missing):
    """pydicom reads a file cut short into a partial dataset: an end slice cut before its Rows
    or its pixel data must not leave its series accepted one slice short."""
    source = folder_of(tmp_path, "in", list(CT5N.iterdir()))
    end_slice = source / "2062"  # the highest slice: no gap would betray its absence
    data = end_slice.read_bytes()
    end_slice.write_bytes(data[: data.index(cut_before)])
    report = run_ingest(source, tmp_path / "out")
    by_file = {r.get("file"): r for r in report.records}
    assert by_file["2062"]["status"] == "rejected"
    assert f"truncated or incomplete image ({missing})" in by_file["2062"]["reason"]
    (series,) = [r for r in report.records if r.get("series_uid")]
    assert series["status"] == "rejected" and not only(report, "accepted")
    assert series["reason"].startswith("1 file(s) of the series are truncated or unreadable (2062)")
    assert_no_absolute_paths(tmp_path / "out", source)


def test_a_manifest_series_whose_files_are_all_truncated_is_not_called_missing(tmp_path):
    source = folder_of(tmp_path, "in", list(CT5N.iterdir()))
    series_uid = pydicom.dcmread(source / "2062").SeriesInstanceUID
    for path in source.iterdir():
        data = path.read_bytes()
        path.write_bytes(data[: data.index(b"\x28\x00\x10\x00")])
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"case_id,series_uid,label\nc1,{series_uid},c1_label.nii.gz\n")
    report = run_ingest(source, tmp_path / "out", manifest=manifest)
    (row,) = [r for r in report.records if r.get("series_uid") == series_uid]
    assert row["status"] == "rejected" and "not found" not in row["reason"]
    assert "none of its 5 file(s) is readable (first 2062" in row["reason"]
    assert len(only(report, "rejected")) == 6


@pytest.mark.parametrize("name", ["rtdose.dcm", "rtdose_1frame.dcm", "rtstruct.dcm", "rtplan.dcm"])
def test_radiotherapy_objects_are_skipped_as_non_images(tmp_path, name):
    report = run_ingest(folder_of(tmp_path, "in", [data_file(name)]), tmp_path / "o")
    (record,) = report.records
    assert record["status"] == "skipped" and record["file"] == name
    assert record["reason"].startswith("radiotherapy object (RT ")


def test_links_to_folders_are_recorded_and_not_followed(tmp_path):
    source = folder_of(tmp_path, "in", list(CT5N.iterdir()))
    elsewhere = folder_of(tmp_path, "elsewhere", list(CT2.iterdir()))
    (source / "more").mkdir()
    (source / "more" / "ct2").symlink_to(elsewhere, target_is_directory=True)
    (source / "loop").symlink_to(source, target_is_directory=True)
    report = run_ingest(source, tmp_path / "out")
    by_file = {r.get("file"): r for r in report.records}
    for link in ("more/ct2", "loop"):
        assert by_file[link]["status"] == "skipped"
        assert by_file[link]["reason"].startswith("link to a folder, not followed")
    (accepted,) = only(report, "accepted")
    assert accepted["n_files"] == 5
    assert_no_absolute_paths(tmp_path / "out", source)


def test_a_byte_identical_copy_of_a_slice_is_skipped_naming_the_file_kept(tmp_path):
    source = folder_of(tmp_path, "in", list(CT5N.iterdir()))
    shutil.copy(source / "2693", source / "2693 (1)")
    report = run_ingest(source, tmp_path / "out")
    (accepted,) = only(report, "accepted")
    assert accepted["n_files"] == 5
    (copy,) = only(report, "skipped")
    assert copy["file"] == "2693 (1)"
    assert copy["reason"].startswith("byte-identical copy of 2693: ignored")


def test_two_different_files_at_one_position_are_named_in_the_reason(tmp_path):
    source = folder_of(tmp_path, "in", list(CT5N.iterdir()))
    dataset = pydicom.dcmread(source / "2693")
    dataset.InstanceNumber = 99  # another echo, say: same position, other header
    dataset.save_as(source / "echo2")
    (record,) = run_ingest(source, tmp_path / "out").records
    assert record["status"] == "rejected"
    assert "first at 2693 and echo2" in record["reason"]
