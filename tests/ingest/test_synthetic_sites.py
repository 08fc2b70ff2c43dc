"""Ingestion of the simulated hospitals: every scanner trap, labels, privacy, re-runs, CLI."""

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from monai.data import load_decathlon_datalist
from pydicom.uid import generate_uid

from app_site.ingest import pipeline
from app_site.ingest.manifest import read_manifest

from .helpers import (
    assert_no_absolute_paths,
    assert_same_voxels,
    only,
    run_ingest,
    sitk_series,
    sorted_along_normal,
    tree_digest,
    write_segmentation,
)

FEDSEG = str(Path(sys.executable).with_name("fedseg"))


@pytest.fixture(scope="module")
def ingested(hospitals, tmp_path_factory):
    """Each simulated site ingested with its manifest."""
    out, sites = hospitals
    results = {}
    for site in sites:
        target = tmp_path_factory.mktemp(f"ingest-{site.name}")
        report = run_ingest(
            out / site.name / "dicom", target, manifest=out / site.name / "manifest.csv"
        )
        results[site.name] = (report, target)
    return results


def test_every_synthetic_series_is_accepted_with_its_label(hospitals, ingested):
    out, sites = hospitals
    for site in sites:
        report, target = ingested[site.name]
        assert len(only(report, "accepted")) == len(site.cases), site.name
        assert not only(report, "rejected") and not only(report, "skipped")
        manifest = {e.series_uid: e for e in read_manifest(out / site.name / "manifest.csv")}
        for record in report.records:
            entry = manifest[record["series_uid"]]
            series = out / site.name / "dicom" / entry.case_id
            assert_same_voxels(target / record["output"], sitk_series(series))
            label = sitk.Cast(sitk.ReadImage(str(entry.label)), sitk.sitkFloat32)
            assert_same_voxels(target / record["label"], label, atol=0)


def test_records_describe_each_site(ingested):
    oblique = {name: {r["oblique"] for r in rep.records} for name, (rep, _) in ingested.items()}
    assert oblique == {"site-1": {False}, "site-2": {False}, "site-3": {True}, "site-4": {False}}
    (record, *_) = ingested["site-4"][0].records
    assert record["orientation"] == "PIR"  # sagittal: i toward P, j toward I, slices toward R
    assert record["manufacturer"] == "CANON_MEC" and record["modality"] == "MR"
    for report, target in ingested.values():
        qc = json.loads((target / "qc.json").read_text())
        assert qc["counts"]["accepted"] == len(report.records)
        for record in qc["series"]:
            for key in ("series_uid", "status", "reason", "output", "label", "shape"):
                assert key in record
            for key in ("spacing", "orientation", "modality", "manufacturer", "n_files"):
                assert key in record


def test_no_patient_identifier_reaches_the_outputs(hospitals, ingested):
    out, sites = hospitals
    secrets = set()
    for site in sites:
        for path in (out / site.name / "dicom").rglob("*.dcm"):
            dataset = pydicom.dcmread(path, stop_before_pixels=True)
            secrets |= {
                str(dataset.PatientName),
                dataset.PatientID,
                dataset.PatientBirthDate,
                dataset.AccessionNumber,
            }
    for _, target in ingested.values():
        for path in target.rglob("*"):
            if path.suffix == ".gz":
                content = gzip.decompress(path.read_bytes())[:1024]  # NIfTI header + extension
            elif path.is_file():
                content = path.read_bytes()
            else:
                continue
            for secret in secrets:
                assert secret.encode() not in content, (path, "holds a patient identifier")


def test_datalist_is_a_decathlon_list_monai_loads(ingested):
    report, target = ingested["site-1"]
    training = load_decathlon_datalist(target / "datalist.json", data_list_key="training")
    validation = load_decathlon_datalist(target / "datalist.json", data_list_key="validation")
    assert len(training) + len(validation) == len(report.records)
    assert len(validation) >= 1
    for item in training + validation:
        assert Path(item["image"]).is_file() and Path(item["label"]).is_file()
    datalist = json.loads((target / "datalist.json").read_text())
    assert datalist["labels"]["3"] == "enhancing tumour"


