import pytest

from app_site.ingest.pipeline import IngestOptions, ingest


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
