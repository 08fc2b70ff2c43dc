"""Why FedAvg trails centralized training here: federated optimizers compared in one process.

Quality goal 1 (FedAvg within 0.02 Dice of centralized training on every site) is not met by
the job's FedAvg (``benchmarks/quality.md``, ``benchmarks/quality_schedule.md``). This
benchmark separates the causes by running variants of the federated optimization at the same
budget as ``benchmarks/quality.py``'s harmonized arm (same synthetic hospitals, Nyúl artifact,
initial weights, network, AdamW and learning-rate schedule):

- ``fedavg``: what the job does. Each site keeps its optimizer (AdamW moments) from round to
  round, trains S steps from the global model, and the global model moves by the mean of the
  sites' weight differences (the aggregator's step-weighted mean; every site makes S steps).
- ``fresh``: the same, with every site's optimizer state cleared at the start of each round.
- ``scaffold``: control variates against client drift (Karimireddy et al., 2020): every
  gradient a site computes is corrected by the federation's mean gradient of the previous round
  minus the site's own, before AdamW sees it.
- ``shared_moments``: at the start of each round every site's AdamW second-moment estimate is
  replaced by the sites' mean, so that all sites scale their steps alike (what the job does).

A run may also give a server learning rate: the global model then moves by that multiple of
the sites' mean weight difference (FedAvg with server SGD, Reddi et al., 2021), which makes up
for the sites' steps being averaged rather than added when their directions agree.

The sites run as :class:`app_site.engine.SegmentationEngine` objects in this process and are
averaged here, not through NVFlare: this benchmark compares optimization algorithms, and its
``fedavg`` rows are checked against the NVFlare runs of ``benchmarks/quality_schedule.py`` at
the same schedules (same algorithm; the sites' random streams differ, so the numbers agree
only to within run-to-run noise). Centralized training is also run with a third of the budget
(as many sequential steps as each FedAvg site makes), to tell fewer sequential steps apart from
the sites' differences.

Usage: python benchmarks/quality_algorithms.py [--runs fedavg:40x50,scaffold:200x10:2,...]
    [--cases N] [--size S] [--seed K] [--workspace DIR] [--quick]
Writes benchmarks/results/quality_algorithms.json and benchmarks/quality_algorithms.md (not
with --quick).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Transform
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
)

from app_site.engine import SegmentationEngine
from fedseg.config import RunConfig

ALGORITHMS = ("fedavg", "fresh", "scaffold", "shared_moments")
DEFAULT_RUNS = "shared_moments:300x20,shared_moments:300x20:2,shared_moments:300x20:3"
Weights = dict[str, np.ndarray]


def parse_runs(text: str) -> list[tuple[str, int, int, float]]:
    """``"fedavg:40x50,scaffold:200x10:2"`` -> ``[("fedavg", 40, 50, 1), ("scaffold", ..., 2)]``.

    The optional third field is the server learning rate (1 without it).

    Raises:
        SystemExit: On an unknown algorithm, a malformed run or runs of different budgets (R x S).
    """
    runs = []
    for item in text.split(","):
        algorithm, schedule, *server_lr = item.split(":")
        if algorithm not in ALGORITHMS:
            raise SystemExit(f"--runs {item}: unknown algorithm; choose from {ALGORITHMS}")
        if len(server_lr) > 1:
            raise SystemExit(f"--runs {item}: expected algorithm:RxS[:server_lr]")
        rounds, steps = (int(n) for n in schedule.split("x"))
        runs.append((algorithm, rounds, steps, float(server_lr[0]) if server_lr else 1.0))
    if len({rounds * steps for _, rounds, steps, _ in runs}) != 1:
        raise SystemExit(f"--runs {text}: every R x S must be the same budget")
    return runs


@contextlib.contextmanager
def corrected_gradients(
    engine: SegmentationEngine, correction: dict[str, torch.Tensor] | None
) -> Iterator[dict[str, torch.Tensor]]:
    """Adds ``correction`` to every gradient of ``engine``'s network while the block runs.

    Yields:
        The sum of the uncorrected gradients per parameter, filled as the block trains.
    """
    sums = {name: torch.zeros_like(p) for name, p in engine.model.named_parameters()}

    def hook(name: str):
        def correct(gradient: torch.Tensor) -> torch.Tensor:
            sums[name] += gradient
            return gradient if correction is None else gradient + correction[name]

        return correct

    handles = [p.register_hook(hook(name)) for name, p in engine.model.named_parameters()]
    try:
        yield sums
    finally:
        for handle in handles:
            handle.remove()


def share_second_moments(engines: list[SegmentationEngine]) -> None:
    """Sets every site's AdamW second-moment estimates to the sites' mean (none before step 1)."""
    parameter_states = zip(
        *([engine.optimizer.state[p] for p in engine.model.parameters()] for engine in engines),
        strict=True,
    )
    for states in parameter_states:
        if "exp_avg_sq" in states[0]:
            mean = sum(state["exp_avg_sq"] for state in states) / len(states)
            for state in states:
                state["exp_avg_sq"].copy_(mean)


def train_federated(
    config: RunConfig,
    datasets: dict[str, Path],
    transform: Transform | None,
    start: Weights,
    algorithm: str,
    server_lr: float = 1.0,
) -> Weights:
    """Runs one federated algorithm over the training sites in this process.

    The global model moves by ``server_lr`` times the sites' mean weight difference.

    Returns:
        The final global model.
    """
    training = config.training
    engines = [SegmentationEngine(config, datasets[site], transform) for site in TRAINING_SITES]
    model = {key: value.copy() for key, value in start.items()}
    own_gradients: list[dict[str, torch.Tensor] | None] = [None] * len(engines)
    mean_gradient: dict[str, torch.Tensor] | None = None
    for round_number in range(training.rounds):
        if algorithm == "shared_moments":
            share_second_moments(engines)
        differences = []
        for index, engine in enumerate(engines):
            engine.load_weights(model)
            if algorithm == "fresh":
                engine.optimizer.state.clear()
            correction = None
            if algorithm == "scaffold" and mean_gradient is not None:
                correction = {n: mean_gradient[n] - own_gradients[index][n] for n in mean_gradient}
            with corrected_gradients(engine, correction) as gradient_sums:
                engine.train(
                    training.local_steps,
                    first_step=round_number * training.local_steps,
                    total_steps=training.rounds * training.local_steps,
                )
            own_gradients[index] = {
                name: total / training.local_steps for name, total in gradient_sums.items()
            }
            trained = engine.weights()
            differences.append({key: trained[key] - model[key] for key in model})
        mean_gradient = {
            name: sum(gradients[name] for gradients in own_gradients) / len(own_gradients)
            for name in own_gradients[0]
        }
        model = {
            key: model[key] + server_lr * np.mean([d[key] for d in differences], axis=0)
            for key in model
        }
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=DEFAULT_RUNS, help="algorithm:RxS, same budget")
    add_data_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="smoke test: every algorithm, 4x5")
    args = parser.parse_args()
    if args.quick:
        args.runs = ",".join(f"{algorithm}:4x5" for algorithm in ALGORITHMS) + ",fedavg:4x5:2"
        args.cases, args.size = 6, 48
    runs = parse_runs(args.runs)

    began = time.perf_counter()
    with scratch_folder(args.workspace, "algorithms-") as root:
        config = run_config(runs[0][1], runs[0][2], "nyul")
        arm = harmonized_arm(root, args, config)
        per_site = runs[0][1] * runs[0][2]
        centralized, central_record = train_engine(
            config, arm.pooled, arm.transform, 3 * per_site, arm.start
        )
        log(f"centralized: {3 * per_site} steps in {central_record['seconds']} s")
        reference = evaluate(centralized, arm.engines)
        short, short_record = train_engine(config, arm.pooled, arm.transform, per_site, arm.start)
        results = [
            _run("centralized, a third of the budget", 1, per_site, short, short_record["seconds"])
        ]
        for algorithm, rounds, steps, server_lr in runs:
            run_began = time.perf_counter()
            schedule = run_config(rounds, steps, "nyul")
            weights = train_federated(
                schedule, arm.datasets, arm.transform, arm.start, algorithm, server_lr
            )
            seconds = round(time.perf_counter() - run_began, 1)
            results.append(_run(algorithm, rounds, steps, weights, seconds, server_lr))
        for result in results:
            evaluation = evaluate(result.pop("weights"), arm.engines)
            result["gaps"] = fedavg_gaps(
                {"evaluation": {"centralized": reference, "fedavg": evaluation}}
            )
            result["largest_gap"] = largest_gap(result["gaps"])
            result["within_goal"] = result["largest_gap"] <= GOAL_GAP
            log(f"{_label(result)} {result['rounds']}x{result['local_steps']}: "
                f"largest gap {result['largest_gap']:+.3f}")  # fmt: skip
    summary = {
        "benchmark": "quality_algorithms",
        "synth": {"sites": 4, "cases_per_site": args.cases, "size": args.size, "seed": args.seed},
        "budget_steps": 3 * per_site,
        "centralized": {"seconds": central_record["seconds"], "steps": central_record["steps"]},
        "runs": results,
        "nvflare_fedavg": _nvflare_fedavg(),
        "seconds_total": round(time.perf_counter() - began, 1),
        "machine": machine(),
    }
    if not args.quick:
        (HERE / "results").mkdir(exist_ok=True)
        results_path = HERE / "results" / "quality_algorithms.json"
        results_path.write_text(json.dumps(summary, indent=2) + "\n")
        (HERE / "quality_algorithms.md").write_text(_markdown(summary))
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}))


def _run(
    algorithm: str,
    rounds: int,
    steps: int,
    weights: Weights,
    seconds: float,
    server_lr: float = 1.0,
) -> dict:
    return {
        "algorithm": algorithm,
        "server_lr": server_lr,
        "rounds": rounds,
        "local_steps": steps,
        "seconds": seconds,
        "weights": weights,
    }


def _label(run: dict) -> str:
    """The run's algorithm, with its server learning rate when that is not 1."""
    server_lr = run.get("server_lr", 1.0)
    return run["algorithm"] + ("" if server_lr == 1.0 else f", server LR {server_lr:g}")


