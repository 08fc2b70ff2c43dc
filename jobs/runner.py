"""Running jobs: in NVFlare's simulator, or in a federation through its admin API.

``fedseg job run`` runs the plaintext segmentation job in the simulator on datasets written
by ``fedseg ingest``; ``fedseg job export`` writes the job folder to submit to a federation;
:func:`run_in_federation` submits the (encrypted) job to a running federation, waits, downloads
the result and writes the reports; :func:`resume_in_federation` does the same for the job that
goes on from an interrupted one's last completed round (``fedseg job resume``), and
:func:`rejoin_in_federation` restarts a running job that way so that sites that came back take
part again (``fedseg job rejoin``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from nvflare.recipe.spec import Recipe

from app_server.federation import (
    Federation,
    FederationError,
    abort_job,
    connected_sites,
    download_job,
    job_meta,
    sites_running_job,
    submit_job,
    wait_for_job,
)
from app_server.report import write_reports
from app_server.site_reports import (
    SITE_REPORTS_FILE,
    load_site_reports,
    site_report_problems,
    with_rejoined_sites,
)
from app_site.harmonization import check_artifact_modality, dataset_modality
from app_site.site_config import (
    check_distinct_datasets,
    check_training_dataset,
    shared_host_threads,
    site_dataset,
    site_environment_variable,
)
from fedseg.config import RunConfig
from fedseg.files import write_json_atomic
from fedseg.harmonization import (
    read_harmonization_artifact,
)
from jobs.harmonization import find_artifact, harmonization_recipe
from jobs.progress import RoundProgress, watching_rounds
from jobs.resume import ResumePoint, find_resume_point
from jobs.segmentation import checked_artifact_hash, segmentation_recipe
from jobs.simulation import run_in_simulator


def site_names(count: int) -> list[str]:
    """The simulator's site names: ``site-1`` ... ``site-N``."""
    return [f"site-{index}" for index in range(1, count + 1)]


@contextmanager
def site_environment(datasets: Sequence[Path]):
    """Points each simulated site at its dataset for the duration of a run.

    The sites also share the machine's cores (:func:`shared_host_threads`).
    """
    names = site_names(len(datasets))
    variables = {
        site_environment_variable(n): str(Path(d).resolve())
        for n, d in zip(names, datasets, strict=True)
    }
    variables.update(shared_host_threads(len(datasets)))
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


#: Characters NVFlare's simulator launcher cannot pass in a path: it splits its command line
#: like a shell, with comments.
_UNSAFE_PATH_CHARACTERS = frozenset(" \t\n#'\"\\")


def simulator_workspace(workdir: Path) -> Path:
    """The simulator's workspace in ``workdir``: ``workdir/simulation``.

    Raises:
        ValueError: If the path holds a character NVFlare's simulator launcher splits or cuts
            its command line at (a space, ``#``, a quote or a backslash): the simulation would
            fail with nothing but its return code.
    """
    simulation = Path(workdir) / "simulation"
    unsafe = sorted(_UNSAFE_PATH_CHARACTERS & set(str(simulation)))
    if unsafe:
        shown = " ".join(repr(character) for character in unsafe)
        raise ValueError(
            f"{workdir}: NVFlare's simulator cannot run in a folder whose path holds {shown}; "
            "choose a --workdir without them"
        )
    return simulation


def fit_harmonization(config: RunConfig, datasets: Sequence[Path], workdir: Path) -> Path:
    """Fits the harmonization artifact federatedly in the simulator.

    Returns:
        The artifact, copied to ``workdir/harmonization.json``.
    """
    modalities = {dataset_modality(d) for d in datasets}
    if len(modalities) != 1:
        raise ValueError(f"sites hold different modalities: {sorted(modalities)}")
    modality = modalities.pop()
    with site_environment(datasets):
        result = run_in_simulator(
            lambda: harmonization_recipe(config, modality, len(datasets), timeout=600),
            len(datasets),
            simulator_workspace(workdir),
        )
    target = workdir / "harmonization.json"
    shutil.copyfile(find_artifact(result), target)
    return target


