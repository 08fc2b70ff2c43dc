"""The ``fedseg`` command: parses arguments and calls the packages' functions.

Errors that the user can fix (bad arguments, missing or malformed inputs) are printed as one
clear message on stderr with exit status 2; nothing else is caught.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from app_server import federation as poc
from app_server.federation import Federation, FederationError
from app_server.report import FEDERATION, format_number
from app_site.harmonization import (
    apply_to_dataset,
    check_dataset,
    dataset_modality,
    site_statistics,
)
from app_site.ingest.labels import LabelError
from app_site.ingest.pipeline import MODALITIES, IngestOptions, IngestReport, ingest
from app_site.ingest.series import ACCEPTED
from app_site.site_config import check_distinct_datasets
from fedseg import __version__
from fedseg.artifacts import ArtifactError, write_artifact
from fedseg.config import load_config
from fedseg.harmonization import (
    DEFAULT_MIN_IMAGES,
    METHODS,
    HarmonizationConfig,
    HarmonizationError,
    check_method_fits_modality,
    combine_statistics,
    default_method,
    read_harmonization_artifact,
)
from fedseg.synth.check import CaseCheck, SynthCheckError, check_hospitals
from fedseg.synth.hospitals import CaseSummary, SiteSummary, SynthConfig, synthesize_hospitals
from jobs.progress import RoundProgress
from jobs.resume import ResumeError, ResumePoint, find_resume_point
from jobs.runner import (
    export_harmonization_job,
    export_job,
    export_resumed_job,
    rejoin_in_federation,
    resolve_artifact,
    resume_in_federation,
    resume_job,
    run_in_federation,
    run_job,
    server_run_folder,
)
from jobs.segmentation import ENCRYPTION_MODES
from transforms.masks import MASK_METHODS

# Wide enough for the summary tables when output goes to a file or a CI log, where rich
# would otherwise assume 80 columns and truncate cells.
_LOG_WIDTH = 160
console = Console(width=None if sys.stdout.isatty() else _LOG_WIDTH)
#: Where ``fedseg poc`` keeps its federation unless told otherwise.
DEFAULT_FEDERATION = poc.PROJECT_TEMPLATE.parent / "federation"
HARMONIZATION_HELP = (
    "fitted harmonization artifact, or the downloaded result folder of the harmonization job"
)
error_console = Console(stderr=True, width=None if sys.stderr.isatty() else _LOG_WIDTH)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``fedseg`` command line.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` when ``None``.

    Returns:
        The process exit status.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (
        ValueError,
        OSError,  # a missing file, a folder where a file is meant (or the reverse), no permission
        SynthCheckError,
        LabelError,
        HarmonizationError,
        ArtifactError,
        FederationError,
        ResumeError,
    ) as error:
        _print_error(args, error)
        return 2
    except RuntimeError as error:  # a job that failed: its message says where the logs are
        _print_error(args, error)
        return 1


def _print_error(args: argparse.Namespace, error: Exception) -> None:
    command = " ".join(filter(None, (args.command, getattr(args, "action", None))))
    error_console.print(f"[bold red]fedseg {command}: error:[/] {error}", highlight=False)


def build_parser() -> argparse.ArgumentParser:
    """Builds the argument parser with one sub-command per user task."""
    parser = argparse.ArgumentParser(
        prog="fedseg", description="Federated 3D tumour segmentation on NVIDIA FLARE and MONAI."
    )
    parser.add_argument("--version", action="version", version=f"fedseg {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    synth = commands.add_parser(
        "synth",
        help="write simulated hospitals (DICOM series, tumour labels, manifests)",
        description="Write simulated hospitals: one MR DICOM series and one tumour label per "
        "case, per site, each site with its own scanner, protocol and patients.",
    )
    synth.add_argument("--out", type=Path, required=True, help="output folder")
    synth.add_argument("--sites", type=int, default=3, help="number of hospitals (default 3)")
    synth.add_argument(
        "--cases-per-site",
        type=int,
        default=20,
        help="average cases per site; sites differ around it (default 20)",
    )
    synth.add_argument(
        "--size", type=int, default=96, help="in-plane matrix size of each series (default 96)"
    )
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    _add_workers_argument(synth)
    synth.add_argument(
        "--check",
        action="store_true",
        help="afterwards, read every series back with SimpleITK and verify it",
    )
    synth.set_defaults(handler=run_synth)

    ingest_command = commands.add_parser(
        "ingest",
        help="turn a folder of DICOM/NIfTI into a training dataset with a QC record",
        description="Read every DICOM series and NIfTI volume under INPUT (never modifying "
        "it) and write canonical NIfTI images and labels, datalist.json and qc.json to OUTPUT. "
        "Exit status 0 when at least one series was accepted.",
    )
    ingest_command.add_argument("--input", type=Path, required=True, help="folder to read")
    ingest_command.add_argument("--output", type=Path, required=True, help="dataset folder")
    ingest_command.add_argument(
        "--manifest", type=Path, help="CSV case_id,series_uid,label naming label files"
    )
    ingest_command.add_argument(
        "--modality",
        choices=MODALITIES,
        help="accept only DICOM series of this modality (default: both); the modality of NIfTI "
        "inputs, which hold none",
    )
    ingest_command.add_argument(
        "--resample-gaps",
        action="store_true",
        help="resample series with missing slices or uneven spacing (default: reject them)",
    )
    ingest_command.add_argument(
        "--resample-tilt",
        action="store_true",
        help="resample gantry-tilted series onto an orthogonal grid (default: reject them)",
    )
    ingest_command.add_argument(
        "--validation-fraction",
        type=float,
        default=0.2,
        help="share of labelled cases in the validation split (default 0.2)",
    )
    _add_workers_argument(ingest_command)
    ingest_command.set_defaults(handler=run_ingest)

    harmonize = commands.add_parser(
        "harmonize",
        help="fit, apply or check intensity harmonization on ingested datasets",
        description="Intensity harmonization from aggregate statistics (see `fit`).",
    )
    actions = harmonize.add_subparsers(dest="action", required=True, metavar="ACTION")
    fit = actions.add_parser(
        "fit",
        help="fit an artifact from datasets, combined exactly as the federated job does",
        description="Compute each dataset's declared statistics separately and combine them "
        "exactly as the federated harmonization job does.",
    )
    fit.add_argument(
        "--dataset", type=Path, action="append", required=True, help="ingested dataset (repeat)"
    )
    fit.add_argument("--out", type=Path, required=True, help="artifact file to write")
    fit.add_argument("--method", choices=METHODS, help="default: nyul for MR, ct for CT")
    fit.add_argument(
        "--mask", choices=MASK_METHODS, default="brain", help="foreground mask (default brain)"
    )
    fit.add_argument(
        "--min-images",
        type=int,
        default=DEFAULT_MIN_IMAGES,
        help=f"fewest images per dataset (default {DEFAULT_MIN_IMAGES})",
    )
    fit.set_defaults(handler=run_harmonize_fit)
    apply = actions.add_parser("apply", help="write a dataset's images harmonized")
    apply.add_argument("--artifact", type=Path, required=True)
    apply.add_argument("--dataset", type=Path, required=True)
    apply.add_argument("--output", type=Path, required=True)
    apply.set_defaults(handler=run_harmonize_apply)
    check = actions.add_parser(
        "check", help="how far a dataset lies from the standard scale, per landmark"
    )
    check.add_argument("--artifact", type=Path, required=True)
    check.add_argument("--dataset", type=Path, required=True)
    check.set_defaults(handler=run_harmonize_check)
    export = actions.add_parser(
        "export",
        help="write the federated fit as a job folder for nvflare job submit / the admin console",
        description="Write the job that fits the run configuration's harmonization from the "
        "sites' declared statistics. Submit it, download its result once it finished, and pass "
        "that folder to `fedseg job export --harmonization`.",
    )
    export.add_argument("--config", required=True, help="run configuration YAML or profile")
    export.add_argument("--out", type=Path, required=True, help="folder to write the job into")
    export.add_argument(
        "--modality",
        choices=MODALITIES,
        help="the sites' modality (default: CT for the ct method, MR otherwise)",
    )
    export.add_argument(
        "--min-sites",
        type=int,
        help="fewest sites whose statistics make a fit (default: the "
        "configuration's training.min_sites)",
    )
    export.set_defaults(handler=run_harmonize_export)

    job = commands.add_parser(
        "job", help="run the federated segmentation job in the simulator, or export it"
    )
    job_actions = job.add_subparsers(dest="action", required=True, metavar="ACTION")
    job_run = job_actions.add_parser(
        "run",
        help="run FedAvg in NVFlare's simulator on ingested datasets",
        description="Run the segmentation job in NVFlare's simulator, one simulated site per "
        "--site dataset (site-1 is the first). Harmonization is fitted federatedly first when "
        "the configuration asks for it and no artifact is given.",
    )
    job_run.add_argument("--config", required=True, help="run configuration YAML or profile")
    job_run.add_argument(
        "--site", type=Path, action="append", required=True, help="ingested dataset (repeat)"
    )
    job_run.add_argument("--workdir", type=Path, required=True, help="where results go")
    job_run.add_argument("--harmonization", type=Path, help=HARMONIZATION_HELP)
    job_run.set_defaults(handler=run_job_command)
    job_export = job_actions.add_parser(
        "export", help="write the job folder for nvflare job submit / the admin console"
    )
    job_export.add_argument("--config", required=True, help="run configuration YAML or profile")
    job_export.add_argument(
        "--out", type=Path, required=True, help="folder to write the job folder into"
    )
    job_export.add_argument("--harmonization", type=Path, help=HARMONIZATION_HELP)
    _add_encryption_argument(job_export, default="packed")
    job_export.set_defaults(handler=export_job_command)
    job_submit = job_actions.add_parser(
        "submit",
        help="submit the job to a running federation, wait, download, write the reports",
        description="Export the segmentation job, submit it through the admin API "
        "(submit_job), wait for it with progress output, download its result (download_job) "
        "and write the reports. Harmonization is fitted first, as its own job in the same "
        "federation, when the configuration asks for it and no artifact is given.",
    )
    job_submit.add_argument("--config", required=True, help="run configuration YAML or profile")
    _add_workspace_argument(job_submit)
    job_submit.add_argument("--workdir", type=Path, required=True, help="where results go")
    job_submit.add_argument("--harmonization", type=Path, help=HARMONIZATION_HELP)
    _add_encryption_argument(job_submit, default=None)
    job_submit.set_defaults(handler=submit_job_command)
    job_resume = job_actions.add_parser(
        "resume",
        help="go on with an interrupted job from its last completed round",
        description="Resume a segmentation job that stopped (a server restart, too few sites) "
        "as a new job: it starts from the global model of the last completed round, trains "
        "the remaining rounds and reports every round of both jobs once. JOB is the job's "
        "folder in the server's workspace, or with --workspace the job id. With --workspace "
        "the new job is submitted, waited for and reported like `fedseg job submit`; with "
        "--site it runs in the simulator like `fedseg job run` (plaintext jobs); with --out "
        "its folder is written for `submit_job` in the admin console.",
    )
    job_resume.add_argument("job", help="the interrupted job's id or its server run folder")
    job_resume.add_argument("--workspace", type=Path, help="the running federation's workspace")
    job_resume.add_argument(
        "--site", type=Path, action="append", help="ingested dataset, to resume in the simulator"
    )
    job_resume.add_argument("--workdir", type=Path, help="where results go")
    job_resume.add_argument("--out", type=Path, help="write the job folder here instead")
    job_resume.set_defaults(handler=resume_job_command)
    job_rejoin = job_actions.add_parser(
        "rejoin",
        help="let sites that came back take part in a running job again",
        description="NVFlare 2.9 does not hand a running job to a site that was restarted. "
        "This aborts the running job (the round under way is trained again), and resumes it "
        "from its last completed round with every connected site, like `fedseg job resume`. "
        "Refused, before anything is aborted, when every connected site already takes part "
        "or the job could not be resumed.",
    )
    job_rejoin.add_argument("job", help="the running job's id")
    _add_workspace_argument(job_rejoin)
    job_rejoin.add_argument("--workdir", type=Path, required=True, help="where results go")
    job_rejoin.set_defaults(handler=rejoin_job_command)

    federation = commands.add_parser(
        "poc", help="a local federation: provision, start, stop, status"
    )
    poc_actions = federation.add_subparsers(dest="action", required=True, metavar="ACTION")
    prepare = poc_actions.add_parser(
        "prepare",
        help="provision server, sites and admin (HE contexts included)",
        description="Provision poc_workspace/project.yml for N sites into the workspace: "
        "signed startup kits, TenSEAL contexts for the chosen encryption, free ports. Never "
        "touches ~/.nvflare.",
    )
    _add_workspace_argument(prepare)
    prepare.add_argument("--sites", type=int, default=3, help="number of sites (default 3)")
    _add_encryption_argument(prepare, default="packed")
    prepare.add_argument(
        "--dataset",
        action="append",
        default=[],
        metavar="SITE=PATH",
        help="dataset of a site, written to its kit's local/fedseg_site.json (repeat)",
    )
    prepare.add_argument(
        "--dead-site-seconds",
        type=float,
        default=poc.DEAD_SITE_SECONDS,
        help="seconds without a heartbeat after which the server counts a site as gone "
        f"(default {poc.DEAD_SITE_SECONDS}; NVFlare's own default is 600)",
    )
    prepare.set_defaults(handler=poc_prepare_command)
    for name, handler, text in (
        ("start", poc_start_command, "start the server and the sites (or --participant)"),
        ("stop", poc_stop_command, "stop them: shutdown, then by their process ids"),
        ("status", poc_status_command, "which participants run and which sites are connected"),
    ):
        action = poc_actions.add_parser(name, help=text)
        _add_workspace_argument(action)
        if name != "status":
            action.add_argument(
                "--participant", action="append", help="server or a site name (repeat)"
            )
        action.set_defaults(handler=handler)

    demo = commands.add_parser(
        "demo",
        help="run the end-to-end demo on built-in simulated hospitals",
        description="Simulate three hospitals, verify them, ingest each into a dataset, "
        "provision and start a local federation with HE contexts, fit harmonization and train "
        "with FedAvg on encrypted updates through the admin API, download the results and "
        "write the reports.",
    )
    demo.add_argument("--config", default="demo", help="run configuration (default: demo)")
    demo.add_argument(
        "--workdir", type=Path, default=Path("demo_workdir"), help="where everything is written"
    )
    _add_workers_argument(demo)
    demo.set_defaults(handler=run_demo)
    return parser


def run_synth(args: argparse.Namespace) -> int:
    """Handles ``fedseg synth``."""
    config = SynthConfig(
        out=args.out,
        sites=args.sites,
        cases_per_site=args.cases_per_site,
        size=args.size,
        seed=args.seed,
    )
    sites = synthesize_with_progress(config, args.workers)
    console.print(site_table(sites))
    console.print(f"Wrote {sum(len(s.cases) for s in sites)} cases to {config.out}")
    if args.check:
        verify_with_report(config.out)
    return 0


def run_ingest(args: argparse.Namespace) -> int:
    """Handles ``fedseg ingest``."""
    options = IngestOptions(
        source=args.input,
        output=args.output,
        manifest=args.manifest,
        modality=args.modality,
        resample_gaps=args.resample_gaps,
        resample_tilt=args.resample_tilt,
        validation_fraction=args.validation_fraction,
        workers=args.workers,
    )
    report = ingest_with_progress(options)
    console.print(ingest_table(report))
    accepted = report.count(ACCEPTED)
    console.print(
        f"{accepted} accepted ({len(report.converted)} converted, {len(report.unchanged)} "
        f"unchanged), {report.count('rejected')} rejected, {report.count('skipped')} skipped; "
        f"details in {report.output / 'qc.json'}"
    )
    undeclared = sum(
        1
        for r in report.records
        if r["status"] == ACCEPTED and r["series_uid"] is None and not r["modality"]
    )
    if undeclared:
        console.print(
            f"{undeclared} accepted NIfTI volume(s) have no modality (NIfTI holds none): declare "
            "it with --modality MR|CT, which fedseg harmonize needs"
        )
    if accepted == 0:
        error_console.print(
            f"[bold red]fedseg ingest: no series accepted[/] from {args.input}; the reasons "
            f"are in {report.output / 'qc.json'}",
            highlight=False,
        )
        return 1
    return 0


def ingest_with_progress(options: IngestOptions) -> IngestReport:
    """Runs :func:`app_site.ingest.pipeline.ingest` behind a progress bar."""
    with _progress() as progress:
        tasks: dict[str, int] = {}

        def advance(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=done, total=total)

        return ingest(options, progress=advance)


def ingest_table(report: IngestReport) -> Table:
    """One row per QC record: what was found, what was decided and why."""
    table = Table(title=f"Ingestion into {report.output}")
    for header in ("case", "status", "modality", "shape", "spacing mm", "label", "reason / file"):
        table.add_column(header, overflow="fold")
    style = {"accepted": "green", "rejected": "red", "skipped": "yellow"}
    for record in report.records:
        where = record.get("file") or record.get("source") or ""
        reason = " - ".join(part for part in (record["reason"], where) if part)
        table.add_row(
            record.get("case_id") or "",
            f"[{style[record['status']]}]{record['status']}[/]",
            record.get("modality") or "",
            "x".join(str(n) for n in record.get("shape") or []),
            "x".join(f"{s:g}" for s in record.get("spacing") or [] if s is not None),
            "yes" if record.get("label") else "",
            reason,
        )
    return table


def run_harmonize_fit(args: argparse.Namespace) -> int:
    """Handles ``fedseg harmonize fit``."""
    check_distinct_datasets(args.dataset)
    modalities = {dataset_modality(dataset) for dataset in args.dataset}
    if len(modalities) != 1:
        raise HarmonizationError(f"datasets hold different modalities: {sorted(modalities)}")
    modality = modalities.pop()
    check_method_fits_modality(args.method or default_method(modality), modality)
    config = HarmonizationConfig(
        method=args.method or default_method(modality),
        mask_method=args.mask,
        min_images=args.min_images,
    )
    statistics = {}
    for dataset in args.dataset:
        name = _unique_name(dataset, statistics)
        statistics[name] = site_statistics(dataset, config)
    digest = write_artifact(combine_statistics(config, statistics, modality), args.out)
    console.print(
        f"Fitted {config.method} harmonization on {sum(s.image_count for s in statistics.values())}"
        f" images from {len(statistics)} dataset(s): {args.out} (hash {digest[:12]})"
    )
    return 0


def run_harmonize_apply(args: argparse.Namespace) -> int:
    """Handles ``fedseg harmonize apply``."""
    artifact = read_harmonization_artifact(args.artifact)
    written = apply_to_dataset(artifact, args.dataset, args.output)
    console.print(f"Wrote {len(written)} harmonized image(s) to {args.output}")
    return 0


def run_harmonize_check(args: argparse.Namespace) -> int:
    """Handles ``fedseg harmonize check``."""
    artifact = read_harmonization_artifact(args.artifact)
    table = Table(title=f"{args.dataset} against {args.artifact.name}")
    for header in ("percentile", "dataset mean", "standard", "deviation"):
        table.add_column(header, justify="right")
    for row in check_dataset(artifact, args.dataset):
        table.add_row(
            f"{row.percentile:g}",
            f"{row.site_mean:.2f}",
            f"{row.standard:.2f}",
            f"{row.deviation:+.2f}",
        )
    console.print(table)
    return 0


def _unique_name(dataset: Path, taken: dict) -> str:
    name, number = dataset.resolve().name, 2
    while name in taken:
        name, number = f"{dataset.resolve().name}-{number}", number + 1
    return name


def run_job_command(args: argparse.Namespace) -> int:
    """Handles ``fedseg job run``."""
    config = load_config(args.config)
    console.print(
        f"Running {config.training.rounds} round(s) of FedAvg on {len(args.site)} simulated "
        f"site(s) with {config.model.name}; logs under {args.workdir / 'simulation'}"
    )
    artifact = args.harmonization and resolve_artifact(args.harmonization)
    printer = _round_printer(config.training.rounds)
    report = run_job(config, args.site, args.workdir, artifact, printer)
    print_final_metrics(report)
    return 0


def run_harmonize_export(args: argparse.Namespace) -> int:
    """Handles ``fedseg harmonize export``."""
    config = load_config(args.config)
    modality = args.modality or ("CT" if config.harmonization.method == "ct" else "MR")
    if args.min_sites is not None and args.min_sites < 1:
        raise ValueError(f"--min-sites must be at least 1, got {args.min_sites}")
    folder = export_harmonization_job(config, args.out, modality, args.min_sites)
    console.print(
        f"Job folder written to {folder}; submit it with `submit_job {folder}` in the admin "
        "console, download its result when it finished, and pass that folder to `fedseg job "
        "export --harmonization`"
    )
    return 0


def export_job_command(args: argparse.Namespace) -> int:
    """Handles ``fedseg job export``."""
    artifact = args.harmonization and resolve_artifact(args.harmonization)
    folder = export_job(load_config(args.config), args.out, artifact, args.encryption)
    console.print(
        f"Job folder written to {folder}; submit it with `submit_job {folder}` in the admin "
        f"console, or `fedseg job submit`"
    )
    return 0


def submit_job_command(args: argparse.Namespace) -> int:
    """Handles ``fedseg job submit``."""
    federation = Federation(args.workspace.resolve())
    report = submit_with_progress(
        federation,
        load_config(args.config),
        args.workdir,
        args.harmonization and resolve_artifact(args.harmonization),
        args.encryption,
    )
    print_final_metrics(report)
    return 0


def resume_job_command(args: argparse.Namespace) -> int:
    """Handles ``fedseg job resume``."""
    chosen = [args.workspace is not None, bool(args.site), args.out is not None]
    if sum(chosen) != 1:
        raise ValueError(
            "give one of --workspace (a federation), --site (the simulator) or --out (export)"
        )
    run_folder = Path(args.job)
    if args.out is not None:
        folder, point = export_resumed_job(run_folder, args.out)
        console.print(
            f"Job folder written to {folder}: it resumes {point.job_id} at "
            f"{_resumed_at(point)}; submit it with `submit_job {folder}` in the admin console"
        )
        return 0
    if args.workdir is None:
        raise ValueError("--workdir is needed: where the results go")
    if args.site:
        printer = _round_printer(rounds=None)  # known once the run folder is read
        print_final_metrics(resume_job(run_folder, args.site, args.workdir, printer))
        return 0
    federation = Federation(args.workspace.resolve())
    if not run_folder.is_dir():
        run_folder = server_run_folder(federation, args.job)
    point = find_resume_point(run_folder)
    console.print(
        f"Resuming {point.job_id} at {_resumed_at(point)}, from the global model of round "
        f"{point.next_round}"
    )
    with console.status("waiting for the federation", spinner="dots"):
        report = resume_in_federation(
            federation, point, args.workdir, _progress_printer(point.config.training.rounds)
        )
    print_final_metrics(report)
    return 0


def _resumed_at(point: ResumePoint) -> str:
    """Where a resumed job starts, counting rounds from 1 as the command line does."""
    rounds = point.config.training.rounds
    if point.trains:
        return f"round {point.next_round + 1} of {rounds}"
    return f"its final validation (all {rounds} rounds were trained)"


def rejoin_job_command(args: argparse.Namespace) -> int:
    """Handles ``fedseg job rejoin``."""
    federation = Federation(args.workspace.resolve())
    console.print(f"Restarting job {args.job} with every connected site")
    with console.status("waiting for the federation", spinner="dots"):
        report, point, returning = rejoin_in_federation(
            federation, args.job, args.workdir, _progress_printer(None)
        )
    console.print(f"{', '.join(returning)} rejoined job {point.job_id} at {_resumed_at(point)}")
    print_final_metrics(report)
    return 0


def submit_with_progress(
    federation: Federation, config, workdir: Path, artifact: Path | None, encryption: str | None
) -> Path:
    """Runs :func:`run_in_federation`, printing each job's state as it changes."""
    on_poll = _progress_printer(config.training.rounds)
    with console.status("waiting for the federation", spinner="dots"):
        return run_in_federation(federation, config, workdir, artifact, encryption, on_poll)


