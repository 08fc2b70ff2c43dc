"""NVFlare Client API loop of the segmentation job: a thin shell over the site engine.

Each round the site validates the global model it received on its own validation split (every
``validation.every_rounds`` rounds; the final global model always), trains locally, and sends
its model with the number of steps and the weight it asks the update to count with in the
average (its steps, or its training cases: the manifest's ``aggregation_weight``); the job
decides how the model travels: as a difference to the global model, or encrypted by the job's
HE filters. When the job shares AdamW's moments (its
manifest says so), the site starts training from the global model's gradient RMS and sends its
own with its model (:mod:`fedseg.moments`). ``evaluate`` tasks (the final global model's
validation, cross-site evaluation) and ``submit_model`` tasks are served too. Each result
declares a small report (metrics per region and per case, training loss, steps, weight and
time, device and data counts; never images or weights) that the server gathers for the
reports. Its cases go under pseudonyms that only this site can resolve: keyed hashes of the
dataset's case ids with a random key drawn for the job, which never leaves the site's
process, so nobody holding a series' UID or a file's path can find its case in the reports.
The site keeps its own copy, with the dataset's case ids and the pseudonym of each
(``report_ids``), in ``fedseg_metrics_<site>.json`` in its working folder.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.metadata
import json
import secrets
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import nvflare.client as flare
import torch
from nvflare.apis.fl_constant import FLMetaKey
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from app_site.engine import CaseMetrics, SegmentationEngine
from app_site.harmonization import check_artifact_modality
from app_site.site_config import check_training_dataset, site_dataset
from fedseg.config import ConfigError, RunConfig, load_config
from fedseg.files import write_json_atomic
from fedseg.harmonization import artifact_transform, read_harmonization_artifact
from fedseg.messages import (
    AGGREGATION_WEIGHT_META_KEY,
    FINAL_VALIDATION,
    PURPOSE_META_KEY,
    REFUSED_META_KEY,
    REPORT_META_KEY,
)
from fedseg.moments import split_moments

RUN_CONFIG_FILE = "fedseg_run.yaml"
ARTIFACT_FILE = "fedseg_harmonization.json"
JOB_MANIFEST_FILE = "fedseg_job.json"
#: Site metrics file, named per site: the simulator may run several sites in one process.
METRICS_FILE = "fedseg_metrics_{site}.json"


def summarize(cases: list[CaseMetrics]) -> dict[str, float]:
    """Mean Dice and HD95 per region over cases, and the mean Dice of the three regions.

    Raises:
        ValueError: If there is no case (a site validates on at least one:
            :func:`app_site.site_config.check_training_dataset`).
    """
    if not cases:
        raise ValueError("no validation case to summarize")
    summary = {}
    for region in ("TC", "WT", "ET"):
        summary[f"dice_{region}"] = float(np.mean([c.dice[region] for c in cases]))
        summary[f"hd95_{region}"] = float(np.mean([c.hd95[region] for c in cases]))
    summary["dice_mean"] = float(np.mean([summary[f"dice_{r}"] for r in ("TC", "WT", "ET")]))
    return summary


def aggregation_weight(weighting: str, steps: int, training_cases: int, round_steps: int) -> float:
    """The weight a site's update counts with in the federation's weighted mean.

    With ``cases`` the weight is the site's training cases in a full round of
    ``round_steps``, and proportionally less for fewer steps. It stays the size of a case
    count, not of cases times steps: an encrypted update is the model times its weight, and
    CKKS has room for values up to a few thousand (:func:`fedseg.packed_ckks.encrypt_update`).

    Args:
        weighting: ``steps`` or ``cases`` (``training.aggregation_weight``).
        steps: Optimizer steps the site made this round.
        training_cases: Cases in the site's training split.
        round_steps: The site's steps in a full round
            (:meth:`fedseg.config.TrainingConfig.steps_per_round`).

    Returns:
        ``steps``, or ``training_cases * steps / round_steps``.

    Raises:
        ValueError: If ``weighting`` is neither.
    """
    if weighting == "steps":
        return float(steps)
    if weighting == "cases":
        return training_cases * steps / round_steps
    raise ValueError(f"aggregation weight must be steps or cases, got {weighting!r}")


def update_problem(
    received: dict[str, np.ndarray], trained: dict[str, np.ndarray], max_ratio: float
) -> str | None:
    """Why a locally trained model must not be sent, or ``None`` when it may.

    Refused: non-finite values, and an update (trained minus received) whose norm exceeds
    ``max_ratio`` times the received model's norm (a diverged or corrupted training).
    """
    bad = sorted(name for name, values in trained.items() if not np.all(np.isfinite(values)))
    if bad:
        return f"non-finite values after training in {', '.join(bad[:3])}"
    floats = [n for n, v in trained.items() if np.asarray(v).dtype.kind == "f"]
    update = np.sqrt(sum(float(np.sum((trained[n] - received[n]) ** 2.0)) for n in floats))
    reference = np.sqrt(
        sum(float(np.sum(np.asarray(received[n], np.float64) ** 2)) for n in floats)
    )
    if update > max_ratio * reference:
        return (
            f"update norm {update:.3g} is over {max_ratio:g} times the global model's "
            f"({reference:.3g}); training diverged"
        )
    return None


def check_fedseg_version(manifest: dict, installed: str | None = None) -> None:
    """Refuses a job built with another fedseg than this site runs.

    The sites of a job must pre-process, train and measure alike, or their updates pull the
    global model apart and their reports measure different things. Jobs built before the
    manifest recorded the version are not checked.

    Args:
        manifest: The job's manifest (``fedseg_version``).
        installed: The site's fedseg version; default the installed distribution's.

    Raises:
        ConfigError: If the versions differ, naming both.
    """
    wanted = manifest.get("fedseg_version")
    installed = installed or importlib.metadata.version("fedseg")
    if wanted is not None and wanted != installed:
        raise ConfigError(
            f"this site runs fedseg {installed}, but the job was built with fedseg {wanted}; "
            f"refusing to train: install fedseg {wanted} at this site, or have the job exported "
            f"again with fedseg {installed} (every site of a job runs the same fedseg)"
        )


def load_job_config(job_folder: Path, manifest: dict) -> RunConfig:
    """The job's run configuration, verified against the hash the job was built with.

    Raises:
        ConfigError: If the site's copy was altered (its hash differs from the job's).
    """
    path = job_folder / RUN_CONFIG_FILE
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != manifest.get("run_config_hash"):
        raise ConfigError(
            f"{path}: this site's copy of the run configuration was altered (hash {digest[:12]}, "
            f"the job's {str(manifest.get('run_config_hash'))[:12]}); refusing to train: "
            "export and submit the job again"
        )
    return load_config(path)


def check_fits(engine: SegmentationEngine, weights: dict[str, np.ndarray]) -> None:
    """Refuses a global model that is not the job's network (names and shapes).

    Raises:
        ValueError: Naming the first differences.
    """
    own = {k: tuple(v.shape) for k, v in engine.model.state_dict().items()}
    received = {k: tuple(np.shape(v)) for k, v in weights.items()}
    problems = [f"missing {k}" for k in sorted(own.keys() - received.keys())]
    problems += [f"unexpected {k}" for k in sorted(received.keys() - own.keys())]
    problems += [
        f"{k}: {received[k]} instead of {own[k]}"
        for k in sorted(own.keys() & received.keys())
        if own[k] != received[k]
    ]
    if problems:
        raise ValueError(
            "the global model does not fit this job's network ("
            + "; ".join(problems[:5])
            + (" ..." if len(problems) > 5 else "")
            + "): the model and the run configuration disagree; refusing to train"
        )


def locate_job_folder(script_folder: Path) -> Path:
    """Finds the folder the job shipped its files to (the client app's custom folder).

    That is the script's own folder when NVFlare runs the job's copy of the script; when it
    runs the script in-process, the custom folder is on ``sys.path``.

    Raises:
        FileNotFoundError: If no candidate holds the job manifest.
    """
    for folder in (script_folder, *(Path(p) for p in sys.path if p)):
        if (folder / JOB_MANIFEST_FILE).is_file():
            return folder
    raise FileNotFoundError(
        f"{JOB_MANIFEST_FILE} not found beside {script_folder} or on sys.path: "
        "was this job built with jobs.segmentation.segmentation_recipe?"
    )


def run(script_folder: Path) -> None:
    """Serves the job's tasks until it ends.

    Args:
        script_folder: Folder of the client script (see :func:`locate_job_folder`).
    """
    job_folder = locate_job_folder(script_folder)
    flare.init()
    site = flare.get_site_name()
    manifest = json.loads((job_folder / JOB_MANIFEST_FILE).read_text())
    check_fedseg_version(manifest)
    config = load_job_config(job_folder, manifest)
    dataset = site_dataset(site)
    check_training_dataset(dataset)
    harmonization = None
    if manifest.get("harmonization_hash"):
        artifact = read_harmonization_artifact(
            job_folder / ARTIFACT_FILE, expected_hash=manifest["harmonization_hash"]
        )
        check_artifact_modality(artifact, dataset)
        harmonization = artifact_transform(artifact)
    engine = SegmentationEngine(config, dataset, harmonization)
    run_folder = Path.cwd() / flare.get_job_id()  # in a deployment, the job's folder in the kit
    metrics_path = (run_folder if run_folder.is_dir() else Path.cwd()) / METRICS_FILE.format(
        site=site
    )
    record = _SiteRecord(metrics_path, site, engine, dataset, manifest)
    shares_moments = bool(manifest.get("shared_moments"))
    weighting = manifest.get("aggregation_weight", "steps")  # jobs built before it: steps
    # The model this site trained last and sent; evaluate tasks load other models into the
    # engine, so cross-site evaluation asks for this one (``submit_model``).
    local_model: dict[str, np.ndarray] | None = None

    while flare.is_running():
        task = flare.receive()
        if task is None:
            break
        if flare.is_submit_model():  # carries no weights: send this site's local model
            if local_model is None:  # the job's NoLocalModelReply filter answers for it
                reason = "every update this site trained in the job was refused, or it trained none"
                flare.send(FLModel(metrics={}, meta={REFUSED_META_KEY: reason}))
            else:
                flare.send(FLModel(params=_tensors(local_model)))
            continue
        received, shared = split_moments({k: np.asarray(v) for k, v in task.params.items()})
        check_fits(engine, received)
        engine.load_weights(received)
        if flare.is_train():
            validates = task.current_round % config.validation.every_rounds == 0
            cases = engine.validate().cases if validates else None
            steps = engine.steps_per_round
            if shares_moments:
                engine.load_gradient_rms(shared, steps_done=task.current_round * steps)
            trained = engine.train(steps, first_step=task.current_round * steps)
            metrics = summarize(cases) if validates else None
            weight = aggregation_weight(weighting, trained.steps, len(engine.train_files), steps)
            report = record.round(task.current_round, metrics, cases, trained, weight)
            weights = engine.weights()
            meta = {
                FLMetaKey.NUM_STEPS_CURRENT_ROUND: trained.steps,
                AGGREGATION_WEIGHT_META_KEY: weight,
                REPORT_META_KEY: report,
            }
            refusal = update_problem(received, weights, config.federation.max_update_ratio)
            if refusal:  # nothing of the broken model leaves the site
                record.refusal(task.current_round, refusal)
                meta[REFUSED_META_KEY] = refusal
                flare.send(
                    FLModel(metrics=metrics or {}, current_round=task.current_round, meta=meta)
                )
                continue
            local_model = weights
            if shares_moments:
                weights = {**weights, **engine.gradient_rms()}
            # Full weights here; the job's transfer type or HE filters decide what travels.
            flare.send(
                FLModel(
                    params=_tensors(weights),
                    params_type=ParamsType.FULL,
                    metrics=metrics,
                    current_round=task.current_round,
                    meta=meta,
                )
            )
        elif flare.is_evaluate():
            cases = engine.validate().cases
            metrics = summarize(cases)
            if (task.meta or {}).get(PURPOSE_META_KEY) == FINAL_VALIDATION:
                report = record.final(metrics, cases)
                meta = {PURPOSE_META_KEY: FINAL_VALIDATION, REPORT_META_KEY: report}
                flare.send(FLModel(metrics=metrics, meta=meta))
            else:
                record.evaluation(metrics, cases)
                flare.send(FLModel(metrics=metrics))


def _tensors(weights: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The job exchanges PyTorch tensors (NVFlare's PyTorch exchange format)."""
    return {key: torch.from_numpy(value) for key, value in weights.items()}


def case_pseudonym(key: bytes, case_id: str) -> str:
    """The name a case goes under in the reports a site declares.

    Args:
        key: The site's secret for the job (never sent).
        case_id: The dataset's case id (``fedseg ingest``'s hash of a series UID or a path).

    Returns:
        ``case-`` and 12 hex digits of HMAC-SHA256(``key``, ``case_id``).
    """
    return "case-" + hmac.new(key, case_id.encode(), hashlib.sha256).hexdigest()[:12]


class _SiteRecord:
    """The site's own metrics file, and the reports it declares to the server."""

    def __init__(self, path: Path, site: str, engine: SegmentationEngine, dataset: Path, manifest):
        qc_path = dataset / "qc.json"
        counts = json.loads(qc_path.read_text())["counts"] if qc_path.is_file() else {}
        self.path = path
        self._pseudonym_key = secrets.token_bytes(32)
        self.document = {
            "site": site,
            "device": str(engine.device),
            "data": {
                "training_cases": len(engine.train_files),
                "validation_cases": len(engine.validation_files),
                "qc_counts": counts,
            },
            "harmonization_hash": manifest.get("harmonization_hash"),
            "rounds": [],
            "final": None,
            "evaluations": [],
            "report_ids": {},  # pseudonym in the declared reports -> the dataset's case id
        }

    def round(self, number, metrics, cases, trained, weight) -> dict:
        """Records a round; returns the report declared with the update.

        ``weight`` is what the update asks to count for in the federation's average.

        ``metrics`` and ``cases`` are ``None`` in a round without validation; the report's
        ``validation`` is then ``None``.
        """
        validation = (
            None if cases is None else {"metrics": metrics, "cases": [asdict(c) for c in cases]}
        )
        training = {
            "loss": trained.mean_loss,
            "steps": trained.steps,
            "seconds": trained.seconds,
            "weight": weight,
        }
        self.document["rounds"].append(
            {
                "round": number,
                **(validation or {"metrics": None, "cases": []}),
                "train_loss": trained.mean_loss,
                "train_steps": trained.steps,
                "train_seconds": trained.seconds,
                "aggregation_weight": weight,
            }
        )
        declared = None if validation is None else self._declared(validation)
        self._write()
        return {**self._site_fields(), "validation": declared, "training": training}

    def final(self, metrics, cases) -> dict:
        """Records the final global model's validation; returns the declared report."""
        validation = {"metrics": metrics, "cases": [asdict(c) for c in cases]}
        self.document["final"] = validation
        declared = self._declared(validation)
        self._write()
        return {**self._site_fields(), "validation": declared}

    def _declared(self, validation: dict) -> dict:
        """``validation`` as the server gets it: each case under its pseudonym."""
        cases = []
        for case in validation["cases"]:
            pseudonym = case_pseudonym(self._pseudonym_key, case["case_id"])
            self.document["report_ids"][pseudonym] = case["case_id"]
            cases.append({**case, "case_id": pseudonym})
        return {**validation, "cases": cases}

    def _site_fields(self) -> dict:
        return {key: self.document[key] for key in ("device", "data", "harmonization_hash")}

    def refusal(self, round_number, reason: str) -> None:
        """Records that this round's update was not sent, and why."""
        self.document.setdefault("refused", []).append({"round": round_number, "reason": reason})
        self._write()

    def evaluation(self, metrics, cases) -> None:
        # Which model was evaluated is known to the server (its cross-site matrix), not here.
        self.document["evaluations"].append(
            {"metrics": metrics, "cases": [asdict(c) for c in cases]}
        )
        self._write()

    def _write(self) -> None:
        # One line: the file grows every round and is written before the update is sent.
        write_json_atomic(self.path, self.document, indent=None, allow_nan=True)
