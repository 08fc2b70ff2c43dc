"""Where an interrupted segmentation job can go on: its last completed round, found on disk.

NVFlare 2.9 does not resume a job after a server restart (it has no job snapshots), so fedseg
resumes one as a new job: the interrupted job's server run folder holds everything that
needs (the run configuration, the harmonization artifact and the manifest the job was built
with; the global model of the last completed round with its checkpoint record; the sites'
reports). :func:`find_resume_point` reads and checks them;
:func:`jobs.segmentation.segmentation_recipe` builds the job that trains the remaining rounds
from that model and reports every round of both jobs, each exactly once.

What does not carry over: the sites' own optimizer state and data order restart with the new
job's processes, so a resumed job is not bit-for-bit the uninterrupted one. The shared moments
of :mod:`fedseg.moments` do carry over: inside an encrypted job's ciphertext, and in a
plaintext job as the moments file next to the model, when its hash matches the checkpoint
record's (a server stopped between writing the model and its moments leaves moments of the
previous round: those start again from zeros).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from app_server.global_model import CHECKPOINT_FILE, PLAINTEXT_MOMENTS_FILE
from app_server.site_reports import (
    RESUMED_REPORTS_FILE,
    SITE_REPORTS_FILE,
    last_reported_round,
    resumed_content,
    sites_of_round,
)
from app_site.training_task import ARTIFACT_FILE, JOB_MANIFEST_FILE, RUN_CONFIG_FILE
from fedseg.config import RunConfig, load_config
from fedseg.files import file_sha256

#: Encryption modes a job can be resumed in (NVFlare's stock HE filters keep their own model).
RESUMABLE_MODES = ("packed", "none")


#: The server's app folder in a run folder.
SERVER_APP = "app_server"


class ResumeError(RuntimeError):
    """A run folder that cannot be resumed, and why."""


@dataclass(frozen=True)
class ResumePoint:
    """An interrupted job and the round its resumption starts at.

    Attributes:
        job_id: The interrupted job (its run folder's name).
        config: Its run configuration.
        harmonization_artifact: Its harmonization artifact, or ``None``.
        encryption: How its updates travelled (``packed`` or ``none``).
        min_sites: Its minimum number of sites per round.
        name: Its job name.
        next_round: The first round still to train (may equal the number of rounds: then only
            the final validation is left).
        model: The global model of round ``next_round - 1``.
        moments: A plaintext job's shared AdamW moments of that round, or ``None`` (an
            encrypted job's model holds its own; a job without shared moments, or whose
            moments file does not match the checkpoint record, starts them from zeros).
        reports: The reports the resumed job starts from (rounds before ``next_round``).
    """

    job_id: str
    config: RunConfig
    harmonization_artifact: Path | None
    encryption: str
    min_sites: int
    name: str
    next_round: int
    model: Path
    moments: Path | None
    reports: dict

    @property
    def trains(self) -> bool:
        """Whether rounds are left to train (otherwise only the final validation is)."""
        return self.next_round < self.config.training.rounds


def find_resume_point(run_folder: Path) -> ResumePoint:
    """Reads an interrupted job's server run folder and checks it can be resumed.

    Args:
        run_folder: The job's folder in the server's workspace (``<server>/<job id>``), or
            any folder holding exactly one such run (a copy of it, a downloaded result).

    Returns:
        Where the job goes on.

    Raises:
        ResumeError: If the folder holds no fedseg server run (or several), the job was
            exported without the settings a resumption needs, its encryption cannot be
            resumed, no round completed, the persisted model does not match its checkpoint
            record, or the job already completed.
    """
    app = _server_app(Path(run_folder))
    custom = app / "custom"
    manifest = json.loads((custom / JOB_MANIFEST_FILE).read_text())
    missing = [key for key in ("encryption", "min_sites", "name") if key not in manifest]
    if missing:
        raise ResumeError(
            f"{custom / JOB_MANIFEST_FILE}: no {', '.join(missing)}; the job was exported by a "
            "fedseg that could not resume jobs: submit it again"
        )
    if manifest["encryption"] not in RESUMABLE_MODES:
        raise ResumeError(
            f"{app.parent}: a job with NVFlare's stock HE filters cannot be resumed; "
            "run it again, or use fedseg's packed HE (the default), which can"
        )
    config = load_config(custom / RUN_CONFIG_FILE)
    completed, model, moments = _last_completed_round(app)
    reports_file = app.parent / SITE_REPORTS_FILE
    if not reports_file.is_file():  # a resumed job stopped before any report arrived
        reports_file = custom / RESUMED_REPORTS_FILE
    reports = json.loads(reports_file.read_text())
    next_round = completed + 1
    job_id = _job_id(app.parent)
    if next_round >= config.training.rounds and _final_validation_done(reports):
        raise ResumeError(
            f"{app.parent}: the job completed all {config.training.rounds} rounds and its "
            "final validation; there is nothing to resume"
        )
    artifact = custom / ARTIFACT_FILE
    return ResumePoint(
        job_id=job_id,
        config=config,
        harmonization_artifact=artifact if artifact.is_file() else None,
        encryption=manifest["encryption"],
        min_sites=int(manifest["min_sites"]),
        name=manifest["name"],
        next_round=next_round,
        model=model,
        moments=moments,
        reports=resumed_content(reports, next_round, job_id),
    )


def _server_app(folder: Path) -> Path:
    """The server app folder of the one fedseg run under ``folder``."""
    if not folder.is_dir():
        raise ResumeError(f"{folder}: no such folder; give the job's folder on the server")
    servers = sorted(
        manifest.parents[1] for manifest in folder.rglob(f"{SERVER_APP}/custom/{JOB_MANIFEST_FILE}")
    )
    if len(servers) != 1:
        found = "no fedseg segmentation job" if not servers else f"{len(servers)} jobs"
        raise ResumeError(
            f"{folder}: {found} found; give the folder of one job in the server's workspace "
            "(<server workspace>/<job id>)"
        )
    return servers[0]


def _job_id(run_folder: Path) -> str:
    """The job's id: from its ``meta.json`` (a downloaded job's run folder is ``workspace``)."""
    meta = run_folder / "meta.json"
    if meta.is_file():
        return json.loads(meta.read_text()).get("job_id", run_folder.name)
    return run_folder.name


def _last_completed_round(app: Path) -> tuple[int, Path, Path | None]:
    """The last round whose global model is on disk, checked against the checkpoint record.

    Returns:
        The round, its model and, when the record names them and the file on disk matches,
        its shared moments.
    """
    record_path = app / CHECKPOINT_FILE
    if not record_path.is_file():
        raise ResumeError(
            f"{app.parent}: no round completed (no {CHECKPOINT_FILE}); nothing was trained "
            "that a new job would not redo: submit the job again"
        )
    record = json.loads(record_path.read_text())
    model = app / record["model_file"]
    digest = file_sha256(model) if model.is_file() else None
    previous = record.get("previous")
    if digest == record["sha256"]:
        entry = record
    elif previous and digest == previous["sha256"]:  # stopped between the record and the model
        entry = previous
    else:
        raise ResumeError(
            f"{model}: the global model does not match its checkpoint record "
            f"({record_path.name}, round {record['round']}); it was altered or lost, so the job "
            "cannot be resumed: submit it again"
        )
    moments = app / PLAINTEXT_MOMENTS_FILE
    expected = entry.get("moments_sha256")
    matches = expected is not None and moments.is_file() and file_sha256(moments) == expected
    return entry["round"], model, moments if matches else None


def _final_validation_done(reports: dict) -> bool:
    sites = sites_of_round(reports, last_reported_round(reports))
    return bool(sites) and all(reports["sites"][site].get("final") for site in sites)
