"""Where a site keeps its data: decided by the site, never by the job.

Looked up, in order:

1. the environment variable ``FEDSEG_DATASET_<SITE>`` (site name upper-cased, ``-`` as ``_``),
   for example ``FEDSEG_DATASET_SITE_1``;
2. ``local/fedseg_site.json`` of the site's startup kit (``{"dataset": "/path"}``), found by
   looking upward from the job's working folder;
3. the environment variable ``FEDSEG_DATASET``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SITE_CONFIG_FILE = "fedseg_site.json"


def site_environment_variable(site_name: str) -> str:
    """The environment variable naming a site's dataset."""
    return "FEDSEG_DATASET_" + site_name.upper().replace("-", "_").replace(".", "_")


def site_dataset(site_name: str, start: Path | None = None) -> Path:
    """Finds the dataset folder of a site.

    Args:
        site_name: The site's name in the federation.
        start: Folder to look upward from for the startup kit (default: working folder).

    Returns:
        The dataset folder (written by ``fedseg ingest``).

    Raises:
        FileNotFoundError: If no location is configured, or it is not a dataset folder.
    """
    variable = site_environment_variable(site_name)
    location = os.environ.get(variable)
    if not location:
        location = _from_startup_kit(Path(start or Path.cwd()))
    if not location:
        location = os.environ.get("FEDSEG_DATASET")
    if not location:
        raise FileNotFoundError(
            f"{site_name}: no dataset configured; set {variable}, or write "
            f'{{"dataset": "/path/to/dataset"}} to local/{SITE_CONFIG_FILE} in the startup kit'
        )
    dataset = Path(location)
    if not (dataset / "datalist.json").is_file():
        raise FileNotFoundError(
            f"{site_name}: {dataset} holds no datalist.json (run fedseg ingest)"
        )
    return dataset


def _from_startup_kit(start: Path) -> str | None:
    for folder in (start, *start.parents):
        config = folder / "local" / SITE_CONFIG_FILE
        if config.is_file():
            return str(json.loads(config.read_text())["dataset"])
    return None
