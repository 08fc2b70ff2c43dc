"""Round time of a long segmentation job: this checkout against a baseline commit, same run.

A job of many short rounds shows what each round costs beyond training: the server's work
between the last site's result and the next round's task (aggregation, the site reports it
keeps, persisting the global model, memory clean-up) and the sites' waiting. Some of it grows
with the job: the server's report of every round is a document that grows by one entry per
site per round. The plaintext FedAvg job runs in NVFlare's simulator on the quality
benchmark's synthetic hospitals (three training sites, ``tiny`` network on the CPU,
validation every 10 rounds, no harmonization), once with the code of ``--baseline`` (a git
commit, exported to a scratch folder and put first on ``PYTHONPATH``) and once with this
checkout, with the same data and configuration. Recorded per run: the job's wall time, the
median round time over the first and the last tenth of the rounds (time between a site's
consecutive round reports, median over the sites), the size of the server's report file and a
digest of the final global model, which must be the same bit for bit (only the cost of a
round may change).

Usage: python benchmarks/round_overhead.py [--rounds R] [--local-steps S] [--baseline REF]
    [--cases N] [--size S] [--workspace DIR] [--quick]
Writes benchmarks/results/round_overhead.json and benchmarks/round_overhead.md (not with
--quick).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from itertools import pairwise
from pathlib import Path

import yaml
from quality import (
    HERE,
    TRAINING_SITES,
    VALIDATION_FRACTION,
    build_datasets,
    log,
    machine,
    run_config,
    scratch_folder,
    source_commit,
)
from task_interval import global_model_digest

from app_server.site_reports import SITE_REPORTS_FILE
from fedseg.files import write_json_atomic, write_text_atomic

#: The last commit before the server wrote its site reports once per round, compactly, and
#: cleaned its memory every few rounds instead of every round.
DEFAULT_BASELINE = "3d5562b1cd12c97e89141a44b20911dd0a633e69"
#: Runs the job from the source tree on PYTHONPATH: config file, work folder, datasets.
RUN_JOB = (
    "import sys; from pathlib import Path; from fedseg.config import load_config; "
    "from jobs.runner import run_job; "
    "run_job(load_config(sys.argv[1]), [Path(p) for p in sys.argv[3:]], Path(sys.argv[2]))"
)


def export_commit(reference: str, folder: Path) -> str:
    """Writes the whole tree of git commit ``reference`` into ``folder``; returns its hash."""
    repository = HERE.parent  # git archive run in a subfolder would export that folder only
    commit = subprocess.run(
        ["git", "rev-parse", "--verify", f"{reference}^{{commit}}"],
        cwd=repository,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    archive = subprocess.run(
        ["git", "archive", commit], cwd=repository, capture_output=True, check=True
    )
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(folder, filter="data")
    return commit


def round_times(reports_file: Path) -> dict[str, float]:
    """Median round time over the first and the last tenth of the rounds (median over sites)."""
    content = json.loads(reports_file.read_text())
    first, last = [], []
    for site in TRAINING_SITES:
        received = [entry["received_at"] for entry in content["sites"][site]["rounds"]]
        gaps = [b - a for a, b in pairwise(received)]
        tenth = max(1, len(gaps) // 10)
        first.append(statistics.median(gaps[:tenth]))
        last.append(statistics.median(gaps[-tenth:]))
    return {"first_tenth": statistics.median(first), "last_tenth": statistics.median(last)}


def run_with_source(
    source: Path, config_file: Path, workdir: Path, datasets: dict[str, Path]
) -> dict:
    """Runs the job with the code in ``source`` in a process of its own; what it cost."""
    environment = {**os.environ, "PYTHONPATH": str(source)}  # before the installed checkout
    began = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-c",
            RUN_JOB,
            str(config_file),
            str(workdir),
            *(str(datasets[s]) for s in TRAINING_SITES),
        ],
        cwd=source,
        env=environment,
        check=True,
    )
    seconds = time.perf_counter() - began
    (reports_file,) = (workdir / "simulation").rglob(SITE_REPORTS_FILE)
    times = round_times(reports_file)
    return {
        "seconds": round(seconds, 1),
        "round_seconds_first_tenth": round(times["first_tenth"], 3),
        "round_seconds_last_tenth": round(times["last_tenth"], 3),
        "site_reports_bytes": reports_file.stat().st_size,
        "global_model_sha256": global_model_digest(workdir),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=600, help="rounds R (default 600)")
    parser.add_argument("--local-steps", type=int, default=1, help="steps per round (default 1)")
    parser.add_argument(
        "--baseline", default=DEFAULT_BASELINE, help="git commit to compare with (default: "
        "the last one before the server's per-round work was cut)",
    )  # fmt: skip
    parser.add_argument("--cases", type=int, default=40, help="average cases per site (default 40)")
    parser.add_argument("--size", type=int, default=64, help="synth matrix size (default 64)")
    parser.add_argument("--workspace", type=Path, default=Path("/tmp/round-overhead-bench"))
    parser.add_argument("--quick", action="store_true", help="smoke test: 20 rounds, small data")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.cases, args.size = 20, 6, 48

    began = time.perf_counter()
    with scratch_folder(args.workspace, "overhead-") as root:
        datasets = build_datasets(root, args.cases, args.size, 0, VALIDATION_FRACTION)
        config = run_config(args.rounds, args.local_steps, "none")
        config_file = root / "run.yaml"
        config_file.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        baseline_source = Path(tempfile.mkdtemp(prefix="baseline-", dir=root))
        baseline_commit = export_commit(args.baseline, baseline_source)
        runs = {}
        for name, source in (("baseline", baseline_source), ("current", HERE.parent)):
            log(f"{name}: {args.rounds} x {args.local_steps}")
            runs[name] = run_with_source(source, config_file, root / name, datasets)
            log(f"{name}: {runs[name]['seconds']} s")
    baseline, current = runs["baseline"], runs["current"]
    summary = {
        "benchmark": "round_overhead",
        "synth": {"sites": 4, "cases_per_site": args.cases, "size": args.size, "seed": 0},
        "validation_fraction": VALIDATION_FRACTION,
        "rounds": args.rounds,
        "local_steps": args.local_steps,
        "baseline_commit": baseline_commit,
        "current_commit": source_commit(),
        "runs": runs,
        "job_speedup": round(baseline["seconds"] / current["seconds"], 2),
        "last_round_speedup": round(
            baseline["round_seconds_last_tenth"] / current["round_seconds_last_tenth"], 2
        ),
        "same_global_model": baseline["global_model_sha256"] == current["global_model_sha256"],
        "seconds_total": round(time.perf_counter() - began, 1),
        "machine": machine(),
    }
    if not args.quick:
        (HERE / "results").mkdir(exist_ok=True)
        write_json_atomic(HERE / "results" / "round_overhead.json", summary)
        write_text_atomic(HERE / "round_overhead.md", _markdown(summary))
    print(json.dumps(summary, indent=2))
    if not summary["same_global_model"]:
        raise SystemExit("the final global models differ: the change altered training")


def _markdown(summary: dict) -> str:
    rows = "\n".join(
        f"| {name} (`{commit[:10]}`) | {run['seconds']} | {run['round_seconds_first_tenth']} | "
        f"{run['round_seconds_last_tenth']} | {run['site_reports_bytes'] / 1e6:.2f} |"
        for name, run, commit in (
            ("baseline", summary["runs"]["baseline"], summary["baseline_commit"]),
            ("current", summary["runs"]["current"], summary["current_commit"] or "unknown"),
        )
    )
    machine = summary["machine"]
    same = "yes" if summary["same_global_model"] else "**no**"
    return f"""# Round time of a long job, before and after the server's per-round work was cut