def _progress_printer(rounds: int | None):
    """An ``on_poll`` callback printing each job's state (and round) when it changes.

    Args:
        rounds: The job's number of rounds, when known before it starts.
    """
    seen: dict[str, str] = {}

    def on_poll(name: str, meta: dict) -> None:
        state = meta.get("status", "?")
        progress = meta.get("progress")
        if progress:
            state += f", round {progress['round'] + 1}" + (f" of {rounds}" if rounds else "")
        if seen.get(name) != state:
            seen[name] = state
            console.print(f"  job {name} ({meta.get('job_id', '?')[:8]}): {state}")

    return on_poll


def _round_printer(rounds: int | None) -> Callable[[RoundProgress], None]:
    """An ``on_round`` callback printing each round that validated, and the last one.

    Rounds without validation (``validation.every_rounds``) pass silently, so a long run
    prints a line per validation, not per round.

    Args:
        rounds: The job's number of rounds, when known before it starts.
    """

    def on_round(progress: RoundProgress) -> None:
        last = rounds is not None and progress.round == rounds - 1
        if not (progress.dice or last):
            return
        dice = ", ".join(f"{site} {value:.3f}" for site, value in progress.dice.items())
        console.print(
            f"  round {progress.round + 1}"
            + (f" of {rounds}" if rounds else "")
            + f": {len(progress.sites)} site(s)"
            + (f"; mean Dice of the global model it started from: {dice}" if dice else "")
        )

    return on_round


