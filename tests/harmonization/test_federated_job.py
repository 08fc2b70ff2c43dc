"""The harmonization fit as a real NVFlare job in the simulator (server and client processes)."""

import json
import re

import numpy as np
import pytest
from nvflare.recipe import PocEnv, SimEnv

from app_site.harmonization import site_statistics
from app_site.harmonization_task import shareable_reason
from fedseg.harmonization import HarmonizationConfig, combine_statistics
from jobs.harmonization import HarmonizationRecipe, find_artifact

CONFIG = HarmonizationConfig(min_images=2)


@pytest.fixture
def site_environment(datasets, monkeypatch):
    for index, name in enumerate(sorted(datasets), start=1):
        monkeypatch.setenv(f"FEDSEG_DATASET_SITE_{index}", str(datasets[name]))
    return datasets


def test_simulated_federation_fits_what_the_centralized_fit_gives(site_environment, tmp_path):
    recipe = HarmonizationRecipe(CONFIG, "MR", min_sites=3, timeout=300)
    run = recipe.execute(SimEnv(num_clients=3, workspace_root=str(tmp_path / "sim")))
    artifact = json.loads(find_artifact(run.get_result()).read_text())
    centralized = combine_statistics(
        CONFIG,
        {name: site_statistics(folder, CONFIG) for name, folder in site_environment.items()},
        "MR",
    )
    assert artifact["site_images"] == centralized["site_images"]
    np.testing.assert_allclose(
        artifact["standard_scale"], centralized["standard_scale"], rtol=0, atol=1e-6
    )


def test_a_refusing_site_fails_the_job_loudly(site_environment, tmp_path):
    recipe = HarmonizationRecipe(HarmonizationConfig(min_images=3), "MR", min_sites=3, timeout=300)
    with pytest.raises(RuntimeError, match="Simulation failed"):
        recipe.execute(SimEnv(num_clients=3, workspace_root=str(tmp_path / "sim")))
    server_logs = "".join(
        p.read_text() for p in (tmp_path / "sim").rglob("log.txt") if "server" in p.parts
    )
    assert "harmonization fit failed: 1 site(s) sent statistics, 3 needed" in server_logs
    assert re.search(
        r"the site's dataset: \d image\(s\), fewer than the 3 a site needs", server_logs
    )
    # the refusal names no folder of the site; the site's own log does
    assert not any(str(folder) in server_logs for folder in site_environment.values())
    site_logs = "".join(
        p.read_text() for p in (tmp_path / "sim").rglob("log.txt") if "server" not in p.parts
    )
    assert any(f"{folder}: " in site_logs for folder in site_environment.values())
    assert not list((tmp_path / "sim").rglob("harmonization.json"))


def test_a_site_shares_no_statistics_below_its_own_minimum(site_environment, tmp_path, monkeypatch):
    """The job asks for 2 images per site; site-2 decided it shares nothing below 50."""
    monkeypatch.setenv("FEDSEG_MIN_IMAGES_SITE_2", "50")
    recipe = HarmonizationRecipe(CONFIG, "MR", min_sites=3, timeout=300)
    with pytest.raises(RuntimeError, match="Simulation failed"):
        recipe.execute(SimEnv(num_clients=3, workspace_root=str(tmp_path / "sim")))
    server_logs = "".join(
        p.read_text() for p in (tmp_path / "sim").rglob("log.txt") if "server" in p.parts
    )
    assert "2 site(s) sent statistics, 3 needed" in server_logs
    assert re.search(r"site-2: the site's dataset: \d image\(s\), fewer than the 50", server_logs)
    assert not list((tmp_path / "sim").rglob("harmonization.json"))


def test_a_refusal_names_no_folder_file_or_case_of_the_site(tmp_path):
    dataset = tmp_path / "Smith_John"
    missing = FileNotFoundError(
        f"{dataset}/images/case-0123456789ab.nii.gz: listed in {dataset}/datalist.json but missing"
    )
    reason = shareable_reason(missing, dataset)
    assert (
        "Smith" not in reason and "case-0123456789ab" not in reason and str(tmp_path) not in reason
    )
    assert reason.startswith("a file of the site's dataset: listed in a file of the site's")
    unconfigured = FileNotFoundError(
        "site-1: /srv/Doe_Jane holds no datalist.json (run fedseg ingest)"
    )
    assert shareable_reason(unconfigured, None).startswith(
        "site-1: a folder or file at the site holds no datalist.json (run fedseg ingest)"
    )


def test_poc_federation_fits_the_same_artifact(site_environment, tmp_path, monkeypatch):
    """A real local federation: provisioned server and clients, job submitted by the admin API."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # nvflare poc writes ~/.nvflare
    monkeypatch.setenv("NVFLARE_POC_WORKSPACE", str(tmp_path / "poc"))
    env = PocEnv(num_clients=3)
    try:
        run = HarmonizationRecipe(CONFIG, "MR", min_sites=3, timeout=300).execute(env)
        result = run.get_result(timeout=300, clean_up=False)
        assert result is not None, "the job did not finish"
        artifact = json.loads(find_artifact(result).read_text())
    finally:
        env.stop(clean_up=True)
    centralized = combine_statistics(
        CONFIG,
        {name: site_statistics(folder, CONFIG) for name, folder in site_environment.items()},
        "MR",
    )
    np.testing.assert_allclose(
        artifact["standard_scale"], centralized["standard_scale"], rtol=0, atol=1e-6
    )
    assert not (tmp_path / "poc").exists(), "the POC workspace is cleaned up"
