"""What a job refuses before anything is built, trained or submitted (no training here)."""

import gc
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from app_server.federation import (
    HE_BUILDER,
    HE_PARAMETERS,
    Federation,
    FederationError,
    prepare,
)
from app_site.harmonization import check_artifact_modality, site_statistics
from fedseg.artifacts import ArtifactError, write_artifact
from fedseg.cli import main
from fedseg.config import load_config
from fedseg.harmonization import HarmonizationConfig, HarmonizationError, combine_statistics
from jobs.runner import export_job, run_in_federation, run_job


@pytest.fixture(scope="module")
def artifacts(datasets, tmp_path_factory):
    """Artifacts fitted on site-1 (MR) with the brain mask (the profiles') and the head mask."""
    folder = tmp_path_factory.mktemp("artifacts")
    fitted = {}
    for mask in ("brain", "head"):
        config = HarmonizationConfig(mask_method=mask, min_images=2)
        statistics = {"site-1": site_statistics(datasets["site-1"], config)}
        fitted[mask] = folder / f"{mask}.json"
        write_artifact(combine_statistics(config, statistics, "MR"), fitted[mask])
    return fitted


def tiny_with(**harmonization):
    config = load_config("tiny")
    return replace(config, harmonization=replace(config.harmonization, **harmonization))


def test_an_altered_artifact_is_refused_at_export(artifacts, tmp_path, capsys):
    altered = json.loads(artifacts["brain"].read_text())
    altered["standard_scale"][3] += 1.0
    (tmp_path / "altered.json").write_text(json.dumps(altered))
    arguments = ["job", "export", "--config", "tiny", "--out", str(tmp_path / "out")]
    status = main([*arguments, "--harmonization", str(tmp_path / "altered.json")])
    assert status == 2 and "it was altered" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    (tmp_path / "other.json").write_text(json.dumps({"hash": "0" * 64}))
    with pytest.raises(ArtifactError, match=r"not a fedseg\.harmonization artifact"):
        export_job(load_config("tiny"), tmp_path / "out", tmp_path / "other.json")


def test_an_artifact_must_be_the_one_the_configuration_names(artifacts, tmp_path):
    with pytest.raises(ValueError, match=r"harmonization\.method is none; leave the artifact out"):
        export_job(tiny_with(method="none"), tmp_path / "a", artifacts["brain"])
    fitted_with_head = r"fitted with method nyul and mask head, but .* mask brain"
    with pytest.raises(ValueError, match=fitted_with_head):
        export_job(load_config("tiny"), tmp_path / "b", artifacts["head"])
    with pytest.raises(ValueError, match="asks for harmonization: fit an artifact first"):
        export_job(load_config("tiny"), tmp_path / "c")
    job = export_job(tiny_with(mask="head"), tmp_path / "d", artifacts["head"])
    manifest = json.loads(next(job.rglob("fedseg_job.json")).read_text())
    assert manifest["harmonization_hash"] == json.loads(artifacts["head"].read_text())["hash"]


def test_export_names_its_own_job_folder_and_leaves_no_staging_behind(
    artifacts, tmp_path, monkeypatch
):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    for earlier in ("a-job", "zz-job"):  # other jobs exported into the same folder
        (tmp_path / "out" / earlier).mkdir(parents=True)
        (tmp_path / "out" / earlier / "meta.json").write_text("{}")
    job = export_job(load_config("tiny"), tmp_path / "out", artifacts["brain"])
    assert job == (tmp_path / "out" / "fedseg-segmentation").resolve()
    assert json.loads((job / "meta.json").read_text())["name"] == "fedseg-segmentation"
    assert (tmp_path / "out" / "zz-job" / "meta.json").read_text() == "{}"
    gc.collect()
    assert not list((tmp_path / "tmp").iterdir()), "the initial model's staging folder is gone"


def without_split(dataset: Path, folder: Path, split: str) -> Path:
    """A copy of ``dataset``'s datalist with ``split`` emptied (the images are not needed)."""
    datalist = json.loads((dataset / "datalist.json").read_text())
    folder.mkdir()
    (folder / "datalist.json").write_text(json.dumps({**datalist, split: []}))
    return folder