def print_final_metrics(report: Path) -> None:
    """Each site's summary (the final global model's validation), and where the reports are."""
    federation = json.loads((report / f"{FEDERATION}.json").read_text())
    table = Table(title="Validation at the end of training at each site")
    for header in ("site", "model", "device", "Dice TC", "Dice WT", "Dice ET", "HD95 WT mm"):
        table.add_column(header)
    for site, summary in federation["summary"].items():
        metrics = summary["metrics"] or {}
        table.add_row(
            site,
            summary["model"] or "none validated",
            federation["devices"][site],
            *(format_number(metrics.get(f"dice_{r}"), 3) for r in ("TC", "WT", "ET")),
            format_number(metrics.get("hd95_WT"), 1),
        )
    console.print(table)
    console.print(f"Reports: {report / 'federation.html'} and one page per site in {report}")


def poc_prepare_command(args: argparse.Namespace) -> int:
    """Handles ``fedseg poc prepare``."""
    datasets = {}
    for item in args.dataset:
        site, separator, path = item.partition("=")
        if not separator:
            raise ValueError(f"--dataset {item}: expected SITE=PATH")
        datasets[site] = Path(path)
    federation = poc.prepare(
        args.workspace,
        args.sites,
        args.encryption,
        datasets,
        dead_site_seconds=args.dead_site_seconds,
    )
    console.print(
        f"Provisioned {len(federation.sites)} sites ({args.encryption} encryption) in "
        f"{federation.kits}; start it with fedseg poc start --workspace {args.workspace}"
    )
    return 0


