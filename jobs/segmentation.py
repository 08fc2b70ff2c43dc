"""The federated segmentation job: FedAvg over MONAI training at each site (recipe builder).

Three ways for the updates to travel, chosen with ``encryption``:

- ``packed`` (the default for a federation): each site encrypts its whole model, times its
  aggregation weight, as one packed CKKS vector (:mod:`fedseg.packed_ckks`); the server adds
  ciphertexts it cannot decrypt and persists only the encrypted global model; sites decrypt.
- ``stock``: NVFlare's own HE filters (``FedAvgRecipeWithHE``), kept for comparison.
- ``none``: plaintext FedAvg (weight differences; the server refuses non-finite and outlier
  updates) with cross-site evaluation of the final models.

In every mode each site validates the global model it receives before training, declares its
metrics with its update, and validates the final global model after the last round (not with
``stock``: NVFlare 2.9 cannot send its encrypted models to sites outside training); the server
gathers these reports into ``fedseg_site_reports.json``.

With ``training.shared_moments`` the global model also carries the sites' averaged AdamW
gradient RMS (:mod:`fedseg.moments`), starting from zeros in the initial model; not with
``stock``, whose NVFlare persistor holds the network alone (its sites keep their own moments).

Each update counts in the average with the weight its site declares: its training steps, or
with ``training.aggregation_weight: cases`` its training cases (not with
``stock``: NVFlare's HE filters weigh by steps).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import weakref
from pathlib import Path

import torch
import yaml
from nvflare.apis.job_def import ALL_SITES, SERVER_SITE_NAME
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.shareablegenerators.full_model_shareable_generator import (
    FullModelShareableGenerator,
)
from nvflare.app_common.widgets.validation_json_generator import ValidationJsonGenerator
from nvflare.app_common.workflows.cross_site_model_eval import CrossSiteModelEval
from nvflare.app_common.workflows.scatter_and_gather import ScatterAndGather
from nvflare.app_opt.pt.recipes.fedavg_he import FedAvgRecipeWithHE
from nvflare.client.config import ExchangeFormat, TransferType
from nvflare.fuel.utils.constants import FrameworkType
from nvflare.job_config.api import FedJob
from nvflare.job_config.defs import FilterType
from nvflare.job_config.script_runner import ScriptRunner
from nvflare.recipe.spec import Recipe

from app_server.aggregation import PackedHEAggregator, PlaintextAggregator
from app_server.global_model import GlobalModelLocator, GlobalModelPersistor
from app_server.report_collector import FinalValidation, SiteReportFilter
from app_server.site_reports import RESUMED_REPORTS_FILE
from app_site.he_filters import (
    NoLocalModelReply,
    OutgoingAudit,
    PackedHEDecryptor,
    PackedHEEncryptor,
)
from app_site.training_task import ARTIFACT_FILE, JOB_MANIFEST_FILE, RUN_CONFIG_FILE
from fedseg.config import RunConfig
from fedseg.files import write_json_atomic
from fedseg.harmonization import HarmonizationConfig, read_harmonization_artifact
from fedseg.moments import zero_moments
from jobs.resume import ResumePoint
from models.networks import NETWORKS, build_network

logger = logging.getLogger(__name__)

CLIENT_SCRIPT = Path(__file__).resolve().parent / "scripts" / "segmentation_client.py"
#: How updates travel: see the module docstring.
ENCRYPTION_MODES = ("packed", "stock", "none")
#: The initial global model (a PyTorch state dict built from the run configuration's seed).
INITIAL_MODEL_FILE = "fedseg_initial_model.pt"
#: A resumed job's starting model (the interrupted job's last), in the server's custom folder.
RESUMED_MODEL_STEM = "fedseg_resumed_model"
#: The report store's mode names.
MODE_NAMES = {"packed": "he-packed", "stock": "he-stock", "none": "plaintext"}
#: Rounds between the server's memory clean-ups (``gc.collect`` and ``malloc_trim``).
#: NVFlare's ScatterAndGather cleans after every round by default; a full collection of the
#: server process costs about 0.2 s on two CPU cores, on the path from the last update to the
#: next round's task. Every 5 rounds is NVFlare's own advice for servers.
SERVER_MEMORY_CLEANUP_ROUNDS = 5
_TRAIN, _VALIDATE = AppConstants.TASK_TRAIN, AppConstants.TASK_VALIDATION
_SUBMIT = AppConstants.TASK_SUBMIT_MODEL


def segmentation_recipe(
    config: RunConfig,
    harmonization_artifact: Path | None = None,
    encryption: str = "none",
    name: str = "fedseg-segmentation",
    sites: int | None = None,
    resume: ResumePoint | None = None,
) -> Recipe:
    """A FedAvg recipe that trains ``config``'s network at every site.

    The run configuration, the harmonization artifact, the initial model and a manifest with
    the artifact's hash travel inside the job; sites refuse to train when their copy of the
    artifact does not match that hash. Every mode starts from the same initial weights (built
    with ``training.seed``), so plaintext and encrypted runs can be compared.

    Given ``resume``, the recipe is the interrupted job's own (configuration, artifact,
    encryption, minimum, name: the other arguments are ignored) and trains its remaining
    rounds, from its last global model and with its reports (:mod:`jobs.resume`).

    Args:
        config: The run configuration.
        harmonization_artifact: Fitted artifact, or ``None`` when the configuration asks for
            no harmonization.
        encryption: ``packed``, ``stock`` or ``none`` (see the module docstring).
        name: Job name.
        sites: Fewest sites whose updates make a round; default ``training.min_sites``.
        resume: Where an interrupted job goes on, or ``None`` for a new job.

    Returns:
        The recipe (execute it in an NVFlare environment, or export it).

    Raises:
        ValueError: If the artifact does not fit the configuration (see
            :func:`checked_artifact_hash`), or the encryption mode is unknown.
        ArtifactError: If the artifact is missing, altered or not a harmonization artifact.
    """
    if resume is not None:
        config, harmonization_artifact = resume.config, resume.harmonization_artifact
        encryption, name, sites = resume.encryption, resume.name, resume.min_sites
    artifact_hash = checked_artifact_hash(config, harmonization_artifact)
    if encryption not in ENCRYPTION_MODES:
        raise ValueError(f"encryption must be one of {ENCRYPTION_MODES}, got {encryption!r}")
    min_sites = sites or config.training.min_sites
    staging = Path(tempfile.mkdtemp(prefix="fedseg-job-"))
    if encryption == "stock":
        recipe = _stock_he_recipe(config, name, min_sites, staging)
    else:
        job = _scatter_and_gather(config, name, min_sites, encryption == "packed", staging, resume)
        if encryption == "packed":
            recipe = _packed_he_recipe(job)
        else:
            recipe = _plaintext_recipe(
                job, resume is None or resume.trains, config.federation.round_timeout
            )
    shared_moments = config.training.shared_moments and encryption != "stock"
    if config.training.shared_moments and not shared_moments:
        logger.warning("encryption stock carries the network alone: sites keep their own moments")
    if encryption == "stock":
        logger.warning(
            "encryption stock runs NVFlare's FedAvg workflow: federation.straggler_seconds and "
            "round_timeout do not apply"
        )
    weighting = "steps" if encryption == "stock" else config.training.aggregation_weight
    if weighting != config.training.aggregation_weight:
        logger.warning("encryption stock weighs every update by its steps (NVFlare's HE filters)")
    settings = {
        "encryption": encryption,
        "min_sites": min_sites,
        "name": name,
        "shared_moments": shared_moments,
        "aggregation_weight": weighting,
    }
    artifact = (harmonization_artifact, artifact_hash) if artifact_hash else None
    for path in _job_files(config, artifact, settings, staging):
        recipe._job.add_file_to(str(path), ALL_SITES)  # Recipe keeps its FedJob private
    # A dict sent to the server becomes server settings of the job's config_fed_server.json.
    interval = config.federation.task_request_interval
    recipe._job.to_server({"server": {"task_request_interval": interval}})
    recipe.add_server_input_filter(
        SiteReportFilter(MODE_NAMES[encryption]), tasks=[_TRAIN, _VALIDATE]
    )
    weakref.finalize(recipe, shutil.rmtree, staging, True)  # once exported or run, or at exit
    return recipe


def checked_artifact_hash(config: RunConfig, artifact: Path | None) -> str | None:
    """Checks that a job's harmonization artifact is intact and fits its configuration.

    Args:
        config: The run configuration.
        artifact: The fitted artifact, or ``None``.

    Returns:
        The artifact's hash, or ``None`` when the configuration asks for no harmonization.

    Raises:
        ValueError: If the configuration asks for harmonization and no artifact is given, an
            artifact is given to a configuration without harmonization, or the artifact was
            fitted with another method or mask than the configuration names.
        ArtifactError: If the artifact is missing, altered or not a harmonization artifact.
    """
    settings = config.harmonization
    if artifact is None:
        if settings.method != "none":
            raise ValueError(
                "the configuration asks for harmonization: fit an artifact first and pass it "
                "(or the harmonization job's downloaded result folder) as --harmonization; in a "
                "federation, submit the fit that `fedseg harmonize export` writes (`fedseg job "
                "run` and `fedseg job submit` fit it themselves)"
            )
        return None
    if settings.method == "none":
        raise ValueError(
            f"{artifact}: the configuration's harmonization.method is none; leave the artifact "
            "out, or set harmonization.method to the method it was fitted with"
        )
    document = read_harmonization_artifact(artifact)
    fitted = HarmonizationConfig.from_dict(document["config"])
    if (fitted.method, fitted.mask_method) != (settings.method, settings.mask):
        raise ValueError(
            f"{artifact}: fitted with method {fitted.method} and mask {fitted.mask_method}, "
            f"but the configuration's harmonization asks for method {settings.method} and mask "
            f"{settings.mask}; fit the artifact again with this configuration, or make "
            "harmonization.method and harmonization.mask name the artifact's"
        )
    return document["hash"]


def _plaintext_recipe(job: FedJob, local_models: bool, timeout: int) -> Recipe:
    """Rounds and final validation, then cross-site evaluation.

    Every site validates every site's local model and the global one; a job that trains no
    round (resumed after its last) leaves its sites no local model, and evaluates the global
    model alone. A site has ``timeout`` seconds (``federation.round_timeout``; 0: no limit)
    to submit its model and to validate each model, as for a round.
    """
    job.to_clients(_script_runner(TransferType.DIFF), tasks=[_TRAIN, _VALIDATE, _SUBMIT])
    # Result filters run in order: a site without a local model answers so, then the audit.
    # NVFlare takes one filter chain per task set, and task sets that overlap are refused.
    job.to_clients(NoLocalModelReply(), tasks=[_SUBMIT], filter_type=FilterType.TASK_RESULT)
    for tasks in ([_SUBMIT], [_TRAIN, _VALIDATE]):
        job.to_clients(OutgoingAudit(), tasks=tasks, filter_type=FilterType.TASK_RESULT)
    locator = job.to_server(GlobalModelLocator(persistor_id="persistor"), id="locator")
    job.to_server(ValidationJsonGenerator())
    job.to_server(
        CrossSiteModelEval(
            model_locator_id=locator,
            submit_model_task_name=_SUBMIT if local_models else "",
            submit_model_timeout=timeout,
            validation_timeout=timeout,
        )
    )
    return Recipe(job)


def _packed_he_recipe(job: FedJob) -> Recipe:
    job.to_clients(_script_runner(TransferType.FULL), tasks=[_TRAIN, _VALIDATE, _SUBMIT])
    job.to_clients(PackedHEDecryptor(), tasks=[_TRAIN, _VALIDATE], filter_type=FilterType.TASK_DATA)
    # Result filters run in order: encrypt, then audit what actually leaves.
    job.to_clients(PackedHEEncryptor(), tasks=[_TRAIN], filter_type=FilterType.TASK_RESULT)
    for tasks in ([_TRAIN], [_VALIDATE, _SUBMIT]):
        job.to_clients(
            OutgoingAudit(require_encrypted=True), tasks=tasks, filter_type=FilterType.TASK_RESULT
        )
    return Recipe(job)


def _scatter_and_gather(
    config: RunConfig,
    name: str,
    min_sites: int,
    encrypted: bool,
    staging: Path,
    resume: ResumePoint | None,
) -> FedJob:
    """Server side shared by the plaintext and packed jobs: rounds, then final validation.

    Every connected site gets each round's task; the round goes on once ``min_sites`` updates
    arrived and the others had ``federation.straggler_seconds`` more, and fails after
    ``federation.round_timeout`` with fewer (see :mod:`app_server.aggregation`). A resumed
    job starts at the interrupted job's next round from its last global model and reports.
    """
    mode = MODE_NAMES["packed" if encrypted else "none"]
    job = FedJob(name=name, min_clients=min_sites)
    if resume is None:
        start_round, resumed_round = 0, None
        initial_model = _write_initial_model(
            config, staging / INITIAL_MODEL_FILE, config.training.shared_moments
        )
    else:
        start_round, resumed_round = resume.next_round, resume.next_round - 1
        initial_model = staging / f"{RESUMED_MODEL_STEM}{resume.model.suffix}"
        if encrypted or not config.training.shared_moments:  # ciphertext holds its moments
            shutil.copyfile(resume.model, initial_model)
        else:  # the plaintext model file holds the network alone, its moments are beside it
            state = torch.load(resume.model, map_location="cpu", weights_only=True)
            if resume.moments is None:
                logger.warning(
                    "no shared moments match the checkpoint record of round %d: they start "
                    "again from zeros",
                    resumed_round,
                )
                moments = zero_moments(initial_network(config))
            else:
                moments = torch.load(resume.moments, map_location="cpu", weights_only=True)
            torch.save({**state, **moments}, initial_model)
        write_json_atomic(staging / RESUMED_REPORTS_FILE, resume.reports)
        job.add_file_to(str(staging / RESUMED_REPORTS_FILE), SERVER_SITE_NAME)
    job.add_file_to(str(initial_model), SERVER_SITE_NAME)
    persistor = GlobalModelPersistor(initial_model.name, encrypted, resumed_round)
    job.to_server(persistor, id="persistor")
    job.to_server(FullModelShareableGenerator(), id="shareable_generator")
    weighting = config.training.aggregation_weight
    if encrypted:
        aggregator = PackedHEAggregator(min_sites, aggregation_weight=weighting)
    else:
        aggregator = PlaintextAggregator(
            min_sites, config.federation.outlier_factor, aggregation_weight=weighting
        )
    job.to_server(aggregator, id="aggregator")
    job.to_server(
        ScatterAndGather(
            min_clients=min_sites,
            start_round=start_round,
            num_rounds=config.training.rounds - start_round,
            wait_time_after_min_received=config.federation.straggler_seconds,
            train_timeout=config.federation.round_timeout,
            ignore_result_error=True,  # a failing site is a missing update, not the end
            aggregator_id="aggregator",
            persistor_id="persistor",
            shareable_generator_id="shareable_generator",
            memory_gc_rounds=SERVER_MEMORY_CLEANUP_ROUNDS,
        )
    )
    job.to_server(
        FinalValidation(
            persistor_id="persistor",
            model_name=persistor.file_name,
            mode=mode,
            timeout=config.federation.round_timeout,
        )
    )
    return job


def _script_runner(transfer: TransferType) -> ScriptRunner:
    return ScriptRunner(
        script=str(CLIENT_SCRIPT),
        framework=FrameworkType.PYTORCH,
        server_expected_format=ExchangeFormat.NUMPY,
        params_transfer_type=transfer,
    )


def _stock_he_recipe(config: RunConfig, name: str, min_sites: int, staging: Path) -> Recipe:
    initial_model = _write_initial_model(config, staging / INITIAL_MODEL_FILE)
    recipe = FedAvgRecipeWithHE(
        name=name,
        model=_model_spec(config),
        initial_ckpt=os.path.relpath(initial_model),
        min_clients=min_sites,
        num_rounds=config.training.rounds,
        train_script=str(CLIENT_SCRIPT),
    )
    # After the recipe's own encryptors (one chain per task set it configured).
    for tasks in ([_TRAIN], [_SUBMIT], [_VALIDATE]):
        recipe.add_client_output_filter(OutgoingAudit(), tasks=tasks)
    return recipe


def _model_spec(config: RunConfig) -> dict:
    network = NETWORKS[config.model.name]
    return {"class_path": f"{network.__module__}.{network.__name__}", "args": config.model.args}


def initial_network(config: RunConfig) -> torch.nn.Module:
    """The job's initial network: the configured one, built with ``training.seed``."""
    with torch.random.fork_rng():
        torch.manual_seed(config.training.seed)
        return build_network(config.model.name, **config.model.args)


def _write_initial_model(config: RunConfig, path: Path, shared_moments: bool = False) -> Path:
    """The initial global model; with ``shared_moments``, zero moments ("none yet") too."""
    network = initial_network(config)
    state = network.state_dict()
    if shared_moments:
        state.update(zero_moments(network))
    torch.save(state, path)
    return path


def _job_files(
    config: RunConfig, artifact: tuple[Path, str] | None, settings: dict, staging: Path
) -> list:
    """The run configuration, the artifact (path, hash) and the manifest (hashes, ``settings``)."""
    (staging / RUN_CONFIG_FILE).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    manifest = {
        "fedseg_version": importlib.metadata.version("fedseg"),
        "run_config_hash": hashlib.sha256((staging / RUN_CONFIG_FILE).read_bytes()).hexdigest(),
        "harmonization_hash": None,
        **settings,
    }
    if artifact is not None:
        path, manifest["harmonization_hash"] = artifact
        (staging / ARTIFACT_FILE).write_bytes(Path(path).read_bytes())
    (staging / JOB_MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return [staging / RUN_CONFIG_FILE, staging / JOB_MANIFEST_FILE] + (
        [staging / ARTIFACT_FILE] if artifact is not None else []
    )
