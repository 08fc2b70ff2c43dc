"""Site-side settings the site decides: where its data is, how many threads it trains with."""

import json

import pytest

from app_site.site_config import (
    SITE_CONFIG_FILE,
    THREAD_VARIABLES,
    shared_host_threads,
    site_dataset,
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
