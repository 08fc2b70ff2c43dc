"""Round time of the segmentation job against how often sites ask for their next task.

A site that sent its result waits ``federation.task_request_interval`` seconds before asking
the server for its next task (NVFlare's default: 2 s). The plaintext FedAvg job runs in
NVFlare's simulator on three synthetic hospitals (``fedseg synth`` + ``fedseg ingest``), no
harmonization, at NVFlare's default (the baseline) and at the ``tiny`` profile's interval,
for each schedule R x S (rounds x local steps): 1 step per round shows the overhead alone, 20
steps the quality benchmark's schedule. Recorded per run: the job's wall time, the median time
between a site's consecutive rounds (from the sites' reports) and whether the final global
model is the same bit for bit as the baseline's (the interval decides only when sites ask).

Usage: python benchmarks/task_interval.py [--schedules 20x1,20x20] [--cases N] [--size S]
    [--workspace DIR] [--quick]
Writes benchmarks/results/task_interval.json and benchmarks/task_interval.md (not with
--quick).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from quality import (
    HERE,
    TRAINING_SITES,
    build_datasets,
    log,
    machine,
    run_config,
    scratch_folder,
)

from fedseg.config import FederationConfig, load_config
from fedseg.files import write_json_atomic, write_text_atomic
from jobs.runner import run_job

BASELINE_INTERVAL = FederationConfig().task_request_interval
PROFILE_INTERVAL = load_config("tiny").federation.task_request_interval
#: Share of each site's cases its sites validate on (what the recorded results were measured with).
VALIDATION_FRACTION = 0.25


def round_seconds(report: Path) -> float:
    """Median over the sites of the median time between their consecutive round reports."""
    per_site = []
    for site in TRAINING_SITES:
        rounds = json.loads((report / f"{site}.json").read_text())["rounds"]
        received = [entry["received_at"] for entry in rounds]
        per_site.append(statistics.median(b - a for a, b in itertools.pairwise(received)))
    return statistics.median(per_site)


def global_model_digest(workdir: Path) -> str:
    """SHA-256 over the final global model's tensors, in key order."""
    (model_file,) = (workdir / "simulation").rglob("app_server/FL_global_model.pt")
    state = torch.load(model_file, map_location="cpu", weights_only=True)
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].numpy().tobytes())
    return digest.hexdigest()


def run_schedule(root: Path, datasets: dict[str, Path], rounds: int, steps: int) -> dict:
    """The job at the baseline interval and at the profile's, one schedule."""
    runs = {}
    for interval in (BASELINE_INTERVAL, PROFILE_INTERVAL):
        config = run_config(rounds, steps, "none")
        config = replace(
            config, federation=replace(config.federation, task_request_interval=interval)
        )
        workdir = root / f"{rounds}x{steps}-{interval}"
        began = time.perf_counter()
        report = run_job(config, [datasets[site] for site in TRAINING_SITES], workdir, None)
        seconds = time.perf_counter() - began
        runs[str(interval)] = {
            "task_request_interval": interval,
            "seconds": round(seconds, 1),
            "round_seconds": round(round_seconds(report), 2),
            "global_model_sha256": global_model_digest(workdir),
        }
        log(f"{rounds}x{steps} at {interval} s: {seconds:.1f} s")
    baseline, profile = runs[str(BASELINE_INTERVAL)], runs[str(PROFILE_INTERVAL)]
    return {
        "rounds": rounds,
        "local_steps": steps,
        "runs": list(runs.values()),
        "speedup": round(baseline["seconds"] / profile["seconds"], 2),
        "round_speedup": round(baseline["round_seconds"] / profile["round_seconds"], 2),
        "same_global_model": baseline["global_model_sha256"] == profile["global_model_sha256"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedules", default="20x1,20x20", help="R x S (default 20x1,20x20)")
    parser.add_argument("--cases", type=int, default=6, help="average cases per site")
    parser.add_argument("--size", type=int, default=48, help="synth matrix size (default 48)")
    parser.add_argument("--workspace", type=Path, default=Path("/tmp/task-interval-bench"))
    parser.add_argument("--quick", action="store_true", help="smoke test: 3 rounds of 1 step")
    args = parser.parse_args()
    if args.quick:
        args.schedules = "3x1"
    schedules = [tuple(int(n) for n in item.split("x")) for item in args.schedules.split(",")]

    began = time.perf_counter()
    with scratch_folder(args.workspace, "interval-") as root:
        datasets = build_datasets(root, args.cases, args.size, 0, VALIDATION_FRACTION)
        results = [run_schedule(root, datasets, rounds, steps) for rounds, steps in schedules]
    summary = {
        "benchmark": "task_interval",
        "synth": {"sites": 4, "cases_per_site": args.cases, "size": args.size, "seed": 0},
        "baseline_interval": BASELINE_INTERVAL,
        "profile_interval": PROFILE_INTERVAL,
        "schedules": results,
        "seconds_total": round(time.perf_counter() - began, 1),
        "machine": machine(),
    }
    if not args.quick:
        (HERE / "results").mkdir(exist_ok=True)
        results_file = HERE / "results" / "task_interval.json"
        write_json_atomic(results_file, summary)
        write_text_atomic(HERE / "task_interval.md", _markdown(summary))
    print(json.dumps(summary, indent=2))


def _markdown(summary: dict) -> str:
    rows = "\n".join(
        f"| {s['rounds']} x {s['local_steps']} | {run['task_request_interval']} | "
        f"{run['seconds']} | {run['round_seconds']} | "
        f"{'yes' if s['same_global_model'] else 'no'} |"
        for s in summary["schedules"]
        for run in s["runs"]
    )
    ratios = "; ".join(
        f"{s['rounds']} x {s['local_steps']}: job {s['speedup']}x, round {s['round_speedup']}x"
        for s in summary["schedules"]
    )
    machine = summary["machine"]
    return f"""# Round time against the sites' task request interval

Command: `python benchmarks/task_interval.py` (results: \
`benchmarks/results/task_interval.json`). Machine: {machine["cpus"]} CPUs, torch \
{machine["torch"]}, NVFlare {machine["nvflare"]}. Whole run: \
{summary["seconds_total"] / 60:.1f} min.

The plaintext FedAvg job in NVFlare's simulator, three synthetic hospitals \
({summary["synth"]["cases_per_site"]} cases per site on average, \
{summary["synth"]["size"]}³ matrix), the `tiny` network on the CPU, no harmonization. A site \
that sent its result waits `federation.task_request_interval` seconds before asking for its \
next task: NVFlare's default, {summary["baseline_interval"]} s (the baseline), against the \
`tiny` and `demo` profiles' {summary["profile_interval"]} s. Round: median time between a \
site's consecutive round reports. Same model: the final global model is identical bit for \
bit to the baseline's.

| R x S | interval (s) | job (s) | round (s) | same model |
| --- | ---: | ---: | ---: | --- |
{rows}

Baseline time over profile time: {ratios}.
"""


if __name__ == "__main__":
    main()
