"""FedAvg's gap to centralized training against its schedule, at one compute budget.

The same data, harmonization, initial weights and budget as ``benchmarks/quality.py``'s
harmonized arm (3 x R x S optimizer steps in all). Centralized training is run once; FedAvg
once per schedule R x S (rounds x local steps) with R x S fixed, so that only how often the
sites' models are averaged changes. Each model is evaluated on every training site's
validation split; the gap is centralized minus FedAvg Dice per region, with the paired
standard error over the site's validation cases (quality goal 1: at most 0.02).

Usage: python benchmarks/quality_schedule.py [--schedules 40x50,80x25,200x10] [--cases N]
    [--size S] [--seed K] [--workspace DIR] [--quick]
Writes benchmarks/results/quality_schedule.json and benchmarks/quality_schedule.md (not with
--quick).
"""

from __future__ import annotations

import argparse
import json
import time

from quality import (
    GOAL_GAP,
    HERE,
    TRAINING_SITES,
    add_data_arguments,
    evaluate,
    fedavg_gaps,
    gap_cells,
    harmonized_arm,
    largest_gap,
    log,
    machine,
    run_config,
    scratch_folder,
    train_engine,
    train_fedavg,
)

from fedseg.files import write_json_atomic, write_text_atomic


def parse_schedules(text: str) -> list[tuple[int, int]]:
    """``"40x50,80x25"`` -> ``[(40, 50), (80, 25)]``; every schedule must have the same R x S."""
    schedules = [tuple(int(n) for n in item.split("x")) for item in text.split(",")]
    if len({rounds * steps for rounds, steps in schedules}) != 1:
        raise SystemExit(f"--schedules {text}: every R x S must be the same budget")
    return schedules


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedules", default="40x50,80x25,200x10", help="R x S, same budget")
    add_data_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="smoke test: 2x10 and 4x5, tiny data")
    args = parser.parse_args()
    if args.quick:
        args.schedules, args.cases, args.size = "2x10,4x5", 6, 48
    schedules = parse_schedules(args.schedules)

    began = time.perf_counter()
    with scratch_folder(args.workspace, "schedule-") as root:
        config = run_config(*schedules[0], "nyul")
        arm = harmonized_arm(root, args, config)
        budget = 3 * schedules[0][0] * schedules[0][1]
        central, central_record = train_engine(config, arm.pooled, arm.transform, budget, arm.start)
        log(f"centralized: {budget} steps in {central_record['seconds']} s")
        centralized = evaluate(central, arm.engines)
        runs = []
        for rounds, steps in schedules:
            schedule_config = run_config(rounds, steps, "nyul")
            weights, record = train_fedavg(
                schedule_config,
                arm.datasets,
                arm.artifact,
                root / f"fedavg-{rounds}x{steps}",
                arm.start,
            )
            evaluation = {"centralized": centralized, "fedavg": evaluate(weights, arm.engines)}
            gaps = fedavg_gaps({"evaluation": evaluation})
            worst = largest_gap(gaps)
            log(f"fedavg {rounds}x{steps}: {record['seconds']} s, largest gap {worst:+.3f}")
            runs.append({
                "rounds": rounds, "local_steps": steps, "seconds": record["seconds"],
                "steps": record["steps"], "same_initial_model": record["same_initial_model"],
                "gaps": gaps, "largest_gap": worst, "within_goal": worst <= GOAL_GAP,
            })  # fmt: skip
    summary = {
        "benchmark": "quality_schedule",
        "synth": {"sites": 4, "cases_per_site": args.cases, "size": args.size, "seed": args.seed},
        "budget_steps": budget,
        "shared_moments": config.training.shared_moments,
        "centralized": {"seconds": central_record["seconds"], "steps": central_record["steps"]},
        "schedules": runs,
        "seconds_total": round(time.perf_counter() - began, 1),
        "machine": machine(),
    }
    if not args.quick:
        (HERE / "results").mkdir(exist_ok=True)
        results = HERE / "results" / "quality_schedule.json"
        write_json_atomic(results, summary)
        write_text_atomic(HERE / "quality_schedule.md", _markdown(summary))
    print(json.dumps({k: v for k, v in summary.items() if k != "schedules"}))


def _markdown(summary: dict) -> str:
    rows = "\n".join(
        f"| {run['rounds']} x {run['local_steps']} | {site} | {gap_cells(run['gaps'], site)} | "
        f"{run['seconds'] / 60:.1f} |"
        for run in summary["schedules"]
        for site in TRAINING_SITES
    )
    largest = ", ".join(
        f"{run['rounds']} x {run['local_steps']}: {run['largest_gap']:+.3f}"
        for run in summary["schedules"]
    )
    machine = summary["machine"]
    moments = (  # results from before the option ran with each site's own
        "sharing their AdamW second moments (`training.shared_moments`)"
        if summary.get("shared_moments")
        else "each keeping their own AdamW moments"
    )
    return f"""# FedAvg's gap to centralized training against its schedule

Command: `python benchmarks/quality_schedule.py` (results: \
`benchmarks/results/quality_schedule.json`). Machine: {machine["cpus"]} CPUs, torch \
{machine["torch"]}, MONAI {machine["monai"]}, NVFlare {machine["nvflare"]}. Whole run: \
{summary["seconds_total"] / 60:.1f} min.

The harmonized arm of `benchmarks/quality.py` (same synthetic hospitals, seed \
{summary["synth"]["seed"]}, Nyúl artifact, initial weights and model): centralized training \
once, {summary["budget_steps"]} steps on the pooled training cases \
({summary["centralized"]["seconds"]} s); FedAvg in NVFlare's simulator at each schedule R x S \
(rounds x local steps per site), always {summary["budget_steps"]} steps in all, the sites \
{moments}. Gap: \
centralized minus FedAvg Dice on each training site's validation split, ± the paired standard \
error over its cases. Goal 1 of the quality benchmark asks for every gap at most {GOAL_GAP}.

| R x S | site | WT gap | TC gap | ET gap | FedAvg minutes |
| --- | --- | ---: | ---: | ---: | ---: |
{rows}

Largest gap per schedule: {largest}.
"""


if __name__ == "__main__":
    main()
