from pathlib import Path

import pytest

from app_site.ingest.pipeline import IngestOptions, ingest
from fedseg.synth.hospitals import SiteSummary, SynthConfig, synthesize_hospitals

#: Small enough for the suite, large enough that every tissue has interior voxels.
HOSPITALS = {"sites": 4, "cases_per_site": 2, "size": 48, "seed": 7}


@pytest.fixture(scope="session")
def hospitals(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[SiteSummary]]:
    """Four simulated hospitals (one per built-in scanner profile), written once per session."""
    out = tmp_path_factory.mktemp("hospitals")
    sites = synthesize_hospitals(SynthConfig(out=out, **HOSPITALS), workers=2)
    return out, sites


@pytest.fixture(scope="session")
def datasets(hospitals, tmp_path_factory):
    """The simulated hospitals, ingested: site name -> dataset folder."""
    out, sites = hospitals
    folders = {}
    for site in sites[:3]:
        target = tmp_path_factory.mktemp(f"dataset-{site.name}")
        ingest(
            IngestOptions(
                source=out / site.name / "dicom",
                output=target,
                manifest=out / site.name / "manifest.csv",
            )
        )
        folders[site.name] = target
    return folders
