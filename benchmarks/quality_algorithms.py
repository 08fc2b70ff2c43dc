"""Why FedAvg trails centralized training here: federated optimizers compared in one process.

Quality goal 1 (FedAvg within 0.02 Dice of centralized training on every site) is not met by
the job's FedAvg (``benchmarks/quality.md``, ``benchmarks/quality_schedule.md``). This
benchmark separates the causes by running variants of the federated optimization at the same
budget as ``benchmarks/quality.py``'s harmonized arm (same synthetic hospitals, Nyúl artifact,
initial weights, network, AdamW and learning-rate schedule):

- ``fedavg``: plain FedAvg. Each site keeps its optimizer (AdamW moments) from round to
  round, trains S steps from the global model, and the global model moves by the weighted mean
  of the sites' weight differences. ``--aggregation-weight`` weighs them as the job does:
  ``cases`` (the job's default) by each site's training cases, ``steps`` by its steps (every
  site makes S, so alike; the weighting of the reports measured before the option existed).
- ``fresh``: the same, with every site's optimizer state cleared at the start of each round.
- ``scaffold``: control variates against client drift (Karimireddy et al., 2020): every
  gradient a site computes is corrected by the federation's mean gradient of the previous round
  minus the site's own, before AdamW sees it.
- ``shared_moments``: at the start of each round every site's AdamW second-moment estimate is
  replaced by the sites' mean (weighted as the updates are), so that all sites scale their
  steps alike. The job does the same through the global model, with one difference: it
  averages the square roots (each site's gradient RMS, :mod:`fedseg.moments`) and squares the
  mean, which is at most the mean of the second moments.

A run may also give a server learning rate: the global model then moves by that multiple of
the sites' mean weight difference (FedAvg with server SGD, Reddi et al., 2021), which makes up
for the sites' steps being averaged rather than added when their directions agree.

The sites run as :class:`app_site.engine.SegmentationEngine` objects in this process and are
averaged here, not through NVFlare: this benchmark compares optimization algorithms, and its
``shared_moments`` rows at the job's schedule are checked against the NVFlare job's gaps with
the same weighting (``benchmarks/quality.md`` by cases, ``benchmarks/quality_steps.md`` by
steps; the sites' random streams differ, so the numbers agree only to within run-to-run
noise). Every model is trained once per training seed (``--seeds``) and each gap is the mean
over seeds, as in ``benchmarks/quality.py``; one seed's models differ from another's by as
much as the goal.
Centralized training is also run with a third of the budget (as many sequential steps as each
FedAvg site makes; first seed only), to tell fewer sequential steps apart from the sites'
differences.

Usage: python benchmarks/quality_algorithms.py [--runs fedavg:40x50,scaffold:200x10:2,...]
    [--aggregation-weight cases|steps] [--seeds N] [--cases N] [--validation-fraction F]
    [--size S] [--seed K] [--workspace DIR] [--quick]
Writes benchmarks/results/NAME.json and benchmarks/NAME.md (NAME: --name, default
quality_algorithms; not with --quick).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Transform
from quality import (
    GOAL_GAP,
    HERE,
    REPORT_NAMES,
    TRAINING_SITES,
    add_data_arguments,
    evaluate,
    fedavg_gaps,
    gap_cells,
    harmonized_arm,
    initial_weights,
    largest_gap,
    log,
    machine,
    mean_gap,
    run_config,
    scratch_folder,
    train_engine,
)

from app_site.engine import SegmentationEngine
from app_site.training_task import aggregation_weight
from fedseg.config import AGGREGATION_WEIGHTS, RunConfig
from fedseg.files import write_json_atomic, write_text_atomic

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


def share_second_moments(engines: list[SegmentationEngine], shares: list[float]) -> None:
    """Sets every site's AdamW second-moment estimates to the sites' mean (none before step 1).

    Args:
        engines: The sites.
        shares: Each site's share of the weighted mean (summing to 1).
    """
    parameter_states = zip(
        *([engine.optimizer.state[p] for p in engine.model.parameters()] for engine in engines),
        strict=True,
    )
    for states in parameter_states:
        if "exp_avg_sq" in states[0]:
            mean = sum(s * state["exp_avg_sq"] for s, state in zip(shares, states, strict=True))
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

    The global model moves by ``server_lr`` times the sites' mean weight difference, weighted
    by ``config.training.aggregation_weight`` as the job weighs the sites' updates.

    Returns:
        The final global model.
    """
    training = config.training
    engines = [SegmentationEngine(config, datasets[site], transform) for site in TRAINING_SITES]
    weights = [
        aggregation_weight(
            training.aggregation_weight,
            training.local_steps,
            len(engine.train_files),
            training.local_steps,
        )
        for engine in engines
    ]
    shares = [weight / sum(weights) for weight in weights]
    model = {key: value.copy() for key, value in start.items()}
    own_gradients: list[dict[str, torch.Tensor] | None] = [None] * len(engines)
    mean_gradient: dict[str, torch.Tensor] | None = None
    for round_number in range(training.rounds):
        if algorithm == "shared_moments":
            share_second_moments(engines, shares)
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
            key: model[key]
            + server_lr * sum(share * d[key] for share, d in zip(shares, differences, strict=True))
            for key in model
        }
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs", default=DEFAULT_RUNS, help="algorithm:RxS[:server_lr], same budget"
    )
    parser.add_argument(
        "--aggregation-weight",
        choices=AGGREGATION_WEIGHTS,
        default="cases",
        help="what each site's update counts for (training.aggregation_weight; default cases, "
        "as in the job)",
    )
    parser.add_argument(
        "--seeds", type=int, default=1, help="training seeds 0..N-1 of every model (default 1)"
    )
    parser.add_argument(
        "--name",
        default="quality_algorithms",
        help="results go to benchmarks/NAME.md and benchmarks/results/NAME.json",
    )
    add_data_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="smoke test: every algorithm, 4x5")
    args = parser.parse_args()
    if args.quick:
        args.runs = ",".join(f"{algorithm}:4x5" for algorithm in ALGORITHMS) + ",fedavg:4x5:2"
        args.cases, args.size, args.seeds = 6, 48, 2
    runs = parse_runs(args.runs)

    began = time.perf_counter()
    per_site = runs[0][1] * runs[0][2]
    short = {
        "algorithm": "centralized, a third of the budget",
        "rounds": 1,
        "local_steps": per_site,
    }
    results = [short] + [
        {"algorithm": algorithm, "server_lr": server_lr, "rounds": rounds, "local_steps": steps}
        for algorithm, rounds, steps, server_lr in runs
    ]
    references, evaluations = [], [[] for _ in results]
    central_seconds = []
    with scratch_folder(args.workspace, "algorithms-") as root:
        arm = harmonized_arm(root, args, run_config(runs[0][1], runs[0][2], "nyul"))
        for seed in range(args.seeds):
            config = _seeded(run_config(runs[0][1], runs[0][2], "nyul"), seed)
            start = initial_weights(config)
            centralized, record = train_engine(
                config, arm.pooled, arm.transform, 3 * per_site, start
            )
            central_seconds.append(record["seconds"])
            log(f"seed {seed}: centralized, {3 * per_site} steps in {record['seconds']} s")
            references.append(evaluate(centralized, arm.engines))
            if seed == 0:  # one seed is enough to show what fewer sequential steps cost
                weights, record = train_engine(config, arm.pooled, arm.transform, per_site, start)
                short["seconds"] = record["seconds"]
                evaluations[0].append(evaluate(weights, arm.engines))
            for result, evaluated in zip(results[1:], evaluations[1:], strict=True):
                run_began = time.perf_counter()
                weights = train_federated(
                    _seeded(
                        run_config(
                            result["rounds"], result["local_steps"], "nyul", args.aggregation_weight
                        ),
                        seed,
                    ),
                    arm.datasets,
                    arm.transform,
                    start,
                    result["algorithm"],
                    result["server_lr"],
                )
                result["seconds"] = round(time.perf_counter() - run_began, 1)
                evaluated.append(evaluate(weights, arm.engines))
                log(f"seed {seed}: {_label(result)} {result['rounds']}x{result['local_steps']} "
                    f"in {result['seconds']} s")  # fmt: skip
    for result, evaluated in zip(results, evaluations, strict=True):
        repeats = {"centralized": references[: len(evaluated)], "fedavg": evaluated}
        result["seeds"] = len(evaluated)
        result["gaps"] = fedavg_gaps({"repeats": repeats})
        result["largest_gap"] = largest_gap(result["gaps"])
        result["mean_gap"] = mean_gap(result["gaps"])
        result["within_goal"] = result["largest_gap"] <= GOAL_GAP
        log(f"{_label(result)} {result['rounds']}x{result['local_steps']}: largest gap "
            f"{result['largest_gap']:+.3f}, mean {result['mean_gap']:+.3f}")  # fmt: skip
    summary = {
        "benchmark": "quality_algorithms",
        "name": args.name,
        "synth": {"sites": 4, "cases_per_site": args.cases, "size": args.size, "seed": args.seed},
        "validation_fraction": args.validation_fraction,
        "training_seeds": args.seeds,
        "aggregation_weight": args.aggregation_weight,
        "budget_steps": 3 * per_site,
        "centralized": {"seconds": central_seconds, "steps": 3 * per_site},
        "runs": results,
        "nvflare_fedavg": _nvflare_fedavg(args.aggregation_weight),
        "seconds_total": round(time.perf_counter() - began, 1),
        "machine": machine(),
    }
    if not args.quick:
        (HERE / "results").mkdir(exist_ok=True)
        results_path = HERE / "results" / f"{args.name}.json"
        write_json_atomic(results_path, summary)
        write_text_atomic(HERE / f"{args.name}.md", _markdown(summary))
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}))


