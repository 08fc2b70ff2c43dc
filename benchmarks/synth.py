"""Benchmark of ``fedseg synth``: 3 sites x 20 cases at 96^3 (goal: under 60 s on 2 cores).

Baseline, in the same run: SimpleITK writing the same number of DICOM slices of the same
shapes, with no simulation (the I/O floor of a standard tool). The ratio says what simulating
the anatomy, the scanner and the DICOM tags costs on top of writing the files.

Usage: python benchmarks/synth.py [--quick]
Writes benchmarks/results/synth.json and benchmarks/synth.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from fedseg.files import write_json_atomic, write_text_atomic
from fedseg.synth.hospitals import SiteSummary, SynthConfig, synthesize_hospitals
from fedseg.synth.scanner import site_profile

HERE = Path(__file__).resolve().parent
GOAL_SECONDS = 60.0


def time_fedseg(config: SynthConfig, workers: int) -> tuple[float, list[SiteSummary]]:
    start = time.perf_counter()
    sites = synthesize_hospitals(config, workers=workers)
    return time.perf_counter() - start, sites


def time_simpleitk_writes(sites: list[SiteSummary], out: Path, seed: int) -> float:
    """Writes random slices of every generated case's shape with SimpleITK, one file per slice."""
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for site_index, site in enumerate(sites):
        grid = site_profile(site_index, seed).scanner.grid(site.cases[0].shape[0])
        for case in site.cases:
            folder = out / case.case_id
            folder.mkdir(parents=True)
            volume = rng.integers(0, 4000, size=grid.array_shape, dtype=np.int16)
            image = sitk.GetImageFromArray(volume)
            image.SetSpacing(grid.spacing)
            image.SetOrigin(tuple(grid.origin))
            image.SetDirection(tuple(grid.direction.ravel()))
            writer = sitk.ImageFileWriter()
            writer.KeepOriginalImageUIDOn()
            for k in range(volume.shape[0]):
                writer.SetFileName(str(folder / f"{k:04d}.dcm"))
                writer.Execute(image[:, :, k : k + 1])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 sites x 4 cases at 64^3")
    args = parser.parse_args()
    cases, size = (4, 64) if args.quick else (20, 96)
    workers = os.cpu_count() or 1

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        config = SynthConfig(out=scratch / "fedseg", sites=3, cases_per_site=cases, size=size)
        parallel_s, sites = time_fedseg(config, workers)
        serial_config = SynthConfig(out=scratch / "fedseg-serial", **_same(config))
        serial_s, _ = time_fedseg(serial_config, 1)
        baseline_s = time_simpleitk_writes(sites, scratch / "simpleitk", config.seed)

    n_cases = sum(len(site.cases) for site in sites)
    n_slices = sum(case.n_files for site in sites for case in site.cases)
    result = {
        "benchmark": "synth",
        "sites": 3,
        "cases": n_cases,
        "size": size,
        "slices": n_slices,
        "workers": workers,
        "fedseg_seconds": round(parallel_s, 2),
        "fedseg_serial_seconds": round(serial_s, 2),
        "simpleitk_write_only_seconds": round(baseline_s, 2),
        "fedseg_slices_per_second": round(n_slices / parallel_s, 1),
        "serial_over_simpleitk_write_only": round(serial_s / baseline_s, 2),
        "goal_seconds": GOAL_SECONDS if not args.quick else None,
        "goal_met": parallel_s < GOAL_SECONDS if not args.quick else None,
        "machine": {
            "cpus": workers,
            "processor": platform.machine(),
            "python": platform.python_version(),
            "numpy": version("numpy"),
            "simpleitk": version("SimpleITK"),
            "pydicom": version("pydicom"),
        },
    }
    if not args.quick:
        (HERE / "results").mkdir(exist_ok=True)
        write_json_atomic(HERE / "results" / "synth.json", result)
        write_text_atomic(HERE / "synth.md", _markdown(result))
    print(json.dumps(result))


def _same(config: SynthConfig) -> dict:
    return {
        "sites": config.sites,
        "cases_per_site": config.cases_per_site,
        "size": config.size,
        "seed": config.seed,
    }


def _markdown(result: dict) -> str:
    return f"""# `fedseg synth` benchmark

Command: `python benchmarks/synth.py` (results: `benchmarks/results/synth.json`).
Machine: {result["machine"]["cpus"]} CPUs ({result["machine"]["processor"]}), Python \
{result["machine"]["python"]}, numpy {result["machine"]["numpy"]}, SimpleITK \
{result["machine"]["simpleitk"]}, pydicom {result["machine"]["pydicom"]}.

Workload: 3 sites, {result["cases"]} cases at matrix {result["size"]} \
({result["slices"]} DICOM slices, labels and tissue maps).

| run | seconds | slices/s |
| --- | ---: | ---: |
| fedseg synth, {result["workers"]} workers | {result["fedseg_seconds"]} | \
{result["fedseg_slices_per_second"]} |
| fedseg synth, 1 worker | {result["fedseg_serial_seconds"]} | \
{round(result["slices"] / result["fedseg_serial_seconds"], 1)} |
| baseline: SimpleITK writes the same slices, no simulation | \
{result["simpleitk_write_only_seconds"]} | \
{round(result["slices"] / result["simpleitk_write_only_seconds"], 1)} |

Goal: under {result["goal_seconds"]:g} s; met: **{result["goal_met"]}**. Simulating anatomy, \
scanner and DICOM tags in one process costs {result["serial_over_simpleitk_write_only"]}x \
SimpleITK's bare write of the same slices.
"""


if __name__ == "__main__":
    main()