def _nvflare_fedavg() -> dict[str, float]:
    """Largest gap per schedule of the NVFlare FedAvg runs (quality_schedule.json), if any."""
    path = HERE / "results" / "quality_schedule.json"
    if not path.is_file():
        return {}
    runs = json.loads(path.read_text())["schedules"]
    return {f"{run['rounds']}x{run['local_steps']}": run["largest_gap"] for run in runs}


def _markdown(summary: dict) -> str:
    rows = "\n".join(
        f"| {_label(run)} | {run['rounds']} x {run['local_steps']} | {site} | "
        f"{gap_cells(run['gaps'], site)} |"
        for run in summary["runs"]
        for site in TRAINING_SITES
    )
    largest = "\n".join(
        f"| {_label(run)} | {run['rounds']} x {run['local_steps']} | "
        f"{run['largest_gap']:+.3f} | {'yes' if run['within_goal'] else 'no'} | "
        f"{run['seconds'] / 60:.1f} |"
        for run in summary["runs"]
    )
    nvflare = ", ".join(f"{k}: {v:+.3f}" for k, v in summary["nvflare_fedavg"].items()) or "none"
    machine = summary["machine"]
    return f"""# Why FedAvg trails centralized training: federated optimizers compared

Command: `python benchmarks/quality_algorithms.py` (results: \
`benchmarks/results/quality_algorithms.json`). Machine: {machine["cpus"]} CPUs, torch \
{machine["torch"]}, MONAI {machine["monai"]}. Whole run: {summary["seconds_total"] / 60:.1f} min.

The harmonized arm of `benchmarks/quality.py` (synthetic hospitals, seed \
{summary["synth"]["seed"]}, Nyúl artifact, initial weights, UNet, AdamW, poly schedule): \
centralized training once, {summary["budget_steps"]} steps on the pooled training cases \
({summary["centralized"]["seconds"]} s); every other row at the same budget, evaluated \
against it. The federated rows run the three sites' engines in this process and average them \
here (see the module docstring for each algorithm); gap: centralized minus the model's Dice on \
each training site's validation split, ± the paired standard error over its cases. Goal 1 of \
the quality benchmark asks for every gap at most {GOAL_GAP}. One seed per row.

| model | R x S | largest gap | within {GOAL_GAP} | minutes |
| --- | --- | ---: | --- | ---: |
{largest}

NVFlare's FedAvg at the same budget (`benchmarks/quality_schedule.md`), largest gap: {nvflare}.

| model | R x S | site | WT gap | TC gap | ET gap |
| --- | --- | --- | ---: | ---: | ---: |
{rows}
"""


if __name__ == "__main__":
    main()