def run_job(
    config: RunConfig,
    datasets: Sequence[Path],
    workdir: Path,
    harmonization_artifact: Path | None = None,
    on_round: Callable[[RoundProgress], None] | None = None,
) -> Path:
    """Runs the segmentation job (plaintext) in the simulator and writes the reports.

    Args:
        config: Run configuration.
        datasets: One ingested dataset per site (``site-1`` is the first).
        workdir: Where the simulation, the artifact and ``report/`` are written.
        harmonization_artifact: Fitted artifact; fitted federatedly first when the
            configuration asks for harmonization and none is given.
        on_round: Called with each round the server recorded, while the job runs.

    Returns:
        The ``report`` folder: ``<site>.json`` + ``.html`` per site, ``federation.json`` +
        ``federation.html``.

    Raises:
        ValueError: If fewer datasets than ``training.min_sites`` are given, one is given
            twice or has no training or validation case, the artifact does not fit the
            configuration (:func:`jobs.segmentation.checked_artifact_hash`), or ``workdir`` is
            a path the simulator cannot run in (:func:`simulator_workspace`).
        FileNotFoundError: If a dataset folder holds no ``datalist.json``.
        HarmonizationError: If the artifact was fitted on another modality than a dataset's.
        RuntimeError: If a site's validation results are missing.
    """
    check_enough_sites(len(datasets), config.training.min_sites)
    check_distinct_datasets(datasets)
    for dataset in datasets:
        check_training_dataset(Path(dataset))
    workdir = Path(workdir).resolve()
    simulator_workspace(workdir)  # refused before any work
    workdir.mkdir(parents=True, exist_ok=True)
    harmonization_artifact = _harmonization_for(
        config, harmonization_artifact, lambda: fit_harmonization(config, datasets, workdir)
    )
    if harmonization_artifact is not None:
        artifact = read_harmonization_artifact(harmonization_artifact)
        for dataset in datasets:
            check_artifact_modality(artifact, dataset)
    return _simulate(
        lambda: segmentation_recipe(config, harmonization_artifact),
        datasets,
        workdir,
        on_round=on_round,
    )


def check_encryption(federation: Federation, encryption: str) -> None:
    """Refuses a job whose updates need HE contexts the federation's sites do not hold.

    Raises:
        ValueError: If ``encryption`` is neither ``none`` nor the federation's.
    """
    if encryption not in ("none", federation.encryption):
        raise ValueError(
            f"the federation was provisioned for {federation.encryption} encryption, so its "
            f"sites hold no {encryption} HE contexts; submit with --encryption "
            f"{federation.encryption} (or none), or provision the federation for {encryption}"
        )


def check_enough_sites(sites: int, min_sites: int) -> None:
    """Refuses a job that could never make a round with the sites it has.

    Args:
        sites: How many sites the job runs on.
        min_sites: The fewest updates that make a round (``training.min_sites``).

    Raises:
        ValueError: If there are fewer sites than ``min_sites``.
    """
    if sites < min_sites:
        raise ValueError(
            f"{sites} site(s) take part, but training.min_sites is {min_sites}: no round "
            "could complete; add sites or lower training.min_sites"
        )


def resume_job(
    run_folder: Path,
    datasets: Sequence[Path],
    workdir: Path,
    on_round: Callable[[RoundProgress], None] | None = None,
) -> Path:
    """Resumes an interrupted plaintext job (of :func:`run_job`) in the simulator.

    Args:
        run_folder: The interrupted job's server run folder (``simulate_job`` in its
            ``simulation`` folder).
        datasets: One ingested dataset per site, as in the interrupted run.
        on_round: Called with each round the server recorded, while the job runs.
        workdir: Where the new simulation and ``report/`` are written.

    Returns:
        The ``report`` folder, covering every round of both jobs.

    Raises:
        ResumeError: If the job cannot be resumed (see :func:`find_resume_point`).
        ValueError: If the job was encrypted (resume it in its federation), or the run folder
            lies in the simulation the resumed job would clear, or ``workdir`` is a path the
            simulator cannot run in (:func:`simulator_workspace`).
    """
    simulation = simulator_workspace(Path(workdir).resolve())
    if Path(run_folder).resolve().is_relative_to(simulation):
        raise ValueError(
            f"{run_folder}: the interrupted run lies in {simulation}, which the simulator clears "
            "before it starts (its logs and reports would be lost); resume with another --workdir"
        )
    point = find_resume_point(run_folder)
    if point.encryption != "none":
        raise ValueError(
            f"{run_folder}: an encrypted job resumes in its federation (--workspace), not in "
            "the simulator, which has no HE contexts"
        )
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    return _simulate(
        lambda: segmentation_recipe(point.config, resume=point),
        datasets,
        workdir,
        point.trains,
        on_round,
    )


