import csv
import hashlib
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from app_site.ingest.manifest import read_manifest
from fedseg.synth.anatomy import Tissue
from fedseg.synth.check import SynthCheckError, check_hospitals, read_dicom_series
from fedseg.synth.hospitals import SynthConfig, synthesize_hospitals
from tests.conftest import HOSPITALS


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def series_datasets(series_folder: Path) -> dict[str, pydicom.Dataset]:
    return {path.name: pydicom.dcmread(path) for path in sorted(series_folder.glob("*.dcm"))}


def position_along_normal(dataset: pydicom.Dataset) -> float:
    orientation = np.array(dataset.ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    return float(np.dot(normal, np.array(dataset.ImagePositionPatient, dtype=float)))


def test_layout_and_manifest_contract(hospitals):
    out, sites = hospitals
    assert [site.name for site in sites] == ["site-1", "site-2", "site-3", "site-4"]
    for site in sites:
        folder = out / site.name
        with (folder / "manifest.csv").open() as handle:
            assert next(csv.reader(handle)) == ["case_id", "series_uid", "label"]
        rows = read_manifest(folder / "manifest.csv")
        assert len(rows) == len(site.cases)
        for row in rows:
            assert (folder / "dicom" / row.case_id).is_dir()
            label = nib.load(row.label)
            assert label.get_data_dtype() == np.uint8
            assert set(np.unique(np.asarray(label.dataobj))) <= {0, 1, 2, 3}
    assert not list(out.glob(".*")), "no staging folders are left behind"


def test_labels_hold_all_tumour_regions(hospitals):
    out, sites = hospitals
    seen = set()
    for site in sites:
        for row in read_manifest(out / site.name / "manifest.csv"):
            seen |= set(np.unique(np.asarray(nib.load(row.label).dataobj)))
    assert seen == {0, 1, 2, 3}


def test_each_series_is_one_consistent_dicom_series(hospitals):
    out, sites = hospitals
    for site in sites:
        for row in read_manifest(out / site.name / "manifest.csv"):
            datasets = series_datasets(out / site.name / "dicom" / row.case_id).values()
            for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
                assert len({getattr(ds, keyword) for ds in datasets}) == 1, keyword
            assert {ds.SeriesInstanceUID for ds in datasets} == {row.series_uid}
            assert len({ds.SOPInstanceUID for ds in datasets}) == len(datasets)
            assert sorted(ds.InstanceNumber for ds in datasets) == list(range(1, len(datasets) + 1))
            first = next(iter(datasets))
            assert first.Modality == "MR"
            assert first.file_meta.MediaStorageSOPInstanceUID == first.SOPInstanceUID
            for keyword in (
                "PixelSpacing",
                "SliceThickness",
                "ImageOrientationPatient",
                "RescaleSlope",
                "RescaleIntercept",
                "Manufacturer",
                "ManufacturerModelName",
                "MagneticFieldStrength",
                "PatientID",
            ):
                assert keyword in first, keyword


def test_scanner_profiles_differ_in_vendor_storage_and_rescale(hospitals):
    out, sites = hospitals
    first = {}
    for site in sites:
        row = read_manifest(out / site.name / "manifest.csv")[0]
        first[site.name] = next(
            iter(series_datasets(out / site.name / "dicom" / row.case_id).values())
        )
    assert len({ds.Manufacturer for ds in first.values()}) == 4
    assert first["site-2"].PixelRepresentation == 1
    assert first["site-2"].pixel_array.min() < 0, "signed storage holds negative values"
    assert first["site-1"].PixelRepresentation == 0
    assert float(first["site-3"].RescaleSlope) == pytest.approx(0.001)
    assert float(first["site-2"].RescaleIntercept) == pytest.approx(200.0)
    assert len({tuple(ds.PixelSpacing) for ds in first.values()}) >= 3


def test_instance_numbers_and_file_names_do_not_always_follow_position(hospitals):
    out, _ = hospitals
    orders = {}
    for site in ("site-1", "site-2", "site-3"):
        row = read_manifest(out / site / "manifest.csv")[0]
        datasets = series_datasets(out / site / "dicom" / row.case_id)
        by_position = sorted(datasets, key=lambda name: position_along_normal(datasets[name]))
        instance_by_position = [datasets[name].InstanceNumber for name in by_position]
        orders[site] = (by_position, instance_by_position)
    names, instances = orders["site-1"]
    assert names == sorted(names) and instances == sorted(instances)
    _, instances = orders["site-2"]
    assert instances == sorted(instances, reverse=True), "site-2 numbers against position"
    names, _ = orders["site-3"]
    assert names != sorted(names) and names != sorted(names, reverse=True)


def tissue_means(out: Path, site: str, tissue: Tissue) -> list[float]:
    means = []
    for row in read_manifest(out / site / "manifest.csv"):
        image = read_dicom_series(out / site / "dicom" / row.case_id, row.series_uid)
        tissues = sitk.ReadImage(str(out / site / "tissues" / f"{row.case_id}.nii.gz"))
        pixels = sitk.GetArrayFromImage(image)
        means.append(float(pixels[sitk.GetArrayViewFromImage(tissues) == tissue].mean()))
    return means


@pytest.mark.parametrize("tissue", [Tissue.WHITE_MATTER, Tissue.GREY_MATTER])
def test_same_tissue_looks_different_at_each_site(hospitals, tissue):
    out, sites = hospitals
    per_site = [tissue_means(out, site.name, tissue) for site in sites]
    site_means = np.array([np.mean(values) for values in per_site])
    within_site_sd = np.mean([np.std(values, ddof=1) for values in per_site])
    site_effect = np.std(site_means, ddof=1) / within_site_sd
    assert site_effect > 10, f"site effect {site_effect:.1f} for {tissue.name}"


def test_intensity_response_is_non_linear_across_sites(hospitals):
    """Grey/white contrast differs, so a linear (z-score) normalization cannot align sites."""
    out, _ = hospitals
    ratios = {}
    for site in ("site-1", "site-2", "site-3"):
        grey = np.mean(tissue_means(out, site, Tissue.GREY_MATTER))
        white = np.mean(tissue_means(out, site, Tissue.WHITE_MATTER))
        background = np.mean(tissue_means(out, site, Tissue.BACKGROUND))
        ratios[site] = (grey - background) / (white - background)
    assert ratios["site-2"] - ratios["site-1"] > 0.05
    assert ratios["site-1"] - ratios["site-3"] > 0.05


def test_sites_are_not_iid(tmp_path):
    sites = synthesize_hospitals(
        SynthConfig(out=tmp_path, sites=3, cases_per_site=6, size=24, seed=3), workers=2
    )
    counts = [len(site.cases) for site in sites]
    assert counts == [8, 6, 5]
    median_ml = [np.median([case.tumour_volume_ml for case in site.cases]) for site in sites]
    assert median_ml[1] > 2 * median_ml[2], median_ml


def test_same_seed_gives_byte_identical_files_whatever_the_workers(hospitals, tmp_path):
    out, _ = hospitals
    synthesize_hospitals(SynthConfig(out=tmp_path, **HOSPITALS), workers=1)
    assert tree_digest(tmp_path) == tree_digest(out)


def test_another_seed_gives_other_data(tmp_path):
    first = synthesize_hospitals(
        SynthConfig(out=tmp_path / "a", sites=1, cases_per_site=1, size=24, seed=1)
    )
    second = synthesize_hospitals(
        SynthConfig(out=tmp_path / "b", sites=1, cases_per_site=1, size=24, seed=2)
    )
    assert first[0].cases[0].series_uid != second[0].cases[0].series_uid
    assert tree_digest(tmp_path / "a" / "site-1" / "labels") != tree_digest(
        tmp_path / "b" / "site-1" / "labels"
    )


def test_rerun_replaces_sites_whole_and_cleans_interrupted_runs(tmp_path):
    config = SynthConfig(out=tmp_path, sites=1, cases_per_site=3, size=24, seed=5)
    synthesize_hospitals(config)
    clean = tree_digest(tmp_path)
    # A crashed earlier run left a staging folder; a run with more cases left extra files.
    (tmp_path / ".site-1.partial" / "dicom").mkdir(parents=True)
    (tmp_path / ".site-1.partial" / "dicom" / "junk.dcm").write_bytes(b"half")
    (tmp_path / "site-1" / "dicom" / "site-1_case099").mkdir()
    synthesize_hospitals(config)
    assert tree_digest(tmp_path) == clean
    assert not (tmp_path / ".site-1.partial").exists()


def test_check_accepts_good_data_and_finds_broken_cases(hospitals, tmp_path):
    out, sites = hospitals
    checks = check_hospitals(out)
    assert len(checks) == sum(len(site.cases) for site in sites)
    assert {check.oblique for check in checks} == {True, False}

    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    # A label value outside the tumour classes, and a series missing a slice.
    case = read_manifest(broken / "site-1" / "manifest.csv")[0].case_id
    path = broken / "site-1" / "labels" / f"{case}.nii.gz"
    image = nib.load(path)
    tampered = np.asarray(image.dataobj).copy()
    tampered[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(tampered, image.affine, image.header), path)
    victim = read_manifest(broken / "site-2" / "manifest.csv")[0].case_id
    next(iter(sorted((broken / "site-2" / "dicom" / victim).glob("*.dcm")))).unlink()

    with pytest.raises(SynthCheckError) as error:
        check_hospitals(broken)
    message = str(error.value)
    assert f"site-1/labels/{case}.nii.gz" in message and "label values [7]" in message
    assert f"site-2/labels/{victim}.nii.gz" in message and "size" in message