def _seeded(config: RunConfig, seed: int) -> RunConfig:
    return replace(config, training=replace(config.training, seed=seed))


def _label(run: dict) -> str:
    """The run's algorithm, with its server learning rate when that is not 1."""
    server_lr = run.get("server_lr", 1.0)
    return run["algorithm"] + ("" if server_lr == 1.0 else f", server LR {server_lr:g}")


def _nvflare_fedavg(weighting: str) -> dict[str, float]:
    """The NVFlare job's harmonized gaps (largest, mean; seeds) with ``weighting``, if measured."""
    path = HERE / "results" / f"{REPORT_NAMES[weighting]}.json"
    if not path.is_file():
        return {}
    quality = json.loads(path.read_text())
    gaps = quality["fedavg_gap"][quality["goal_arm"]]
    return {
        "schedule": f"{quality['budget']['rounds']}x{quality['budget']['local_steps']}",
        "seeds": len(gaps[TRAINING_SITES[0]]["WT"]["per_seed"]),
        "largest_gap": largest_gap(gaps),
        "mean_gap": mean_gap(gaps),
    }


def _runs_argument(runs: list[dict]) -> str:
    """The ``--runs`` value that repeats ``runs``."""
    return ",".join(
        f"{run['algorithm']}:{run['rounds']}x{run['local_steps']}"
        + ("" if run["server_lr"] == 1.0 else f":{run['server_lr']:g}")
        for run in runs
    )


