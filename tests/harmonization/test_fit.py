"""Fitting from aggregates: exact combination, artifacts, refusals, and the command line."""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from app_site.harmonization import (
    dataset_images,
    load_channel_first,
    site_statistics,
)
from app_site.ingest.pipeline import IngestOptions, ingest
from app_site.site_config import site_dataset
from fedseg.artifacts import ArtifactError, write_artifact
from fedseg.cli import main
from fedseg.harmonization import (
    ARTIFACT_VERSION,
    HarmonizationConfig,
    HarmonizationError,
    SiteStatistics,
    artifact_transform,
    combine_statistics,
    read_harmonization_artifact,
)
from transforms.intensity import (
    DECILE_PERCENTILES,
    HUWindow,
    NyulStandardize,
    image_landmarks,
    rescale_landmarks,
)
from transforms.masks import foreground_mask

FEDSEG = str(Path(sys.executable).with_name("fedseg"))
CONFIG = HarmonizationConfig(min_images=2)


def test_federated_combination_equals_the_pooled_fit(datasets):
    statistics = {site: site_statistics(folder, CONFIG) for site, folder in datasets.items()}
    federated = combine_statistics(CONFIG, statistics, "MR")["standard_scale"]
    pooled = np.mean(
        [
            rescale_landmarks(image_landmarks(load_channel_first(image), CONFIG.percentiles,
                                              CONFIG.mask_method))
            for folder in datasets.values()
            for image in dataset_images(folder)
        ],
        axis=0,
    )  # fmt: skip
    np.testing.assert_allclose(federated, pooled, rtol=0, atol=1e-9)
    assert federated[0] == pytest.approx(0.0) and federated[-1] == pytest.approx(100.0)


def test_only_declared_aggregates_are_shared(datasets):
    statistics = site_statistics(datasets["site-1"], CONFIG)
    assert set(statistics.to_dict()) == {
        "method", "image_count", "landmark_sum", "voxel_count", "voxel_sum", "voxel_sum_sq",
    }  # fmt: skip
    assert len(statistics.landmark_sum) == len(CONFIG.percentiles)
    with pytest.raises(HarmonizationError, match="undeclared statistics fields"):
        SiteStatistics.from_dict({**statistics.to_dict(), "pixels": [1, 2, 3]})


def test_a_site_with_too_few_images_refuses_to_share(datasets):
    with pytest.raises(HarmonizationError, match="fewer than the 5 a site needs"):
        site_statistics(datasets["site-2"], HarmonizationConfig())


def test_ct_statistics_give_the_pooled_windowed_mean_and_deviation(tmp_path):
    from pydicom.data import get_testdata_file

    ct5n = Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests/98892001/CT5N"
    ingest(IngestOptions(source=ct5n, output=tmp_path / "ct"))
    config = HarmonizationConfig(method="ct", mask_method="otsu", min_images=1)
    artifact = combine_statistics(config, {"a": site_statistics(tmp_path / "ct", config)}, "CT")
    image = HUWindow(*config.hu_window)(load_channel_first(dataset_images(tmp_path / "ct")[0]))
    values = np.asarray(image)[0][foreground_mask(image, "otsu")].astype(np.float64)
    assert artifact["mean"] == pytest.approx(values.mean()) and artifact["std"] == pytest.approx(
        values.std()
    )
    harmonized = np.asarray(artifact_transform(artifact)(image))[0]
    assert harmonized[foreground_mask(image, "otsu")].mean() == pytest.approx(0.0, abs=1e-4)


def test_artifacts_are_verified(tmp_path):
    payload = combine_statistics(
        CONFIG, {"a": SiteStatistics("nyul", 2, landmark_sum=list(range(5)))}, "MR"
    )
    path = tmp_path / "h.json"
    digest = write_artifact(payload, path)
    assert read_harmonization_artifact(path, expected_hash=digest)["hash"] == digest
    with pytest.raises(ArtifactError, match="is not the job's"):
        read_harmonization_artifact(path, expected_hash="0" * 64)
    tampered = json.loads(path.read_text())
    tampered["standard_scale"][3] += 1.0
    path.write_text(json.dumps(tampered))
    with pytest.raises(ArtifactError, match="does not match its hash; it was altered"):
        read_harmonization_artifact(path)
    with pytest.raises(ArtifactError, match="missing"):
        read_harmonization_artifact(tmp_path / "absent.json")
    (tmp_path / "other.json").write_text(json.dumps({"kind": "something else"}))
    with pytest.raises(ArtifactError, match=r"not a fedseg\.harmonization artifact"):
        read_harmonization_artifact(tmp_path / "other.json")


def test_configuration_is_checked():
    with pytest.raises(HarmonizationError, match="method must be one of"):
        HarmonizationConfig(method="histogram")
    with pytest.raises(HarmonizationError, match="unknown harmonization settings"):
        HarmonizationConfig.from_dict({"method": "nyul", "bins": 3})
    assert HarmonizationConfig.from_dict(CONFIG.to_dict()) == CONFIG


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"tail_percentiles": (20.0, 80.0)}, "two increasing landmark percentiles"),
        ({"tail_percentiles": (75.0, 25.0)}, "two increasing landmark percentiles"),
        ({"tail_percentiles": (25.0,)}, "two increasing landmark percentiles"),
        ({"percentiles": (1.0, 50.0, 99.0)}, "two increasing landmark percentiles"),
    ],
)
def test_tail_percentiles_must_be_landmarks(settings, message):
    with pytest.raises(HarmonizationError, match=message):
        HarmonizationConfig(**settings)