def poc_start_command(args: argparse.Namespace) -> int:
    """Handles ``fedseg poc start``."""
    federation = Federation(args.workspace.resolve())
    poc.start(federation, args.participant)
    console.print(f"Running: {', '.join(poc.running_processes(federation))}")
    return 0


def poc_stop_command(args: argparse.Namespace) -> int:
    """Handles ``fedseg poc stop``."""
    stopped = poc.stop(Federation(args.workspace.resolve()), args.participant)
    console.print(f"Stopped: {', '.join(stopped) or 'nothing was running'}")
    return 0


def poc_status_command(args: argparse.Namespace) -> int:
    """Handles ``fedseg poc status``."""
    state = poc.status(Federation(args.workspace.resolve()))
    table = Table(title=f"Federation in {state['workspace']} ({state['encryption']} encryption)")
    for header in ("participant", "process id", "connected"):
        table.add_column(header)
    for name, pid in state["processes"].items():
        connected = "-" if name == "server" else str(name in state["connected_sites"])
        table.add_row(name, str(pid or "not running"), connected)
    console.print(table)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """Handles ``fedseg demo``."""
    run_config = load_config(args.config)  # a bad configuration fails before any work
    hospitals = args.workdir / "hospitals"
    config = SynthConfig(out=hospitals, sites=3, cases_per_site=4, size=64)
    console.rule("1/5  Simulating three hospitals")
    sites = synthesize_with_progress(config, args.workers)
    console.print(site_table(sites))
    console.rule("2/5  Verifying every series with SimpleITK")
    verify_with_report(config.out)
    console.rule("3/5  Ingesting each hospital's DICOM folder")
    summary = Table(title="Site datasets")
    for header in ("site", "accepted", "rejected", "skipped", "dataset"):
        summary.add_column(header)
    datasets = []
    for site in sites:
        options = IngestOptions(
            source=hospitals / site.name / "dicom",
            output=args.workdir / "datasets" / site.name,
            manifest=hospitals / site.name / "manifest.csv",
            workers=args.workers,
        )
        report = ingest_with_progress(options)
        if report.count(ACCEPTED) == 0:
            raise ValueError(f"{site.name}: no series accepted; see {options.output / 'qc.json'}")
        summary.add_row(
            site.name,
            str(report.count(ACCEPTED)),
            str(report.count("rejected")),
            str(report.count("skipped")),
            str(options.output),
        )
        datasets.append(options.output)
    console.print(summary)
    console.rule("4/5  Provisioning and starting a local federation with HE contexts")
    workspace = args.workdir / "federation"
    names = {site.name: dataset for site, dataset in zip(sites, datasets, strict=True)}
    federation = poc.prepare(workspace, len(datasets), "packed", names)
    poc.start(federation)
    console.print(
        f"Server and {len(federation.sites)} sites running from the startup kits in "
        f"{federation.kits}; each site reads its dataset from its kit's local folder"
    )
    try:
        console.rule("5/5  Harmonization fit, then FedAvg on encrypted updates (admin API)")
        console.print(
            f"{run_config.training.rounds} rounds of {run_config.model.name}; every update is "
            "encrypted at its site, the server adds ciphertexts it cannot decrypt"
        )
        report = submit_with_progress(federation, run_config, args.workdir / "job", None, None)
    finally:
        poc.stop(federation)
    print_final_metrics(report)
    return 0