def test_source_is_untouched_and_a_rerun_changes_nothing(hospitals, tmp_path):
    out, _ = hospitals
    source = out / "site-2" / "dicom"
    before = tree_digest(source)
    first = run_ingest(source, tmp_path / "out", manifest=out / "site-2" / "manifest.csv")
    written = tree_digest(tmp_path / "out")
    second = run_ingest(source, tmp_path / "out", manifest=out / "site-2" / "manifest.csv")
    assert tree_digest(source) == before
    assert tree_digest(tmp_path / "out") == written
    assert sorted(second.unchanged) == sorted(first.converted) and not second.converted


def test_worker_processes_give_the_same_dataset(hospitals, tmp_path):
    out, _ = hospitals
    source, manifest = out / "site-3" / "dicom", out / "site-3" / "manifest.csv"
    run_ingest(source, tmp_path / "one", manifest=manifest, workers=1)
    run_ingest(source, tmp_path / "two", manifest=manifest, workers=2)
    assert tree_digest(tmp_path / "one") == tree_digest(tmp_path / "two")


def test_interrupted_run_then_rerun_equals_one_clean_run(hospitals, tmp_path):
    out, _ = hospitals
    source = out / "site-1" / "dicom"
    manifest = out / "site-1" / "manifest.csv"
    run_ingest(source, tmp_path / "clean", manifest=manifest)
    clean = tree_digest(tmp_path / "clean")

    interrupted = tmp_path / "interrupted"
    run_ingest(source, interrupted, manifest=manifest)
    first_image = sorted((interrupted / "images").iterdir())[0]
    first_image.unlink()  # killed before this case was written
    (interrupted / "images" / ".tmp-case-half.nii.gz").write_bytes(b"partial")
    (interrupted / "qc.json").unlink()  # killed before the QC record was written
    (interrupted / "labels" / "case-000000000000.nii.gz").write_bytes(b"stale")
    run_ingest(source, interrupted, manifest=manifest)
    assert tree_digest(interrupted) == clean


def test_a_series_removed_from_the_source_leaves_the_dataset(hospitals, tmp_path):
    out, _ = hospitals
    source = tmp_path / "src"
    shutil.copytree(out / "site-1" / "dicom", source)
    first = run_ingest(source, tmp_path / "out")
    gone = sorted(source.iterdir())[0]
    shutil.rmtree(gone)
    second = run_ingest(source, tmp_path / "out")
    assert len(second.records) == len(first.records) - 1
    images = {p.name for p in (tmp_path / "out" / "images").iterdir()}
    assert images == {Path(r["output"]).name for r in second.records}


def test_a_site_folder_holding_series_labels_and_manifest_ingests_each_series_once(
    hospitals, tmp_path
):
    """The manifest's label files may lie inside the input folder: they are labels, not cases."""
    out, sites = hospitals
    site = next(site for site in sites if site.name == "site-1")
    source = tmp_path / "site-1"
    for part in ("dicom", "labels"):
        shutil.copytree(out / "site-1" / part, source / part)
    shutil.copy(out / "site-1" / "manifest.csv", source)
    report = run_ingest(source, tmp_path / "out", manifest=source / "manifest.csv")
    accepted = only(report, "accepted")
    assert len(accepted) == len(site.cases)
    assert all(record["modality"] == "MR" and record["label"] for record in accepted)
    datalist = json.loads((tmp_path / "out" / "datalist.json").read_text())
    assert not datalist["test"]


def test_enhanced_multiframe_mr_matches_its_single_frame_original(hospitals, tmp_path):
    """highdicom converts site-3's oblique series to one enhanced MR file; both ingest alike."""
    out, _ = hospitals
    entry = read_manifest(out / "site-3" / "manifest.csv")[0]
    series = out / "site-3" / "dicom" / entry.case_id
    legacy = [pydicom.dcmread(p) for p in sorted(series.iterdir())]
    enhanced = hd.legacy.LegacyConvertedEnhancedMRImage(
        legacy, hd.UID(), 99, hd.UID(), 1, require_volume=True
    )
    (tmp_path / "enhanced").mkdir()
    enhanced.save_as(tmp_path / "enhanced" / "volume.dcm")

    single = only(run_ingest(series, tmp_path / "single"), "accepted")[0]
    multi = only(run_ingest(tmp_path / "enhanced", tmp_path / "multi"), "accepted")[0]
    assert multi["n_files"] == 1 and multi["n_frames"] == single["n_files"]
    a = nib.load(tmp_path / "single" / single["output"])
    b = nib.load(tmp_path / "multi" / multi["output"])
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-4)
    np.testing.assert_allclose(np.asarray(a.dataobj), np.asarray(b.dataobj), atol=1e-4)


