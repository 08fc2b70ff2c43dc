"""``fedseg synth``: writes simulated hospitals (DICOM series, tumour labels, manifests).

Output layout, for sites ``site-1`` ... ``site-N``::

    OUT/synth.json                       what was generated (parameters, sites, counts)
    OUT/<site>/manifest.csv              case_id,series_uid,label
    OUT/<site>/dicom/<case>/*.dcm        one MR series per case, one file per slice
    OUT/<site>/labels/<case>.nii.gz      tumour label in the series' exact geometry
    OUT/<site>/tissues/<case>.nii.gz     tissue map (evaluation ground truth only)
    OUT/<site>/site.json                 the simulated scanner and population

Each site is built in a hidden staging folder and moved into place when complete, so an
interrupted run never leaves a half-written site and a re-run replaces a site whole. Every case
draws its randomness from ``(seed, site, case)`` alone, so the output is byte-identical for a
seed whatever the number of worker processes.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from app_site.ingest.manifest import MANIFEST_HEADER
from fedseg.files import replace_folder, write_json_atomic
from fedseg.synth.anatomy import Subject, Tissue, tumour_label
from fedseg.synth.dicom_series import SeriesIdentity, write_series
from fedseg.synth.geometry import AcquisitionGrid
from fedseg.synth.scanner import SiteProfile, acquire, site_profile

#: Version of the synthetic data format; recorded in ``synth.json``.
SYNTH_FORMAT_VERSION = 1

MAX_SIZE = 512
MIN_SIZE = 16


@dataclass(frozen=True)
class SynthConfig:
    """What to simulate.

    Attributes:
        out: Output folder.
        sites: Number of hospitals.
        cases_per_site: Average number of cases per site (sites differ around it).
        size: In-plane matrix size (columns) of each series; sets the resolution.
        seed: Seed of the whole simulation.
    """

    out: Path
    sites: int = 3
    cases_per_site: int = 20
    size: int = 96
    seed: int = 0

    def __post_init__(self) -> None:
        """Rejects values that cannot produce a usable dataset."""
        if self.sites < 1:
            raise ValueError(f"--sites must be at least 1, got {self.sites}")
        if self.cases_per_site < 1:
            raise ValueError(f"--cases-per-site must be at least 1, got {self.cases_per_site}")
        if not MIN_SIZE <= self.size <= MAX_SIZE:
            raise ValueError(f"--size must be between {MIN_SIZE} and {MAX_SIZE}, got {self.size}")
        if self.seed < 0:
            raise ValueError(f"--seed must be non-negative, got {self.seed}")

    def site_name(self, site_index: int) -> str:
        """Name of the ``site_index``-th site (0-based): ``site-1``, ``site-2``, ..."""
        return f"site-{site_index + 1}"

    def case_id(self, site_index: int, case_index: int) -> str:
        """Case identifier, unique across sites."""
        return f"{self.site_name(site_index)}_case{case_index + 1:03d}"


@dataclass(frozen=True)
class CaseSummary:
    """What was generated for one case (no pixel data)."""

    site: str
    case_id: str
    series_uid: str
    n_files: int
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    tumour_volume_ml: float
    white_matter_mean: float


@dataclass(frozen=True)
class SiteSummary:
    """One generated hospital."""

    name: str
    profile: SiteProfile
    cases: tuple[CaseSummary, ...]


def synthesize_hospitals(
    config: SynthConfig,
    workers: int = 1,
    on_case_done: Callable[[CaseSummary], None] | None = None,
) -> list[SiteSummary]:
    """Generates all sites of ``config`` under ``config.out``.

    Args:
        config: What to simulate.
        workers: Number of processes; 1 runs in this process.
        on_case_done: Called after each case is written (for progress display).

    Returns:
        One summary per site, in site order.
    """
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    profiles = [site_profile(s, config.seed) for s in range(config.sites)]
    tasks = [
        (config, s, c)
        for s, profile in enumerate(profiles)
        for c in range(profile.population.case_count(config.cases_per_site))
    ]
    for s in range(config.sites):
        staging = _staging_folder(out, config.site_name(s))
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()

    remaining = {s: sum(1 for _, site, _ in tasks if site == s) for s in range(config.sites)}
    results: dict[int, list[CaseSummary]] = {s: [] for s in range(config.sites)}

    def collect(site_index: int, summary: CaseSummary) -> None:
        results[site_index].append(summary)
        if on_case_done is not None:
            on_case_done(summary)
        remaining[site_index] -= 1
        if remaining[site_index] == 0:
            _finish_site(out, config, site_index, profiles[site_index], results[site_index])

    if workers <= 1:
        for task in tasks:
            collect(task[1], _synthesize_case(*task))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(_synthesize_case, *task) for task in tasks]
            for task, future in zip(tasks, futures, strict=True):
                collect(task[1], future.result())

    write_json_atomic(out / "synth.json", _run_record(config, profiles, results))
    return [
        SiteSummary(
            config.site_name(s),
            profiles[s],
            tuple(sorted(results[s], key=lambda case: case.case_id)),
        )
        for s in range(config.sites)
    ]


def write_nifti(volume: np.ndarray, grid: AcquisitionGrid, path: Path) -> None:
    """Writes a ``[k, j, i]`` volume on ``grid`` as NIfTI (RAS affine in qform and sform).

    Args:
        volume: Array indexed ``[k, j, i]``.
        grid: Its geometry.
        path: Destination (``.nii`` or ``.nii.gz``).
    """
    image = nib.Nifti1Image(np.ascontiguousarray(volume.transpose(2, 1, 0)), grid.affine_ras)
    image.header.set_qform(grid.affine_ras, code=1)
    image.header.set_sform(grid.affine_ras, code=1)
    image.header.set_xyzt_units(xyz="mm")
    nib.save(image, path)


def _synthesize_case(config: SynthConfig, site_index: int, case_index: int) -> CaseSummary:
    """Simulates and writes one case into its site's staging folder."""
    site = config.site_name(site_index)
    case_id = config.case_id(site_index, case_index)
    profile = site_profile(site_index, config.seed)
    rng = np.random.default_rng([config.seed, site_index, case_index])
    grid = profile.scanner.grid(config.size)
    subject = Subject.random(rng, profile.population.tumour_radius(rng))
    tissues = subject.tissue_map(grid)
    label = tumour_label(tissues)
    stored = acquire(tissues, grid, profile.scanner, rng)
    identity = SeriesIdentity.random(rng, [str(config.seed), site, case_id])

    staging = _staging_folder(Path(config.out), site)
    series_folder = staging / "dicom" / case_id
    series_folder.mkdir(parents=True)
    paths = write_series(stored, grid, profile.scanner, identity, series_folder, rng)
    for kind, volume in (("labels", label), ("tissues", tissues)):
        (staging / kind).mkdir(exist_ok=True)
        write_nifti(volume, grid, staging / kind / f"{case_id}.nii.gz")

    physical = stored * profile.scanner.rescale_slope + profile.scanner.rescale_intercept
    voxel_ml = float(np.prod(grid.spacing)) / 1000.0
    return CaseSummary(
        site=site,
        case_id=case_id,
        series_uid=identity.series_instance_uid,
        n_files=len(paths),
        shape=grid.shape,
        spacing=grid.spacing,
        tumour_volume_ml=float(np.count_nonzero(label)) * voxel_ml,
        white_matter_mean=float(physical[tissues == Tissue.WHITE_MATTER].mean()),
    )