def synthesize_with_progress(config: SynthConfig, workers: int) -> list[SiteSummary]:
    """Runs :func:`synthesize_hospitals` behind a progress bar."""
    with _progress() as progress:
        task = progress.add_task("synthesizing cases", total=None)

        def advance(_: CaseSummary) -> None:
            progress.advance(task)

        return synthesize_hospitals(config, workers=workers, on_case_done=advance)


def verify_with_report(out: Path) -> list[CaseCheck]:
    """Runs :func:`check_hospitals` and prints what it found."""
    checks = check_hospitals(out)
    worst = max(check.max_geometry_error_mm for check in checks)
    console.print(
        f"[green]OK[/]: {len(checks)} series read back with SimpleITK; geometry matches the "
        f"labels within {worst:.1e} mm; labels hold tumour values only"
    )
    return checks


def site_table(sites: Sequence[SiteSummary]) -> Table:
    """A table of the generated sites: scanner, protocol, cases, tumour sizes, intensities."""
    table = Table(title="Simulated hospitals")
    for header in ("site", "scanner", "field", "plane", "matrix", "spacing mm", "storage"):
        table.add_column(header)
    for header in ("cases", "tumour ml (median)", "white matter mean"):
        table.add_column(header, justify="right")
    for site in sites:
        scanner = site.profile.scanner
        plane = scanner.orientation + (" oblique" if scanner.tilt else "")
        first = site.cases[0]
        tumour_ml = sorted(case.tumour_volume_ml for case in site.cases)[len(site.cases) // 2]
        white_matter = sum(case.white_matter_mean for case in site.cases) / len(site.cases)
        table.add_row(
            site.name,
            f"{scanner.manufacturer} {scanner.model_name}",
            f"{scanner.field_strength_t:g} T",
            plane,
            "x".join(str(n) for n in first.shape),
            "x".join(f"{s:g}" for s in first.spacing),
            scanner.storage,
            str(len(site.cases)),
            f"{tumour_ml:.1f}",
            f"{white_matter:.4g}",
        )
    return table


def _progress() -> Progress:
    """A progress bar that disappears when done (and prints nothing in a CI log)."""
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def _add_workspace_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workspace",
        type=Path,
        default=DEFAULT_FEDERATION,
        help=f"the federation's folder (default {DEFAULT_FEDERATION})",
    )


def _add_encryption_argument(parser: argparse.ArgumentParser, default: str | None) -> None:
    parser.add_argument(
        "--encryption",
        choices=ENCRYPTION_MODES,
        default=default,
        help="how updates travel: packed CKKS (fedseg's), stock (NVFlare's HE filters) or none "
        + (f"(default {default})" if default else "(default: what the federation provisioned)"),
    )


def _add_workers_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="worker processes (default: number of CPUs)",
    )


if __name__ == "__main__":
    sys.exit(main())