def _markdown(summary: dict) -> str:
    rows = "\n".join(
        f"| {_label(run)} | {run['rounds']} x {run['local_steps']} | {site} | "
        f"{gap_cells(run['gaps'], site)} |"
        for run in summary["runs"]
        for site in TRAINING_SITES
    )
    largest = "\n".join(
        f"| {_label(run)} | {run['rounds']} x {run['local_steps']} | {run['seeds']} | "
        f"{run['largest_gap']:+.3f} | {run['mean_gap']:+.3f} | "
        f"{'yes' if run['within_goal'] else 'no'} | {run['seconds'] / 60:.1f} |"
        for run in summary["runs"]
    )
    job = summary["nvflare_fedavg"]
    nvflare = (
        f"at {job['schedule']} over {job['seeds']} seed(s), largest gap {job['largest_gap']:+.3f}, "
        f"mean {job['mean_gap']:+.3f}"
        if job
        else "not measured"
    )
    machine = summary["machine"]
    synth = summary["synth"]
    command = (
        f"python benchmarks/quality_algorithms.py --runs {_runs_argument(summary['runs'][1:])} "
        f"--aggregation-weight {summary['aggregation_weight']} "
        f"--seeds {summary['training_seeds']} --cases {synth['cases_per_site']} "
        f"--validation-fraction {summary['validation_fraction']} --size {synth['size']} "
        f"--seed {synth['seed']}"
        + ("" if summary["name"] == "quality_algorithms" else f" --name {summary['name']}")
    )
    seconds = ", ".join(f"{s:.0f}" for s in summary["centralized"]["seconds"])
    return f"""# Why FedAvg trails centralized training: federated optimizers compared

Command: `{command}` (results: `benchmarks/results/{summary["name"]}.json`). \
Machine: {machine["cpus"]} CPUs, torch \
{machine["torch"]}, MONAI {machine["monai"]}. Whole run: {summary["seconds_total"] / 60:.1f} min.

The harmonized arm of `benchmarks/quality.py` (synthetic hospitals, seed {synth["seed"]}, \
{synth["cases_per_site"]} cases per site, validation fraction \
{summary["validation_fraction"]}, Nyúl artifact, UNet, AdamW, poly schedule): centralized \
training, {summary["budget_steps"]} steps on the pooled training cases, once per training seed \
({seconds} s), each seed from its own initial weights; every other row at the same budget, \
from the same initial weights, evaluated against the centralized model of its seed. The \
federated rows run the three sites' engines in this process and average them here (see the \
module docstring for each algorithm); gap: centralized minus the model's Dice on each training \
site's validation split, the mean over seeds ± its standard error (spread over cases and \
seeds), each seed's gap in brackets. Goal 1 of the quality benchmark asks for every gap at \
most {GOAL_GAP}. Minutes: one seed's training.

| model | R x S | seeds | largest gap | mean gap | within {GOAL_GAP} | minutes |
| --- | --- | ---: | ---: | ---: | --- | ---: |
{largest}

The NVFlare job weighted by {summary["aggregation_weight"]} \
(`benchmarks/{REPORT_NAMES[summary["aggregation_weight"]]}.md`): {nvflare}.

| model | R x S | site | WT gap | TC gap | ET gap |
| --- | --- | --- | ---: | ---: | ---: |
{rows}
"""


if __name__ == "__main__":
    main()
