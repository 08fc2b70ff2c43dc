"""Site-side settings the site decides: where its data is, how many threads it trains with."""

import json

import pytest

from app_site.site_config import (
    SITE_CONFIG_FILE,
    THREAD_VARIABLES,
    shared_host_threads,
    site_dataset,
    site_min_images,
)


@pytest.mark.parametrize(("sites", "cpus", "threads"), [(3, 2, "1"), (2, 8, "4"), (3, 16, "5")])
def test_sites_on_one_machine_share_its_cores(monkeypatch, sites, cpus, threads):
    for name in THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert shared_host_threads(sites, cpus) == dict.fromkeys(THREAD_VARIABLES, threads)


def test_a_thread_count_the_user_set_is_kept(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    assert shared_host_threads(3, 2) == {}


def test_the_dataset_comes_from_the_environment_or_the_startup_kit(tmp_path, monkeypatch):
    dataset = tmp_path / "data"
    dataset.mkdir()
    (dataset / "datalist.json").write_text("{}")
    monkeypatch.delenv("FEDSEG_DATASET", raising=False)
    monkeypatch.setenv("FEDSEG_DATASET_SITE_1", str(dataset))
    assert site_dataset("site-1") == dataset
    monkeypatch.delenv("FEDSEG_DATASET_SITE_1")
    kit = tmp_path / "site-1"
    (kit / "local").mkdir(parents=True)
    (kit / "local" / SITE_CONFIG_FILE).write_text(json.dumps({"dataset": str(dataset)}))
    (kit / "job" / "app").mkdir(parents=True)
    assert site_dataset("site-1", start=kit / "job" / "app") == dataset
    with pytest.raises(FileNotFoundError, match="FEDSEG_DATASET_SITE_2"):
        site_dataset("site-2", start=tmp_path)


def test_a_site_sets_its_own_minimum_of_shared_images(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDSEG_MIN_IMAGES_SITE_1", raising=False)
    kit = tmp_path / "site-1"
    (kit / "local").mkdir(parents=True)
    assert site_min_images("site-1", start=kit) is None  # no file: the job's minimum holds
    settings = {"dataset": "/data", "min_harmonization_images": 20}
    (kit / "local" / SITE_CONFIG_FILE).write_text(json.dumps(settings))
    assert site_min_images("site-1", start=kit / "job") == 20
    monkeypatch.setenv("FEDSEG_MIN_IMAGES_SITE_1", "8")  # the environment comes first
    assert site_min_images("site-1", start=kit) == 8
    for wrong in ("0", "2.5", "many"):
        monkeypatch.setenv("FEDSEG_MIN_IMAGES_SITE_1", wrong)
        with pytest.raises(ValueError, match="FEDSEG_MIN_IMAGES_SITE_1 must be a whole number"):
            site_min_images("site-1", start=kit)