def _simulate(
    recipe: Callable[[], Recipe],
    datasets: Sequence[Path],
    workdir: Path,
    local_models: bool = True,
    on_round: Callable[[RoundProgress], None] | None = None,
) -> Path:
    """Runs a plaintext segmentation job in the simulator; writes the reports.

    ``recipe`` builds the job's recipe (:func:`jobs.simulation.run_in_simulator`).
    """
    simulation = simulator_workspace(workdir)
    with site_environment(datasets) as names, watching_rounds(simulation, on_round):
        result = run_in_simulator(recipe, len(datasets), simulation)
    return write_job_reports(result, workdir / "report", names, "none", local_models)


def write_job_reports(
    result: Path,
    report_dir: Path,
    sites: Sequence[str],
    encryption: str,
    local_models: bool = True,
) -> Path:
    """Checks a finished job's results and writes the reports from them.

    Args:
        result: The job's result folder (simulator workspace or downloaded job).
        report_dir: Where the reports go.
        sites: Sites that must have reported.
        encryption: How the job's updates travelled: plaintext jobs also ran cross-site
            evaluation; jobs with NVFlare's stock HE filters ran no final validation.
        local_models: Whether the job trained, so that its cross-site evaluation covers the
            sites' local models (:func:`read_cross_site_results`).

    Returns:
        ``report_dir``.

    Raises:
        RuntimeError: If any site's validation results, or the cross-site evaluation, are
            missing or not finite: a job whose validation results are empty fails, whatever
            status NVFlare reported. The reports of the sites that reported are written
            first (a site that reported nothing is named on the federation's page).
    """
    path, collected = load_site_reports(result)
    problems = [
        f"{path}: {problem}"
        for problem in site_report_problems(collected, list(sites), final=encryption != "stock")
    ]
    matrix = None
    if encryption == "none":
        try:
            cross_site_path, matrix = load_cross_site_results(result)
        except RuntimeError as error:
            problems.append(str(error))
        else:
            if problem := cross_site_problem(matrix, sites, local_models):
                problems.append(f"{cross_site_path}: {problem}")
    reported = {name: doc for name, doc in collected["sites"].items() if doc["rounds"]}
    written = ""
    if reported:
        absent = sorted(set(sites) - set(reported))
        write_reports(report_dir, {**collected, "sites": reported, "absent": absent}, matrix)
        written = f"; the reports of the sites that did report are in {report_dir}"
    if problems:
        raise RuntimeError("; ".join(problems) + f"; see those sites' logs{written}")
    return Path(report_dir)


def _harmonization_for(config: RunConfig, artifact: Path | None, fit) -> Path | None:
    """The job's artifact: the given one or a fitted one (checked), or none when not asked for."""
    if config.harmonization.method != "none" and artifact is None:
        artifact = fit()
    checked_artifact_hash(config, artifact)  # refuse a broken or mismatched one before training
    return None if artifact is None else Path(artifact)


def read_cross_site_results(result: Path, sites: Sequence[str], local_models: bool = True) -> dict:
    """The cross-site evaluation matrix (validating site -> model owner -> metrics).

    Every site must have validated the global model (``SRV_...``) and every local model a
    site submitted, each with a finite mean Dice; a job that trained must have had at least
    one local model. A site without a usable local model (every update it trained was
    refused) submits none (:class:`app_site.he_filters.NoLocalModelReply`).

    Args:
        result: The job's result folder.
        sites: The sites that took part.
        local_models: Whether the sites submitted local models (a job that trained no round,
            resumed after its last, evaluates the global model alone).

    Raises:
        RuntimeError: If the matrix is missing or has a gap: a job whose evaluation results
            are empty or partial fails, whatever status NVFlare reported.
    """
    path, matrix = load_cross_site_results(result)
    problem = cross_site_problem(matrix, sites, local_models)
    if problem:
        raise RuntimeError(f"{problem} ({path}); see those sites' logs and the server log")
    return matrix