@pytest.mark.parametrize(
    ("settings", "tail"),
    [
        pytest.param({}, (1, 3), id="default-interquartile"),
        pytest.param(
            {"percentiles": DECILE_PERCENTILES, "tail_percentiles": None}, None, id="classic"
        ),
        pytest.param(
            {"percentiles": (1.0, 25.0, 50.0, 75.0, 99.0), "tail_percentiles": (1.0, 99.0)},
            (0, 4),
            id="custom",
        ),
    ],
)
def test_nyul_configuration_travels_through_the_artifact(settings, tail):
    config = HarmonizationConfig(min_images=1, **settings)
    assert HarmonizationConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    landmarks = list(np.linspace(0.0, 100.0, len(config.percentiles)))
    artifact = combine_statistics(
        config, {"a": SiteStatistics("nyul", 1, landmark_sum=landmarks)}, "MR"
    )
    transform = artifact_transform(artifact)
    assert isinstance(transform, NyulStandardize)
    assert transform.percentiles == config.percentiles and transform.tail == tail


def test_an_artifact_of_the_previous_format_is_refused(tmp_path):
    payload = combine_statistics(
        CONFIG, {"a": SiteStatistics("nyul", 2, landmark_sum=list(range(5)))}, "MR"
    )
    path = tmp_path / "old.json"
    write_artifact({**payload, "format_version": ARTIFACT_VERSION - 1}, path)
    with pytest.raises(ArtifactError, match="format version 1, this fedseg reads 2; fit it again"):
        read_harmonization_artifact(path)


def test_site_data_location_comes_from_the_site(datasets, tmp_path, monkeypatch):
    monkeypatch.delenv("FEDSEG_DATASET", raising=False)
    monkeypatch.delenv("FEDSEG_DATASET_SITE_9", raising=False)
    with pytest.raises(FileNotFoundError, match="set FEDSEG_DATASET_SITE_9"):
        site_dataset("site-9", start=tmp_path)
    kit = tmp_path / "kit"
    (kit / "local").mkdir(parents=True)
    (kit / "local" / "fedseg_site.json").write_text(
        json.dumps({"dataset": str(datasets["site-1"])})
    )
    (kit / "job-42" / "app").mkdir(parents=True)
    assert site_dataset("site-9", start=kit / "job-42" / "app") == datasets["site-1"]
    monkeypatch.setenv("FEDSEG_DATASET_SITE_9", str(datasets["site-2"]))
    assert site_dataset("site-9", start=kit) == datasets["site-2"]


def run(*args):
    return subprocess.run([FEDSEG, *args], capture_output=True, text=True, timeout=300)


def test_cli_fit_apply_check(datasets, tmp_path):
    artifact = tmp_path / "harmonization.json"
    sites = [str(datasets[name]) for name in ("site-1", "site-2", "site-3")]
    fit = run("harmonize", "fit", *[a for s in sites for a in ("--dataset", s)],
              "--out", str(artifact), "--min-images", "2")  # fmt: skip
    assert fit.returncode == 0, fit.stderr
    document = json.loads(artifact.read_text())
    assert document["n_sites"] == 3 and document["config"]["method"] == "nyul"
    assert document["config"]["mask_method"] == "brain"

    applied = run("harmonize", "apply", "--artifact", str(artifact), "--dataset", sites[1],
                  "--output", str(tmp_path / "harmonized"))  # fmt: skip
    assert applied.returncode == 0, applied.stderr
    originals = sorted(p.name for p in dataset_images(datasets["site-2"]))
    assert sorted(p.name for p in (tmp_path / "harmonized").iterdir()) == originals
    one = nib.load(tmp_path / "harmonized" / originals[0])
    np.testing.assert_allclose(one.affine, nib.load(dataset_images(datasets["site-2"])[0]).affine)

    check = run("harmonize", "check", "--artifact", str(artifact), "--dataset", sites[1])
    assert check.returncode == 0 and "deviation" in check.stdout

    document["standard_scale"][2] = 0.0
    artifact.write_text(json.dumps(document))
    broken = run("harmonize", "check", "--artifact", str(artifact), "--dataset", sites[1])
    assert broken.returncode == 2 and "it was altered" in broken.stderr
    refused = run("harmonize", "fit", "--dataset", sites[1], "--out", str(tmp_path / "x.json"))
    assert refused.returncode == 2 and "fewer than the 5" in refused.stderr


def test_a_fit_counts_each_dataset_once_and_windows_hounsfield_units_only_on_ct(
    datasets, tmp_path, capsys
):
    site = str(datasets["site-1"])
    same_again = str(datasets["site-1"] / ".." / datasets["site-1"].name)
    fit = ["harmonize", "fit", "--out", str(tmp_path / "h.json"), "--min-images", "2"]
    assert main([*fit, "--dataset", site, "--dataset", same_again]) == 2
    assert f"the same dataset as {site}" in " ".join(capsys.readouterr().err.split())
    assert main([*fit, "--dataset", site, "--method", "ct"]) == 2
    error = " ".join(capsys.readouterr().err.split())
    assert "method ct windows Hounsfield units, but the images are MR" in error
    assert not (tmp_path / "h.json").exists()
    config = HarmonizationConfig(method="ct", min_images=1)
    with pytest.raises(HarmonizationError, match="use nyul"):
        combine_statistics(config, {"a": site_statistics(datasets["site-1"], config)}, "MR")