def test_a_missing_or_repeated_site_dataset_is_refused_before_any_work(datasets, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing: holds no datalist\.json"):
        run_job(load_config("tiny"), [datasets["site-1"], tmp_path / "missing"], tmp_path / "w")
    (tmp_path / "link").symlink_to(datasets["site-1"])
    with pytest.raises(ValueError, match="link: the same dataset as"):
        run_job(load_config("tiny"), [datasets["site-1"], tmp_path / "link"], tmp_path / "w")
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    ("split", "message"),
    [
        ("validation", r"no validation case, .* --validation-fraction above 0"),
        ("training", r"no labelled training case; give fedseg ingest the tumour labels"),
    ],
)
def test_a_site_dataset_without_a_split_is_refused_before_any_work(
    datasets, tmp_path, split, message
):
    """It would train for the whole job and fail its reports only at the end."""
    empty = without_split(datasets["site-2"], tmp_path / "empty", split)
    with pytest.raises(ValueError, match=rf"empty/datalist\.json: {message}"):
        run_job(load_config("tiny"), [datasets["site-1"], empty], tmp_path / "w")
    assert not (tmp_path / "w").exists()
    with pytest.raises(FederationError, match=rf"site-2: .*empty/datalist\.json: {message}"):
        prepare(tmp_path / "federation", 2, "none", {"site-2": empty})
    assert not (tmp_path / "federation").exists()


def test_an_artifact_fitted_on_another_modality_is_refused(artifacts, datasets, tmp_path):
    artifact = json.loads(artifacts["brain"].read_text())
    check_artifact_modality(artifact, datasets["site-1"])  # MR on MR
    ct_site = tmp_path / "ct-site"
    ct_site.mkdir()
    datalist = json.loads((datasets["site-2"] / "datalist.json").read_text())
    (ct_site / "datalist.json").write_text(json.dumps({**datalist, "modality": {"0": "CT"}}))
    with pytest.raises(HarmonizationError, match=r"holds CT images, but .* fitted on MR images"):
        check_artifact_modality(artifact, ct_site)


def federation_definition(folder: Path, sites: int, encryption: str) -> Federation:
    """A federation's project definition, as ``fedseg poc prepare`` writes it (not started)."""
    builders = [{"path": HE_BUILDER, "args": HE_PARAMETERS[encryption]}]
    project = {
        "name": "fedseg",
        "participants": [{"name": "server", "type": "server"}]
        + [{"name": f"site-{n}", "type": "client"} for n in range(1, sites + 1)],
        "builders": builders if encryption != "none" else [],
    }
    folder.mkdir(parents=True)
    (folder / "project.yml").write_text(yaml.safe_dump(project))
    return Federation(folder)


def test_a_federation_job_that_could_not_run_is_refused_before_it_is_submitted(tmp_path):
    config = load_config("tiny")
    packed = federation_definition(tmp_path / "packed", 3, "packed")
    with pytest.raises(ValueError, match="provisioned for packed encryption, so its sites hold no"):
        run_in_federation(packed, config, tmp_path / "w1", encryption="stock")
    lone = federation_definition(tmp_path / "lone", 1, "packed")
    with pytest.raises(ValueError, match=r"1 site\(s\) take part, but training\.min_sites is 2"):
        run_in_federation(lone, config, tmp_path / "w2")
    assert not (tmp_path / "w1").exists() and not (tmp_path / "w2").exists()


def test_provisioning_refuses_a_dataset_it_cannot_use_before_replacing_any_kit(datasets, tmp_path):
    with pytest.raises(FederationError, match=r"site-9 is not a site of this federation"):
        prepare(tmp_path / "federation", 2, "none", {"site-9": datasets["site-1"]})
    with pytest.raises(FederationError, match=r"site-2: .* holds no datalist\.json"):
        prepare(tmp_path / "federation", 2, "none", {"site-2": tmp_path})
    assert not (tmp_path / "federation").exists()