def test_dicom_seg_label_equals_the_manifest_label(hospitals, tmp_path):
    """A SEG written by highdicom from the synthetic label lands on the same voxels."""
    out, _ = hospitals
    entry = read_manifest(out / "site-2" / "manifest.csv")[0]
    series = out / "site-2" / "dicom" / entry.case_id
    source = tmp_path / "src"
    shutil.copytree(series, source)
    datasets = sorted_along_normal(list(source.iterdir()))
    label = np.asarray(nib.load(entry.label).dataobj)  # [i, j, k], k ascending along the normal
    label_map = np.ascontiguousarray(label.transpose(2, 1, 0)).astype(np.uint8)
    write_segmentation(datasets, label_map, source / "tumour_seg.dcm")

    from_seg = only(run_ingest(source, tmp_path / "seg"), "accepted")[0]
    from_manifest = only(
        run_ingest(series, tmp_path / "manifest", manifest=out / "site-2" / "manifest.csv"),
        "accepted",
    )[0]
    seg_label = np.asarray(nib.load(tmp_path / "seg" / from_seg["label"]).dataobj)
    manifest_label = np.asarray(nib.load(tmp_path / "manifest" / from_manifest["label"]).dataobj)
    assert set(np.unique(seg_label)) == {0, 1, 2, 3}
    np.testing.assert_array_equal(seg_label, manifest_label)


def seg_labelled_series(hospitals, source: Path) -> tuple[list[pydicom.Dataset], np.ndarray]:
    """Copies a site-2 (axial) series to ``source`` and labels it with a DICOM SEG.

    Returns:
        The series' datasets sorted along the normal, and the label as ingestion must write it
        (canonical RAS).
    """
    out, _ = hospitals
    entry = read_manifest(out / "site-2" / "manifest.csv")[0]
    shutil.copytree(out / "site-2" / "dicom" / entry.case_id, source)
    datasets = sorted_along_normal(sorted(source.iterdir()))
    label = nib.load(entry.label)
    values = np.asarray(label.dataobj)  # [i, j, k], k ascending along the normal
    label_map = np.ascontiguousarray(values.transpose(2, 1, 0)).astype(np.uint8)
    write_segmentation(datasets, label_map, source / "tumour_seg.dcm")
    return datasets, np.asarray(nib.as_closest_canonical(label).dataobj)


def test_a_seg_labels_only_the_group_of_slices_it_was_drawn_on(hospitals, tmp_path):
    """A coronal group sharing the axial series' UID, with a slice at the height (along its own
    normal) of every SEG frame, must not take the axial SEG as its label."""
    source = tmp_path / "src"
    datasets, label = seg_labelled_series(hospitals, source)
    first = datasets[0]
    row = np.array(first.ImageOrientationPatient[:3], float)
    column = np.array(first.ImageOrientationPatient[3:], float)
    normal = np.cross(row, column)
    spacing = float(first.PixelSpacing[0])
    for j in range(4):  # coronal: rows along -normal, slices stacked along the axial column
        coronal = pydicom.dcmread(source / Path(first.filename).name)
        coronal.SOPInstanceUID = generate_uid()
        coronal.ImageOrientationPatient = [f"{v:g}" for v in (*row, *(-normal))]
        position = np.array(first.ImagePositionPatient, float) + j * spacing * column
        coronal.ImagePositionPatient = [f"{v:.4f}" for v in position]
        coronal.save_as(source / f"coronal{j}.dcm")

    report = run_ingest(source, tmp_path / "out")
    axial, coronal = sorted(only(report, "accepted"), key=lambda r: -r["n_files"])
    assert coronal["n_files"] == 4 and axial["n_files"] == len(datasets)
    assert coronal["label"] is None
    assert "DICOM SEG tumour_seg.dcm not applied: its frame 1 is oriented" in coronal["reason"]
    assert axial["reason"] == ""
    np.testing.assert_array_equal(
        np.asarray(nib.load(tmp_path / "out" / axial["label"]).dataobj), label
    )