def load_cross_site_results(result: Path) -> tuple[Path, dict]:
    """NVFlare's cross-site evaluation results in a job result, unchecked: file and content.

    Raises:
        RuntimeError: If there are none.
    """
    found = sorted(Path(result).rglob("cross_val_results.json"))
    if not found:
        raise RuntimeError(f"{result}: no cross-site evaluation results; see the server log")
    return found[0], json.loads(found[0].read_text())


def cross_site_problem(matrix: dict, sites: Sequence[str], local_models: bool) -> str | None:
    """What the matrix lacks (see :func:`read_cross_site_results`), or ``None``."""
    empty = [site for site in sites if not any((matrix.get(site) or {}).values())]
    if empty:
        return f"cross-site evaluation returned no results for {', '.join(empty)}"
    evaluated = {owner for row in matrix.values() for owner in row}
    global_models = sorted(owner for owner in evaluated if owner.startswith("SRV_"))
    local = sorted(evaluated - set(global_models))
    gaps = [
        f"{site} on {owner}"
        for site in sites
        for owner in (global_models or ["the global model"]) + local
        if not math.isfinite((matrix[site].get(owner) or {}).get("dice_mean") or math.nan)
    ]
    if gaps:
        return f"cross-site evaluation has no finite Dice for {', '.join(gaps)}"
    if local_models and not local:
        return "cross-site evaluation holds no site's local model"
    return None


def export_job(
    config: RunConfig,
    output: Path,
    harmonization_artifact: Path | None = None,
    encryption: str = "packed",
) -> Path:
    """Writes the job folder that ``nvflare job submit`` and the admin console accept.

    Args:
        config: Run configuration.
        output: Folder to write it into.
        harmonization_artifact: Fitted artifact (required when the configuration harmonizes).
        encryption: ``packed`` (default), ``stock`` or ``none``; must match the federation's
            provisioned HE contexts.

    Returns:
        The job folder (``output/<job name>``, holding ``meta.json``).
    """
    return export_recipe(segmentation_recipe(config, harmonization_artifact, encryption), output)


def export_harmonization_job(
    config: RunConfig, output: Path, modality: str, min_sites: int | None = None
) -> Path:
    """Writes the job folder of the federated harmonization fit the configuration asks for.

    Its result, downloaded once it finished, holds the artifact the segmentation job takes
    (:func:`resolve_artifact`).

    Args:
        config: Run configuration (its ``harmonization`` section).
        output: Folder to write it into.
        modality: The sites' modality, ``MR`` or ``CT``.
        min_sites: Fewest sites whose statistics make a fit; default ``training.min_sites``.

    Returns:
        The job folder (``output/<job name>``).

    Raises:
        ValueError: If the configuration asks for no harmonization, or for a method that does
            not fit ``modality``.
    """
    sites = min_sites or config.training.min_sites
    return export_recipe(harmonization_recipe(config, modality, sites), output)