def _staging_folder(out: Path, site: str) -> Path:
    return out / f".{site}.partial"


def _finish_site(
    out: Path,
    config: SynthConfig,
    site_index: int,
    profile: SiteProfile,
    cases: list[CaseSummary],
) -> None:
    """Writes the site's manifest and description, then moves the site into place."""
    site = config.site_name(site_index)
    staging = _staging_folder(out, site)
    with (staging / "manifest.csv").open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(MANIFEST_HEADER)
        for case in sorted(cases, key=lambda c: c.case_id):
            writer.writerow((case.case_id, case.series_uid, f"labels/{case.case_id}.nii.gz"))
    site_record = {
        "site": site,
        "scanner": dataclasses.asdict(profile.scanner),
        "population": dataclasses.asdict(profile.population),
        "cases": len(cases),
    }
    (staging / "site.json").write_text(json.dumps(site_record, indent=2) + "\n")
    replace_folder(staging, out / site)


def _run_record(
    config: SynthConfig,
    profiles: list[SiteProfile],
    results: dict[int, list[CaseSummary]],
) -> dict:
    return {
        "format_version": SYNTH_FORMAT_VERSION,
        "seed": config.seed,
        "size": config.size,
        "cases_per_site": config.cases_per_site,
        "sites": [
            {
                "name": config.site_name(s),
                "manufacturer": profiles[s].scanner.manufacturer,
                "cases": len(results[s]),
            }
            for s in range(config.sites)
        ],
    }