Command: `python benchmarks/round_overhead.py` (results: \
`benchmarks/results/round_overhead.json`). Machine: {machine["cpus"]} CPUs, torch \
{machine["torch"]}, NVFlare {machine["nvflare"]}. Whole run: \
{summary["seconds_total"] / 60:.1f} min.

The plaintext FedAvg job in NVFlare's simulator, {summary["rounds"]} rounds of \
{summary["local_steps"]} step, on the quality benchmark's three training hospitals \
({summary["synth"]["cases_per_site"]} cases per site on average, {summary["synth"]["size"]}³ \
matrix, {summary["validation_fraction"]:.0%} of each site's cases validated every 10 rounds), \
the `tiny` network on the CPU, no harmonization: once with the baseline commit's code, once \
with this checkout's. Round: median time between a site's consecutive round reports over the \
first and the last tenth of the rounds. Reports: the server's `fedseg_site_reports.json` at \
the end.

| code | job (s) | round, first tenth (s) | round, last tenth (s) | reports (MB) |
| --- | ---: | ---: | ---: | ---: |
{rows}

Baseline over current: job {summary["job_speedup"]}x, last tenth's round \
{summary["last_round_speedup"]}x. Same final global model, bit for bit: {same}.
"""


if __name__ == "__main__":
    main()
