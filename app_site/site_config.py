"""What a site decides, never the job: where its data is, and how little it shares.

The dataset folder is looked up, in order:

1. the environment variable ``FEDSEG_DATASET_<SITE>`` (site name upper-cased, ``-`` as ``_``),
   for example ``FEDSEG_DATASET_SITE_1``;
2. ``local/fedseg_site.json`` of the site's startup kit (``{"dataset": "/path"}``), found by
   looking upward from the job's working folder;
3. the environment variable ``FEDSEG_DATASET``.

The fewest images the site shares harmonization statistics of, whatever a job asks
(:func:`site_min_images`), comes from ``FEDSEG_MIN_IMAGES_<SITE>`` or the same file's
``min_harmonization_images``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

SITE_CONFIG_FILE = "fedseg_site.json"
#: Thread-pool sizes of the numerical libraries a site's training uses.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def shared_host_threads(sites_on_host: int, cpus: int | None = None) -> dict[str, str]:
    """Thread-pool settings for sites that share one machine (simulator, local POC).

    Every site that trains on the CPU starts a thread team as large as the machine; several
    sites on one machine then run several times more threads than there are cores, and
    OpenMP's spinning threads slow each step down several-fold. Each site gets an equal
    share of the cores instead. A value the user set already is kept.

    Args:
        sites_on_host: Sites training on this machine at the same time.
        cpus: Cores to share; default: the cores this process may use.

    Returns:
        Environment variables for the sites' processes (empty when the user set them).
    """
    if any(name in os.environ for name in THREAD_VARIABLES):
        return {}
    cpus = cpus or len(os.sched_getaffinity(0))
    share = str(max(1, cpus // max(1, sites_on_host)))
    return dict.fromkeys(THREAD_VARIABLES, share)


def site_environment_variable(site_name: str, setting: str = "DATASET") -> str:
    """The environment variable of one of a site's settings (default: its dataset)."""
    return f"FEDSEG_{setting}_" + site_name.upper().replace("-", "_").replace(".", "_")


def site_min_images(site_name: str, start: Path | None = None) -> int | None:
    """The fewest images this site shares harmonization statistics of, if it set a minimum.

    A job's ``harmonization.min_images`` can only raise it: the statistics of one or two
    images come close to those images' own histograms, and the site, not the researcher,
    decides how close it lets them come.

    Args:
        site_name: The site's name in the federation.
        start: Folder to look upward from for the startup kit (default: working folder).

    Returns:
        ``FEDSEG_MIN_IMAGES_<SITE>``, else the startup kit's ``min_harmonization_images``,
        else ``None``.

    Raises:
        ValueError: If the setting is not a whole number of at least 1.
    """
    variable = site_environment_variable(site_name, "MIN_IMAGES")
    value = os.environ.get(variable)
    origin = variable
    if value is None:
        value = _startup_kit_settings(Path(start or Path.cwd())).get("min_harmonization_images")
        origin = f"local/{SITE_CONFIG_FILE}'s min_harmonization_images"
    if value is None:
        return None
    try:
        minimum = int(value)
    except (TypeError, ValueError):
        minimum = 0
    if minimum < 1 or str(minimum) != str(value).strip():
        raise ValueError(
            f"{site_name}: {origin} must be a whole number of at least 1, got {value!r}"
        )
    return minimum


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
        location = _startup_kit_settings(Path(start or Path.cwd())).get("dataset")
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


def check_training_dataset(dataset: Path) -> None:
    """Refuses a dataset a site cannot train a segmentation job on.

    The site trains on the labelled cases of its training split and reports every round's
    global model by its Dice on its validation split, so it needs both: a dataset without
    them would train for the whole job and only then fail its reports.

    Args:
        dataset: The site's dataset folder (written by ``fedseg ingest``).

    Raises:
        FileNotFoundError: If it holds no ``datalist.json``.
        ValueError: If its training or its validation split is empty.
    """
    datalist = Path(dataset) / "datalist.json"
    if not datalist.is_file():
        raise FileNotFoundError(
            f"{dataset}: holds no datalist.json; give a dataset folder written by fedseg ingest"
        )
    splits = json.loads(datalist.read_text())
    if not splits.get("training"):
        raise ValueError(
            f"{datalist}: no labelled training case; give fedseg ingest the tumour labels "
            "(--manifest, DICOM SEG objects or X_seg.nii.gz beside X.nii.gz)"
        )
    if not splits.get("validation"):
        raise ValueError(
            f"{datalist}: no validation case, and the site reports the global model by its "
            "Dice on them; re-run fedseg ingest with --validation-fraction above 0 (the "
            "default is 0.2; it needs at least two labelled cases)"
        )


def _startup_kit_settings(start: Path) -> dict:
    """The site's ``local/fedseg_site.json``, found upward from ``start``; empty without one."""
    for folder in (start, *start.parents):
        config = folder / "local" / SITE_CONFIG_FILE
        if config.is_file():
            return json.loads(config.read_text())
    return {}


def check_distinct_datasets(datasets: Sequence[Path]) -> None:
    """Refuses a dataset folder given twice: it would count as two sites.

    Args:
        datasets: Dataset folders, one per site.

    Raises:
        ValueError: If two entries name the same folder (after resolving links and ``..``).
    """
    seen: dict[Path, Path] = {}
    for dataset in datasets:
        resolved = Path(dataset).resolve()
        if resolved in seen:
            raise ValueError(
                f"{dataset}: the same dataset as {seen[resolved]}; give each site's dataset once"
            )
        seen[resolved] = Path(dataset)
