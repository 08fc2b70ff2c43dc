"""NIfTI volumes in the ingested folder: checked, paired with labels, canonicalized."""

import gzip
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from app_site.harmonization import dataset_modality
from app_site.ingest import pipeline
from app_site.ingest.volume import nifti_image
from fedseg.harmonization import HarmonizationError

from .helpers import assert_no_absolute_paths, canonical_axcodes, only, run_ingest

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"


@pytest.fixture
def volume():
    rng = np.random.default_rng(0)
    values = rng.normal(100.0, 10.0, size=(12, 10, 8)).astype(np.float32)
    affine = np.array(
        [[-1.5, 0, 0, 90.0], [0, 0, 2.0, -40.0], [0, 1.2, 0, 10.0], [0, 0, 0, 1.0]]
    )  # a coronal LIA-ish grid: canonicalization must permute and flip
    label = np.zeros(values.shape, dtype=np.uint8)
    label[3:7, 2:5, 1:4] = 2
    label[4:6, 3:4, 2:3] = 3
    return values, label, affine


def save(path: Path, values: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if abs(np.linalg.det(affine[:3, :3])) > 0:
        nib.save(nifti_image(values, affine), path)
    else:  # a qform cannot hold a singular affine: a broken writer leaves only the sform
        image = nib.Nifti1Image(values, None)
        image.header.set_sform(affine, code=1)
        nib.save(image, path)
    return path


def test_image_and_paired_label_are_canonicalized_together(tmp_path, volume):
    values, label, affine = volume
    save(tmp_path / "in" / "p1" / "t1c.nii.gz", values, affine)
    save(tmp_path / "in" / "p1" / "t1c_seg.nii.gz", label, affine)
    report = run_ingest(tmp_path / "in", tmp_path / "out")
    (record,) = report.records
    assert record["status"] == "accepted" and record["label"]
    assert record["orientation"] == "".join(nib.aff2axcodes(affine))
    image = nib.load(tmp_path / "out" / record["output"])
    seg = nib.load(tmp_path / "out" / record["label"])
    assert canonical_axcodes(tmp_path / "out" / record["output"]) == "RAS"
    np.testing.assert_allclose(image.affine, seg.affine)
    # The same physical point holds the same image value and label before and after.
    for voxel in ([4, 3, 2], [0, 0, 0], [11, 9, 7]):
        point = affine @ [*voxel, 1]
        ours = np.rint(np.linalg.solve(image.affine, point)[:3]).astype(int)
        assert np.asarray(image.dataobj)[tuple(ours)] == pytest.approx(values[tuple(voxel)])
        assert np.asarray(seg.dataobj)[tuple(ours)] == label[tuple(voxel)]


def test_labels_the_manifest_names_inside_the_input_are_not_images(tmp_path, volume):
    """An export of images/ and labels/ side by side: each label file labels its image only."""
    values, label, affine = volume
    source = tmp_path / "in"
    for patient in ("p1", "p2"):
        save(source / "images" / f"{patient}.nii.gz", values, affine)
        save(source / "labels" / f"{patient}.nii.gz", label, affine)
    manifest = source / "manifest.csv"
    manifest.write_text(
        "case_id,series_uid,label\n"
        "p1,images/p1.nii.gz,labels/p1.nii.gz\n"
        "p2,images/p2.nii.gz,./labels/../labels/p2.nii.gz\n"
    )
    report = run_ingest(source, tmp_path / "out", manifest=manifest)
    accepted = only(report, "accepted")
    assert len(accepted) == 2 and all(record["label"] for record in accepted)
    assert [record["file"] for record in only(report, "skipped")] == ["manifest.csv"]
    datalist = json.loads((tmp_path / "out" / "datalist.json").read_text())
    assert not datalist["test"]


@pytest.mark.parametrize(
    ("break_it", "reason"),
    [
        ("nan", "voxel(s) hold NaN or infinite values"),
        ("not_gzip", "t1c.nii.gz: unreadable NIfTI (ImageFileError)"),
        ("not_nifti", "t1c.nii.gz: unreadable NIfTI (ImageFileError)"),
        ("label_unreadable", "label: t1c_seg.nii.gz: label unreadable"),
        ("sheared", "affine is sheared"),
        ("singular", "affine is singular"),
        ("label_values", "label: t1c_seg.nii.gz: label values [5]"),
        ("label_shape", "label shape"),
        ("label_affine", "label affine differs"),
    ],
)
def test_bad_volumes_and_labels_are_rejected_with_the_reason(tmp_path, volume, break_it, reason):
    values, label, affine = volume
    label_affine = affine.copy()
    if break_it == "nan":
        values = values.copy()
        values[1, 1, 1] = np.nan
    elif break_it == "sheared":
        affine = affine.copy()
        affine[0, 1] = 0.8
    elif break_it == "singular":
        affine = affine.copy()
        affine[:3, 2] = 0.0
    elif break_it == "label_values":
        label = label.copy()
        label[0, 0, 0] = 5
    elif break_it == "label_shape":
        label = label[:, :, :-1]
    elif break_it == "label_affine":
        label_affine[0, 3] += 3.0
    image_path = save(tmp_path / "in" / "t1c.nii.gz", values, affine)
    label_path = save(tmp_path / "in" / "t1c_seg.nii.gz", label, label_affine)
    if break_it == "not_gzip":
        image_path.write_bytes(b"not a volume" * 40)
    elif break_it == "not_nifti":
        image_path.write_bytes(gzip.compress(b"not a volume" * 40))
    elif break_it == "label_unreadable":
        label_path.write_bytes(b"not a label" * 40)
    (record,) = run_ingest(tmp_path / "in", tmp_path / "out").records
    assert record["status"] == "rejected" and record["file"] == "t1c.nii.gz"
    assert reason in record["reason"]
    assert_no_absolute_paths(tmp_path / "out", tmp_path / "in")


def test_nibabel_real_volumes(tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    for name in ("anatomical.nii", "example4d.nii.gz"):
        (source / name).write_bytes((NIBABEL_DATA / name).read_bytes())
    report = run_ingest(source, tmp_path / "out")
    by_file = {r.get("file") or r["output"]: r for r in report.records}
    (accepted,) = only(report, "accepted")
    assert accepted["shape"] == list(nib.load(NIBABEL_DATA / "anatomical.nii").shape)
    assert "4D volume" in by_file["example4d.nii.gz"]["reason"]
    assert_no_absolute_paths(tmp_path / "out", source)


def test_an_unforeseen_failure_rejects_the_volume_and_the_run_goes_on(
    tmp_path, volume, monkeypatch
):
    values, _, affine = volume
    for name in ("a", "b"):
        save(tmp_path / "in" / f"{name}.nii.gz", values, affine)
    real_load = pipeline.load_nifti_image

    def failing_load(path):
        if path.name == "a.nii.gz":
            raise OSError(5, "Input/output error", str(path))
        return real_load(path)

    monkeypatch.setattr(pipeline, "load_nifti_image", failing_load)
    report = run_ingest(tmp_path / "in", tmp_path / "out")
    (rejected,) = only(report, "rejected")
    assert rejected["file"] == "a.nii.gz"
    assert rejected["reason"] == (
        "conversion failed (OSError: [Errno 5] Input/output error: 'a.nii.gz')"
    )
    assert len(only(report, "accepted")) == 1
    assert_no_absolute_paths(tmp_path / "out", tmp_path / "in")


def test_several_label_files_beside_an_image_reject_it_naming_them(tmp_path, volume):
    values, label, affine = volume
    source = tmp_path / "in"
    save(source / "p1" / "t1c.nii.gz", values, affine)
    save(source / "p1" / "t1c_label.nii.gz", label, affine)
    save(source / "p1" / "t1c_mask.nii.gz", (label > 0).astype(np.uint8), affine)
    (record,) = run_ingest(source, tmp_path / "out").records
    assert record["status"] == "rejected" and record["file"] == "p1/t1c.nii.gz"
    assert record["reason"] == (
        "2 label files beside it (p1/t1c_label.nii.gz, p1/t1c_mask.nii.gz): remove all but "
        "its tumour label, or name the label in --manifest"
    )
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("case_id,series_uid,label\np1,p1/t1c.nii.gz,in/p1/t1c_label.nii.gz\n")
    (record,) = run_ingest(source, tmp_path / "out", manifest=manifest).records
    assert record["status"] == "accepted" and record["label"]
    written = np.asarray(nib.load(tmp_path / "out" / record["label"]).dataobj)
    assert set(np.unique(written)) == {0, 2, 3}  # the tumour label, not the mask


def test_a_label_file_without_its_image_is_skipped_unless_the_manifest_names_it(tmp_path, volume):
    """The BraTS layout: modalities and one _seg file, no image named BraTS_001.nii.gz."""
    values, label, affine = volume
    source = tmp_path / "in"
    for modality in ("t1", "flair"):
        save(source / f"BraTS_001_{modality}.nii.gz", values, affine)
    save(source / "BraTS_001_seg.nii.gz", label, affine)
    report = run_ingest(source, tmp_path / "out")
    (orphan,) = only(report, "skipped")
    assert orphan["file"] == "BraTS_001_seg.nii.gz"
    assert orphan["reason"] == (
        "label file with no image BraTS_001.nii.gz beside it; name its image in --manifest"
    )
    assert len(only(report, "accepted")) == 2
    save(tmp_path / "labels" / "a.nii.gz", label, affine)
    manifest = tmp_path / "manifest.csv"  # an odd name for an image, but the manifest decides
    manifest.write_text("case_id,series_uid,label\na,BraTS_001_seg.nii.gz,labels/a.nii.gz\n")
    report = run_ingest(source, tmp_path / "out", manifest=manifest)
    assert len(only(report, "accepted")) == 3 and not only(report, "skipped")
    (named,) = [r for r in report.records if r.get("label")]
    assert named["case_id"] == pipeline._case_id("nifti|BraTS_001_seg.nii.gz")


def test_upper_case_extensions_are_nifti_and_pair_with_their_label(tmp_path, volume):
    values, label, affine = volume
    source = tmp_path / "in"
    save(source / "SCAN.NII.GZ", values, affine)
    save(source / "SCAN_SEG.NII.GZ", label, affine)
    save(source / "OTHER.NII", values, affine)
    report = run_ingest(source, tmp_path / "out")
    assert len(only(report, "accepted")) == 2
    assert sum(1 for r in report.records if r.get("label")) == 1


def test_a_manifest_saved_with_a_byte_order_mark_is_read(tmp_path, volume):
    """Excel's "CSV UTF-8" starts the file with a byte order mark."""
    values, label, affine = volume
    save(tmp_path / "in" / "a.nii.gz", values, affine)
    save(tmp_path / "labels" / "a.nii.gz", label, affine)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("case_id,series_uid,label\na,a.nii.gz,labels/a.nii.gz\n", "utf-8-sig")
    (record,) = run_ingest(tmp_path / "in", tmp_path / "out", manifest=manifest).records
    assert record["status"] == "accepted" and record["label"]


def test_integral_values_are_written_as_int16_others_as_float32(tmp_path, volume):
    values, _, affine = volume
    save(tmp_path / "in" / "ct.nii.gz", np.rint(values * 10 - 1000).astype(np.int16), affine)
    save(tmp_path / "in" / "mr.nii.gz", values, affine)
    report = run_ingest(tmp_path / "in", tmp_path / "out")
    written = {
        r["case_id"]: np.asanyarray(nib.load(tmp_path / "out" / r["output"]).dataobj)
        for r in report.records
    }
    ct = written[pipeline._case_id("nifti|ct.nii.gz")]
    mr = written[pipeline._case_id("nifti|mr.nii.gz")]
    assert ct.dtype == np.int16 and mr.dtype == np.float32
    assert ct.min() == np.rint(values * 10 - 1000).min()


def test_modality_is_declared_for_nifti_and_harmonization_says_how(tmp_path, volume):
    values, label, affine = volume
    save(tmp_path / "in" / "a.nii.gz", values, affine)
    save(tmp_path / "in" / "a_seg.nii.gz", label, affine)
    (record,) = run_ingest(tmp_path / "in", tmp_path / "out").records
    assert record["modality"] is None and "--modality MR|CT" in record["reason"]
    with pytest.raises(HarmonizationError, match=re.escape("re-ingest with --modality MR|CT")):
        dataset_modality(tmp_path / "out")
    (record,) = run_ingest(tmp_path / "in", tmp_path / "out", modality="MR").records
    assert record["modality"] == "MR" and record["reason"] == ""
    assert dataset_modality(tmp_path / "out") == "MR"
    qc = json.loads((tmp_path / "out" / "qc.json").read_text())
    assert qc["series"][0]["modality"] == "MR"