def test_a_seg_shifted_in_plane_is_not_applied(hospitals, tmp_path):
    source = tmp_path / "src"
    seg_labelled_series(hospitals, source)
    seg = pydicom.dcmread(source / "tumour_seg.dcm")
    for group in seg.PerFrameFunctionalGroupsSequence:
        plane = group.PlanePositionSequence[0]
        plane.ImagePositionPatient = [float(plane.ImagePositionPatient[0]) + 10.0,
                                      *plane.ImagePositionPatient[1:]]  # fmt: skip
    seg.save_as(source / "tumour_seg.dcm")
    (record,) = run_ingest(source, tmp_path / "out").records
    assert record["status"] == "accepted" and record["label"] is None
    assert "tumour_seg.dcm not applied: its frame 1 lies 10 mm in-plane off" in record["reason"]


def test_adding_a_second_seg_then_rerunning_equals_a_clean_run(hospitals, tmp_path):
    source = tmp_path / "src"
    seg_labelled_series(hospitals, source)
    second = pydicom.dcmread(source / "tumour_seg.dcm")
    second.SOPInstanceUID = generate_uid()
    rerun = tmp_path / "rerun"
    (first,) = run_ingest(source, rerun).records
    assert first["status"] == "accepted" and first["label"]
    one_seg = tree_digest(rerun)

    second.save_as(source / "tumour_seg_2.dcm")
    run_ingest(source, rerun)
    (clean,) = run_ingest(source, tmp_path / "clean").records
    assert tree_digest(rerun) == tree_digest(tmp_path / "clean")
    assert clean["status"] == "rejected"
    assert "several DICOM SEG objects label the series" in clean["reason"]

    (source / "tumour_seg_2.dcm").unlink()
    run_ingest(source, rerun)
    assert tree_digest(rerun) == one_seg


def test_an_unforeseen_failure_rejects_its_case_and_the_run_goes_on(
    hospitals, tmp_path, monkeypatch
):
    out, _ = hospitals
    source = out / "site-1" / "dicom"
    victim = sorted(read_manifest(out / "site-1" / "manifest.csv"), key=lambda e: e.case_id)[0]
    real_load_series = pipeline.load_series

    def failing_load_series(decision):
        if decision.series_uid == victim.series_uid:
            raise RuntimeError(f"decoder crashed on {decision.frames[0].path}")
        return real_load_series(decision)

    monkeypatch.setattr(pipeline, "load_series", failing_load_series)
    report = run_ingest(source, tmp_path / "out")
    (rejected,) = only(report, "rejected")
    assert rejected["series_uid"] == victim.series_uid
    assert rejected["reason"].startswith(
        f"conversion failed (RuntimeError: decoder crashed on {victim.case_id}/"
    )
    assert rejected["source"] == victim.case_id
    assert len(only(report, "accepted")) == len(report.records) - 1
    assert_no_absolute_paths(tmp_path / "out", source)


def test_cli_reports_and_exits_by_outcome(hospitals, tmp_path):
    out, _ = hospitals
    ok = subprocess.run(
        [FEDSEG, "ingest", "--input", str(out / "site-1" / "dicom"), "--output",
         str(tmp_path / "ok"), "--manifest", str(out / "site-1" / "manifest.csv")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "3 accepted (3 converted, 0 unchanged), 0 rejected, 0 skipped" in ok.stdout
    assert "SYNTHETIC^PATIENT" not in ok.stdout + ok.stderr

    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "readme.txt").write_text("nothing to see")
    none = subprocess.run(
        [FEDSEG, "ingest", "--input", str(tmp_path / "junk"), "--output", str(tmp_path / "no")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert none.returncode == 1 and "no series accepted" in none.stderr

    missing = subprocess.run(
        [FEDSEG, "ingest", "--input", str(tmp_path / "absent"), "--output", str(tmp_path / "x")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert missing.returncode == 2 and "input folder not found" in missing.stderr
    inside = subprocess.run(
        [FEDSEG, "ingest", "--input", str(tmp_path / "junk"), "--output",
         str(tmp_path / "junk" / "out")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert inside.returncode == 2 and "must not lie inside the input folder" in inside.stderr
    assert not (tmp_path / "junk" / "out").exists()