def resolve_artifact(path: Path) -> Path:
    """A harmonization artifact file, or the one in a harmonization job's result folder.

    Raises:
        FileNotFoundError: If ``path`` does not exist, or is a folder without an artifact.
    """
    path = Path(path)
    if path.is_dir():
        return find_artifact(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no such harmonization artifact (give the artifact file, or the downloaded "
            "result folder of the harmonization job)"
        )
    return path


def export_recipe(recipe: Recipe, output: Path) -> Path:
    """Exports a recipe into ``output``, replacing an earlier export of the same job.

    Returns:
        The job folder, ``output/<job name>`` (absolute); other folders in ``output`` are
        left alone.
    """
    recipe.export(str(output))
    job_folder = Path(output).resolve() / recipe.name
    make_script_paths_portable(job_folder)
    return job_folder


def make_script_paths_portable(job_folder: Path) -> None:
    """Points every app's client script path into the app's own ``custom`` folder.

    NVFlare's ``ScriptRunner`` records the script path it is given: an absolute one ties the
    exported job to the folder fedseg is installed in on the exporting machine, and every site
    deployed elsewhere fails with ``script_path=... not found``. The script is shipped in the
    app's ``custom`` folder, where NVFlare finds a path relative to it.

    Raises:
        RuntimeError: If a client script is not shipped in its app's ``custom`` folder.
    """
    for config_file in sorted(Path(job_folder).glob("*/config/config_fed_client.json")):
        custom = config_file.parents[1] / "custom"
        document = json.loads(config_file.read_text())
        changed = False
        for executor in document.get("executors", []):
            arguments = executor.get("executor", {}).get("args", {})
            script = arguments.get("task_script_path")
            if not script or not Path(script).is_absolute():
                continue
            shipped = sorted(custom.rglob(Path(script).name))
            if len(shipped) != 1:
                raise RuntimeError(
                    f"{config_file}: the client script {Path(script).name} should be shipped "
                    f"once in {custom}, found {len(shipped)}; export the job again"
                )
            arguments["task_script_path"] = shipped[0].relative_to(custom).as_posix()
            changed = True
        if changed:
            write_json_atomic(config_file, document, indent=4)


def run_in_federation(
    federation: Federation,
    config: RunConfig,
    workdir: Path,
    harmonization_artifact: Path | None = None,
    encryption: str | None = None,
    on_poll: Callable[[str, dict], None] | None = None,
) -> Path:
    """Runs the segmentation job in a running federation, the way an operator does.

    When the configuration asks for harmonization and no artifact is given, the harmonization
    fit runs first as its own job in the same federation. Each job is exported, submitted
    through the admin API, waited for and downloaded into ``workdir``.

    Args:
        federation: The federation (started, sites pointing at their datasets).
        config: Run configuration.
        workdir: Where jobs, downloads, the artifact and ``report/`` go.
        harmonization_artifact: Fitted artifact, or ``None``.
        encryption: ``packed``, ``stock`` or ``none``; default what the federation was
            provisioned for.
        on_poll: Called with the job's name and meta after every status poll.

    Returns:
        The ``report`` folder.

    Raises:
        ValueError: If the federation has fewer sites than ``training.min_sites``, was
            provisioned for another encryption, or the artifact does not fit the configuration.
        RuntimeError: If a job fails or its validation results are missing.
    """
    sites = federation.sites
    check_enough_sites(len(sites), config.training.min_sites)
    encryption = encryption or federation.encryption
    check_encryption(federation, encryption)
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    def fit() -> Path:
        recipe = harmonization_recipe(config, _federation_modality(federation), len(sites))
        result = submit_and_fetch(federation, recipe, workdir / "harmonization", on_poll)
        target = workdir / "harmonization.json"
        shutil.copyfile(find_artifact(result), target)
        return target

    harmonization_artifact = _harmonization_for(config, harmonization_artifact, fit)
    recipe = segmentation_recipe(config, harmonization_artifact, encryption=encryption)
    result = submit_and_fetch(federation, recipe, workdir / "segmentation", on_poll)
    return write_job_reports(result, workdir / "report", sites, encryption)


def resume_in_federation(
    federation: Federation,
    point: ResumePoint,
    workdir: Path,
    on_poll: Callable[[str, dict], None] | None = None,
) -> Path:
    """Resumes an interrupted segmentation job in a running federation.

    The new job trains the interrupted job's remaining rounds from its last global model
    (:mod:`jobs.resume`); it is submitted, waited for and downloaded like any job, and its
    reports cover every round of both jobs.

    Args:
        federation: The federation (started).
        point: Where the interrupted job goes on (:func:`find_resume_point`).
        workdir: Where the job, its download and ``report/`` go.
        on_poll: Called with the job's name and meta after every status poll.

    Returns:
        The ``report`` folder.

    Raises:
        ValueError: If the federation has fewer sites than the job's minimum, or was
            provisioned for another encryption.
        RuntimeError: If the resumed job fails or its validation results are missing.
    """
    check_enough_sites(len(federation.sites), point.min_sites)
    check_encryption(federation, point.encryption)
    recipe = segmentation_recipe(point.config, resume=point)
    result = submit_and_fetch(federation, recipe, Path(workdir).resolve() / "segmentation", on_poll)
    return write_job_reports(
        result, Path(workdir) / "report", federation.sites, point.encryption, point.trains
    )


def rejoin_in_federation(
    federation: Federation,
    job_id: str,
    workdir: Path,
    on_poll: Callable[[str, dict], None] | None = None,
) -> tuple[Path, ResumePoint, list[str]]:
    """Lets sites that came back take part in a running job again.

    NVFlare 2.9 starts a job's process at a site only when the job starts, so a site that was
    restarted mid-job stays out of it. This aborts the job (the round under way is lost and
    trained again), downloads it, and resumes it from its last completed round with every
    connected site (:func:`resume_in_federation`). It is refused before anything is aborted
    when no connected site is missing from the job, or when the job could not be resumed.

    Args:
        federation: The federation (started).
        job_id: The running job.
        workdir: Where the aborted job's download, the new job and ``report/`` go.
        on_poll: Called with a job's name and meta after every status poll.

    Returns:
        The ``report`` folder, where the job went on, and the sites that rejoined.

    Raises:
        FederationError: If the job is not running or no connected site is missing from it.
        ResumeError: If the job cannot be resumed (:func:`find_resume_point`).
        RuntimeError: If the new job fails.
    """
    status = job_meta(federation, job_id).get("status")
    if status != "RUNNING":
        raise FederationError(
            f"job {job_id} is {status}, not running; a job that stopped goes on with "
            "fedseg job resume"
        )
    running = set(sites_running_job(federation, job_id))
    returning = sorted(set(connected_sites(federation)) - running)
    if not returning:
        raise FederationError(
            f"every connected site already takes part in job {job_id}; start the site that "
            "left first (fedseg poc start SITE), then rejoin"
        )
    find_resume_point(server_run_folder(federation, job_id))  # refuse before aborting
    abort_job(federation, job_id)
    wait_for_job(federation, job_id, timeout=600)
    interrupted = download_job(federation, job_id, Path(workdir).resolve() / "interrupted")
    point = find_resume_point(interrupted)
    point = replace(point, reports=with_rejoined_sites(point.reports, returning))
    return resume_in_federation(federation, point, workdir, on_poll), point, returning


def export_resumed_job(run_folder: Path, output: Path) -> tuple[Path, ResumePoint]:
    """Writes the job that resumes an interrupted one, for ``submit_job`` by hand.

    Returns:
        The job folder and where it resumes.
    """
    point = find_resume_point(run_folder)
    return export_recipe(segmentation_recipe(point.config, resume=point), output), point


def server_run_folder(federation: Federation, job_id: str) -> Path:
    """A job's run folder in the federation server's workspace."""
    return federation.kit(federation.participants("server")[0]) / job_id


def submit_and_fetch(
    federation: Federation,
    recipe: Recipe,
    folder: Path,
    on_poll: Callable[[str, dict], None] | None = None,
) -> Path:
    """Exports a recipe, submits it (``submit_job``), waits, and downloads its result.

    Returns:
        The downloaded job result.

    Raises:
        RuntimeError: If the job did not complete.
    """
    job_folder = export_recipe(recipe, folder / "job")
    job_id = submit_job(federation, job_folder)
    name = job_folder.name
    meta = wait_for_job(federation, job_id, lambda m: on_poll and on_poll(name, m))
    result = download_job(federation, job_id, folder / "result")
    if meta["status"] != "FINISHED:COMPLETED":
        reasons = "; ".join(job_failure_reasons(result)) or "no reason recorded"
        raise RuntimeError(
            f"job {name} ({job_id}) ended {meta['status']} ({reasons}); the server's log is in "
            f"{result}, the sites' logs in their startup kits"
        )
    return result


def job_failure_reasons(result: Path) -> list[str]:
    """Why a job failed, as its components recorded it (too few sites, refusals...)."""
    found = sorted(Path(result).rglob(SITE_REPORTS_FILE))
    return json.loads(found[0].read_text()).get("failures", []) if found else []


def _federation_modality(federation: Federation) -> str:
    """The sites' modality, from the datasets their kits point at (sites refuse a mismatch)."""
    modalities = set()
    for site in federation.sites:
        modalities.add(dataset_modality(site_dataset(site, federation.kit(site))))
    if len(modalities) != 1:
        raise ValueError(f"sites hold different modalities: {sorted(modalities)}")
    return modalities.pop()
