"""``fedseg job run`` and ``fedseg job export``.

Run the segmentation job in NVFlare's simulator on datasets written by ``fedseg ingest``, or
write the job folder to submit to a federation.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

from nvflare.recipe import SimEnv

from app_server.report import write_reports
from app_site.harmonization import dataset_modality
from app_site.site_config import site_environment_variable
from app_site.training_task import METRICS_FILE
from fedseg.config import RunConfig
from fedseg.harmonization import HarmonizationConfig, read_harmonization_artifact
from jobs.harmonization import HarmonizationRecipe, find_artifact
from jobs.segmentation import segmentation_recipe


def site_names(count: int) -> list[str]:
    """The simulator's site names: ``site-1`` ... ``site-N``."""
    return [f"site-{index}" for index in range(1, count + 1)]


@contextmanager
def site_environment(datasets: Sequence[Path]):
    """Points each simulated site at its dataset for the duration of a run."""
    names = site_names(len(datasets))
    variables = {
        site_environment_variable(n): str(Path(d).resolve())
        for n, d in zip(names, datasets, strict=True)
    }
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        yield names
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def fit_harmonization(config: RunConfig, datasets: Sequence[Path], workdir: Path) -> Path:
    """Fits the harmonization artifact federatedly in the simulator.

    Returns:
        The artifact, copied to ``workdir/harmonization.json``.
    """
    modalities = {dataset_modality(d) for d in datasets}
    if len(modalities) != 1:
        raise ValueError(f"sites hold different modalities: {sorted(modalities)}")
    settings = config.harmonization
    fit = HarmonizationConfig(
        method=settings.method, mask_method=settings.mask, min_images=settings.min_images
    )
    recipe = HarmonizationRecipe(fit, modalities.pop(), min_sites=len(datasets), timeout=600)
    with site_environment(datasets):
        run = recipe.execute(
            SimEnv(
                num_clients=len(datasets),
                workspace_root=str(workdir / "simulation"),
                log_config="WARNING",
            )
        )
        result = run.get_result()
    target = workdir / "harmonization.json"
    shutil.copyfile(find_artifact(Path(result)), target)
    return target


def run_job(
    config: RunConfig,
    datasets: Sequence[Path],
    workdir: Path,
    harmonization_artifact: Path | None = None,
) -> Path:
    """Runs the segmentation job in the simulator and gathers each site's metrics.

    Args:
        config: Run configuration.
        datasets: One ingested dataset per site (``site-1`` is the first).
        workdir: Where the simulation, the artifact and ``report/`` are written.
        harmonization_artifact: Fitted artifact; fitted federatedly first when the
            configuration asks for harmonization and none is given.

    Returns:
        The ``report`` folder: ``<site>.json`` + ``.html`` per site, ``federation.json`` +
        ``federation.html``.

    Raises:
        ValueError: If fewer datasets than ``training.min_sites`` are given.
        RuntimeError: If a site reported no metrics.
    """
    if len(datasets) < config.training.min_sites:
        raise ValueError(
            f"{len(datasets)} site(s) given, the configuration needs {config.training.min_sites}"
        )
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if config.harmonization.method != "none":
        if harmonization_artifact is None:
            harmonization_artifact = fit_harmonization(config, datasets, workdir)
        read_harmonization_artifact(harmonization_artifact)  # refuse a broken one early
    else:
        harmonization_artifact = None
    recipe = segmentation_recipe(config, harmonization_artifact, sites=len(datasets))
    simulation = workdir / "simulation"
    with site_environment(datasets) as names:
        run = recipe.execute(
            SimEnv(num_clients=len(datasets), workspace_root=str(simulation), log_config="WARNING")
        )
        result = Path(run.get_result())
    cross_site = read_cross_site_results(result, names)
    report = workdir / "report"
    report.mkdir(exist_ok=True)
    for name in names:
        found = sorted(result.rglob(METRICS_FILE.format(site=name)))
        if not found:
            raise RuntimeError(f"{name} reported no metrics; see the logs under {result}")
        document = json.loads(found[0].read_text())
        (report / f"{name}.json").write_text(json.dumps(document, indent=2) + "\n")
    write_reports(report, cross_site)
    return report


def read_cross_site_results(result: Path, sites: Sequence[str]) -> dict:
    """The cross-site evaluation matrix (validating site -> model owner -> metrics).

    Raises:
        RuntimeError: If it is missing, or a site validated nothing: a job whose evaluation
            results are empty fails, whatever status NVFlare reported.
    """
    found = sorted(Path(result).rglob("cross_val_results.json"))
    if not found:
        raise RuntimeError(f"{result}: no cross-site evaluation results; see the server log")
    matrix = json.loads(found[0].read_text())
    empty = [site for site in sites if not any((matrix.get(site) or {}).values())]
    if empty:
        raise RuntimeError(
            f"cross-site evaluation returned no results for {', '.join(empty)} "
            f"({found[0]}); see those sites' logs"
        )
    return matrix


def export_job(config: RunConfig, output: Path, harmonization_artifact: Path | None = None) -> Path:
    """Writes the job folder that ``nvflare job submit`` and the admin console accept.

    Returns:
        The job folder.
    """
    recipe = segmentation_recipe(config, harmonization_artifact)
    recipe.export(str(output))
    return Path(output)
