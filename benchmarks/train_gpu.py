"""Benchmark: fedseg's site engine against a plain MONAI training loop, on the GPU, in one run.

SegResNet in the BraTS configuration (the ``gpu`` profile's network: one input channel,
16 initial filters, blocks 1-2-2-4), 128³ crops, batch 2, on synthetic 1 mm head-sized volumes
(240x240x155: head, skull, scalp, a tumour with necrotic core, enhancing rim and edema),
generated in memory and written as NIfTI to a temporary folder; nothing is downloaded. Two
loops train on the same files, network, loss (soft Dice plus binary
cross-entropy per region, :mod:`app_site.losses`), optimizer (AdamW) and crop sampling:

- reference: the loop of MONAI's tutorials: ``CacheDataset`` in host memory, ``DataLoader``
  with 4 worker processes (kept alive across the tiny synthetic epochs), float32, the loss
  read back every step, float32 sliding-window inference;
- fedseg: ``app_site.engine.SegmentationEngine`` with the ``gpu`` profile (bf16 autocast,
  cuDNN autotuning, training cache on the GPU cropped there and fed by a
  ``ThreadDataLoader``, Gaussian sliding window), and variants with channels-last 3D and
  with ``torch.compile``.

Each loop runs in its own process (so that peak memory and global cuDNN settings are its own):
training steps/s and voxels/s after warm-up steps, sliding-window inference seconds per case
(transfers included; the first pass is a warm-up), peak memory (CUDA: ``max_memory_allocated``;
CPU: the process's peak resident set) and cache build time. On CUDA also: the largest batch
that fits (random batches through the loop's own step, doubling then bisecting) and the
training throughput there, and the engine's inference time over sliding-window batch sizes
and overlaps. Ratios are fedseg over reference, measured in the same run.

Goals (issue 8): fedseg at least 2x the reference's training throughput; inference under
0.4 s per 240x240x155 case on an H100.

Usage: python benchmarks/train_gpu.py [--quick] [--variants NAME,...] [--no-largest-batch]
                                      [--tag T]
  --quick: 64x64x48 volumes, 32³ crops, a few steps, one CPU thread per loop: a smoke test that
  finishes in about a minute on two CPU cores; its numbers say nothing about a GPU.
Writes benchmarks/results/train_gpu[-T].json and its section of benchmarks/gpu.md. The last
line of output is one JSON object (the ratios and goals).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import date
from importlib.metadata import version
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy.ndimage import zoom

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from app_site.engine import SegmentationEngine  # noqa: E402
from app_site.losses import region_loss  # noqa: E402
from benchmarks.markdown import write_section  # noqa: E402
from fedseg.config import RunConfig, load_config  # noqa: E402
from fedseg.files import write_json_atomic  # noqa: E402
from models.networks import build_network  # noqa: E402
from transforms.regions import LabelsToRegionsd  # noqa: E402

PROFILE = "gpu"
#: fedseg variants: training options changed from the profile's.
VARIANTS = {
    "fedseg": {},
    "fedseg+channels-last": {"channels_last": True},
    "fedseg+compile": {"compile": True},
}
GOAL_TRAIN_RATIO = 2.0
GOAL_INFERENCE_SECONDS = 0.4


@dataclass(frozen=True)
class Settings:
    """Sizes and step counts of one benchmark run."""

    shape: tuple[int, int, int]
    roi: tuple[int, int, int]
    train_cases: int
    validation_cases: int
    warmup_steps: int
    steps: int
    batch_size: int
    loader_workers: int
    sweep: tuple[tuple[int, float], ...]
    cpu_threads: int | None = None


FULL = Settings(
    shape=(240, 240, 155),
    roi=(128, 128, 128),
    train_cases=8,
    validation_cases=2,
    warmup_steps=10,
    steps=50,
    batch_size=2,
    loader_workers=4,
    sweep=tuple((b, o) for b in (1, 2, 4, 8, 16) for o in (0.0, 0.25, 0.5)),
)
QUICK = Settings(
    shape=(64, 64, 48),
    roi=(32, 32, 32),
    train_cases=2,
    validation_cases=1,
    warmup_steps=2,
    steps=10,
    batch_size=2,
    loader_workers=1,
    sweep=((1, 0.25), (4, 0.5)),
    # One intra-op thread: on a small shared machine, OpenMP barriers of several threads
    # stall whenever another process takes a core, and the numbers become noise.
    cpu_threads=1,
)


# --- synthetic data -------------------------------------------------------------------------


def smooth_noise(shape: tuple[int, ...], rng: np.random.Generator, cell: int = 16) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a coarse random grid, linearly interpolated."""
    coarse = rng.standard_normal([math.ceil(n / cell) + 1 for n in shape])
    fine = zoom(coarse, [(n + cell) / c for n, c in zip(shape, coarse.shape, strict=True)], order=1)
    fine = fine[tuple(slice(0, n) for n in shape)]
    return (fine / np.abs(fine).max()).astype(np.float32)


def synthetic_case(shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A head-sized 1 mm MR-like volume with one tumour, and its label map (0-3).

    Returns:
        ``(image, label)``: float32 intensities and uint8 labels (1 necrotic core, 2 edema,
        3 enhancing rim), both of ``shape``.
    """
    rng = np.random.default_rng(seed)
    axes = [np.arange(n, dtype=np.float32) - n / 2 for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    rx, ry, rz = (0.36 * shape[0], 0.42 * shape[1], 0.45 * shape[2])
    head = np.sqrt((x / rx) ** 2 + (y / ry) ** 2 + (z / rz) ** 2)
    texture = smooth_noise(shape, rng)
    image = np.zeros(shape, np.float32)
    image[head < 1.0] = 600.0  # scalp
    image[head < 0.92] = 150.0  # skull
    brain = head < 0.85
    image[brain] = 450.0 + 80.0 * texture[brain]
    centre = rng.uniform(-0.35, 0.35, 3) * np.array([rx, ry, rz])
    radius = rng.uniform(10.0, 22.0) * shape[0] / 240.0
    distance = np.sqrt((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2)
    distance = distance / radius + 0.25 * smooth_noise(shape, rng, cell=8)
    label = np.zeros(shape, np.uint8)
    label[brain & (distance < 1.7)] = 2
    label[distance < 1.0] = 3
    label[distance < 0.45] = 1
    image[label == 2] = 650.0
    image[label == 3] = 900.0
    image[label == 1] = 250.0
    image += rng.normal(0.0, 20.0, shape).astype(np.float32)
    return image, label


def write_cases(folder: Path, settings: Settings) -> list[dict[str, str]]:
    """Writes the run's cases as 1 mm RAS NIfTI files; returns their decathlon entries."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for index in range(settings.train_cases + settings.validation_cases):
        image, label = synthetic_case(settings.shape, seed=index)
        entry = {}
        for key, array in (("image", image), ("label", label)):
            path = folder / f"case-{index:03d}_{key}.nii"
            nib.save(nib.Nifti1Image(array, np.eye(4)), path)
            entry[key] = str(path)
        entries.append(entry)
    return entries


def write_datalist(folder: Path, entries: list[dict], settings: Settings, minimum: int) -> Path:
    """A dataset folder whose training list repeats the training cases to ``minimum`` entries.

    Repeats let a large batch draw distinct cache entries (each crop is random anyway).
    """
    folder.mkdir(parents=True, exist_ok=True)
    training = entries[: settings.train_cases]
    count = max(minimum, len(training))
    document = {
        "training": [training[i % len(training)] for i in range(count)],
        "validation": entries[settings.train_cases :],
    }
    (folder / "datalist.json").write_text(json.dumps(document, indent=1))
    return folder


# --- measurement helpers ----------------------------------------------------------------------


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory_mb(device: torch.device) -> dict:
    """Peak memory of this process: CUDA's allocator on a GPU, else the resident set."""
    if device.type == "cuda":
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20, "kind": "cuda"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_memory_mb": rss, "kind": "rss"}


def throughput(steps: int, seconds: float, batch: int, roi: tuple[int, ...]) -> dict:
    return {
        "steps": steps,
        "seconds": seconds,
        "batch_size": batch,
        "steps_per_s": steps / seconds,
        "voxels_per_s": steps * batch * math.prod(roi) / seconds,
    }


def windows(shape: tuple[int, ...], roi: tuple[int, ...], overlap: float) -> int:
    """Sliding windows MONAI uses to cover ``shape`` (its scan-interval rule)."""
    count = 1
    for size, window in zip(shape, roi, strict=True):
        interval = max(int(window * (1 - overlap)), 1)
        count *= 1 if size <= window else math.ceil((size - window) / interval) + 1
    return count


def fits(step: Callable[[int], object], batch: int) -> bool:
    """Whether two training steps at ``batch`` run without running out of device memory."""
    try:
        for _ in range(2):
            step(batch)
        synchronize()
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def largest_batch(step: Callable[[int], object], start: int, limit: int = 256) -> int:
    """The largest batch that fits: doubling from ``start``, then bisecting to within 1/8."""
    good, bad = start, None
    while bad is None and good * 2 <= limit:
        if fits(step, good * 2):
            good *= 2
        else:
            bad = good * 2
    while bad is not None and bad - good > max(1, good // 8):
        middle = (good + bad) // 2
        good, bad = (middle, bad) if fits(step, middle) else (good, middle)
    return good


def random_batch(batch: int, roi: tuple[int, ...], device: torch.device) -> tuple:
    image = torch.randn(batch, 1, *roi, device=device)
    label = (torch.rand(batch, 3, *roi, device=device) > 0.9).float()
    return image, label


def timed_inference(predict: Callable[[torch.Tensor], torch.Tensor], images: list) -> float:
    """Seconds per case, after one warm-up case."""
    predict(images[0])
    start = time.perf_counter()
    for image in images:
        predict(image)  # returns masks on the CPU: synchronized
    return (time.perf_counter() - start) / len(images)


# --- workers (each in its own process) --------------------------------------------------------


def engine_config(settings: Settings, batch_size: int, options: dict) -> RunConfig:
    """The gpu profile at the run's crop and batch size, with a variant's training options."""
    config = load_config(PROFILE)
    return dataclasses.replace(
        config,
        data=dataclasses.replace(config.data, roi_size=settings.roi),
        training=dataclasses.replace(config.training, batch_size=batch_size, **options),
    )


def fedseg_worker(spec: dict) -> dict:
    settings = Settings(**{k: _tuples(v) for k, v in spec["settings"].items()})
    batch = spec["batch_size"]
    config = engine_config(settings, batch, spec["options"])
    start = time.perf_counter()
    engine = SegmentationEngine(config, Path(spec["data"]))
    synchronize()
    result = {
        "acceleration": engine.acceleration.describe(),
        "cache_seconds": time.perf_counter() - start,
    }
    run_steps = settings.warmup_steps + settings.steps
    engine.train(settings.warmup_steps, total_steps=run_steps)
    trained = engine.train(settings.steps, first_step=settings.warmup_steps, total_steps=run_steps)
    result["train"] = {
        **throughput(trained.steps, trained.seconds, batch, settings.roi),
        "mean_loss": trained.mean_loss,
    }
    if spec["inference"]:
        engine.validate()  # warm-up: autotuning, compilation
        validation = engine.validate()
        cases = len(validation.cases)
        result["inference_seconds_per_case"] = validation.inference_seconds / cases
        result["validation_seconds_per_case"] = validation.seconds / cases
        images = [item["image"] for item in engine.validation_data]
        result["sweep"] = [
            {
                "sw_batch_size": sw_batch,
                "overlap": overlap,
                "windows": windows(tuple(images[0].shape[1:]), settings.roi, overlap),
                "seconds_per_case": timed_inference(
                    lambda image, s=sw_batch, o=overlap: engine.predict(
                        image, dataclasses.replace(config.validation, sw_batch_size=s, overlap=o)
                    ),
                    images,
                ),
            }
            for sw_batch, overlap in settings.sweep
        ]
    if spec["probe"]:
        result["largest_batch"] = largest_batch(
            lambda b: engine.step(*random_batch(b, settings.roi, engine.device)), batch
        )
    return {**result, **peak_memory_mb(engine.device)}


def reference_transforms(roi: tuple[int, ...], train: bool):
    """The tutorials' pipeline with the same crop sampling and region channels as fedseg."""
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        EnsureTyped,
        LoadImaged,
        Orientationd,
        RandCropByPosNegLabeld,
        RandFlipd,
        Spacingd,
        SpatialPadd,
    )

    keys = ("image", "label")
    steps = [
        LoadImaged(keys, image_only=True),
        EnsureChannelFirstd(keys),
        Orientationd(keys, axcodes="RAS"),
        Spacingd(keys, pixdim=(1.0, 1.0, 1.0), mode=("bilinear", "nearest")),
    ]
    if train:
        steps += [
            SpatialPadd(keys, roi),
            RandCropByPosNegLabeld(
                keys, label_key="label", spatial_size=roi, pos=1, neg=1, num_samples=1
            ),
            RandFlipd(keys, prob=0.5, spatial_axis=0),
        ]
    return Compose([*steps, LabelsToRegionsd("label"), EnsureTyped(keys, dtype=torch.float32)])


def reference_worker(spec: dict) -> dict:
    from monai.data import CacheDataset, DataLoader, load_decathlon_datalist
    from monai.inferers import sliding_window_inference
    from monai.utils import set_determinism

    settings = Settings(**{k: _tuples(v) for k, v in spec["settings"].items()})
    batch = spec["batch_size"]
    config = engine_config(settings, batch, {})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    set_determinism(seed=0)
    datalist = Path(spec["data"]) / "datalist.json"
    start = time.perf_counter()
    train_ds = CacheDataset(
        load_decathlon_datalist(datalist, data_list_key="training"),
        reference_transforms(settings.roi, train=True),
        cache_rate=1.0,
        num_workers=4,
    )
    validation_ds = CacheDataset(
        load_decathlon_datalist(datalist, data_list_key="validation"),
        reference_transforms(settings.roi, train=False),
        cache_rate=1.0,
        num_workers=4,
    )
    result = {
        "acceleration": f"{device}: float32, DataLoader (workers: {settings.loader_workers})",
        "cache_seconds": time.perf_counter() - start,
    }
    workers = settings.loader_workers
    loader = DataLoader(
        train_ds,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    model = build_network(config.model.name, **config.model.args).to(device)
    loss_function = region_loss(config.training.loss)
    optimizer = torch.optim.AdamW(
        model.parameters(), config.training.learning_rate, weight_decay=config.training.weight_decay
    )

    def step(image: torch.Tensor, label: torch.Tensor) -> float:
        model.train()
        optimizer.zero_grad()
        loss = loss_function(model(image.to(device)), label.to(device))
        loss.backward()
        optimizer.step()
        return loss.item()

    batches = _endless(loader)

    def train(steps: int) -> tuple[float, float]:
        start, losses = time.perf_counter(), []
        for _ in range(steps):
            item = next(batches)
            losses.append(step(item["image"], item["label"]))
        return time.perf_counter() - start, float(np.mean(losses))

    train(settings.warmup_steps)
    seconds, loss = train(settings.steps)
    result["train"] = {
        **throughput(settings.steps, seconds, batch, settings.roi),
        "mean_loss": loss,
    }

    @torch.no_grad()
    def predict(image: torch.Tensor) -> torch.Tensor:
        model.eval()
        logits = sliding_window_inference(image[None].to(device), settings.roi, 4, model, 0.5)
        return (torch.sigmoid(logits) > 0.5)[0].cpu()

    if spec["inference"]:
        images = [item["image"] for item in validation_ds]
        result["inference_seconds_per_case"] = timed_inference(predict, images)
    if spec["probe"]:
        result["largest_batch"] = largest_batch(
            lambda b: step(*random_batch(b, settings.roi, device)), batch
        )
    return {**result, **peak_memory_mb(device)}


def _endless(loader) -> Iterator[dict]:
    while True:
        yield from loader


def _tuples(value):
    """JSON lists back to the tuples of :class:`Settings`."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def worker(spec: dict) -> dict:
    threads = spec["settings"]["cpu_threads"]
    if threads:
        torch.set_num_threads(threads)
    try:
        run = fedseg_worker if spec["loop"] == "fedseg" else reference_worker
        return run(spec)
    except torch.cuda.OutOfMemoryError as error:
        return {"oom": True, "error": str(error).splitlines()[0]}


# --- the run ------------------------------------------------------------------------------------


def run_worker(spec: dict) -> dict:
    """One worker in a fresh process; its last line of output is its result."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"worker {spec['name']} failed ({done.returncode}):\n{done.stderr[-3000:]}"
        )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {**result, "worker_seconds": time.perf_counter() - start}


def machine() -> dict:
    cuda = torch.cuda.is_available()
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        lines = cpuinfo.read_text().splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {
        "kind": "cuda" if cuda else "cpu",
        "name": torch.cuda.get_device_name(0) if cuda else cpu,
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "gpu_memory_gb": torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
        "python": platform.python_version(),
    }


def measure(settings: Settings, variants: list[str], largest: bool, folder: Path) -> dict:
    """Every loop, each in its own process, on one set of synthetic cases."""
    cuda = torch.cuda.is_available()
    entries = write_cases(folder / "cases", settings)
    data = write_datalist(folder / "batch", entries, settings, settings.batch_size)
    base = {"settings": asdict(settings), "data": str(data), "batch_size": settings.batch_size}
    runs = {}
    plan = [("reference", "reference", {})] + [
        (name, "fedseg", VARIANTS[name]) for name in variants
    ]
    for name, loop, options in plan:
        probe = cuda and largest and name in ("reference", "fedseg")
        spec = {**base, "name": name, "loop": loop, "options": options}
        runs[name] = run_worker({**spec, "inference": True, "probe": probe})
        _progress(name, runs[name])
    largest_runs = {}
    for name in ("reference", "fedseg"):
        batch = runs.get(name, {}).get("largest_batch")
        while batch and batch > settings.batch_size:
            spec = {
                **base,
                "name": f"{name} at batch {batch}",
                "loop": name,
                "options": {},
                "batch_size": batch,
                "data": str(write_datalist(folder / f"batch-{batch}", entries, settings, batch)),
                "inference": False,
                "probe": False,
            }
            result = run_worker(spec)
            if not result.get("oom"):
                largest_runs[name] = result
                _progress(spec["name"], result)
                break
            batch = max(settings.batch_size, batch * 3 // 4)
    return {"runs": runs, "largest_batch_runs": largest_runs}


def _progress(name: str, result: dict) -> None:
    if result.get("oom"):
        print(f"{name}: out of memory ({result['error']})", flush=True)
        return
    train = result["train"]
    inference = result.get("inference_seconds_per_case")
    print(
        f"{name}: {train['steps_per_s']:.2f} steps/s at batch {train['batch_size']} "
        f"({train['voxels_per_s'] / 1e6:.1f} M voxels/s)"
        + (f", inference {inference:.3f} s/case" if inference is not None else "")
        + f", peak memory {result['peak_memory_mb']:.0f} MB ({result['kind']})",
        flush=True,
    )


def summarize(report: dict) -> dict:
    """Ratios against the reference, and the goals (unmeasured unless full size on CUDA)."""
    runs = report["runs"]
    reference = runs["reference"]
    ratios = {}
    for name, run in runs.items():
        if name == "reference" or run.get("oom"):
            continue
        ratios[name] = {
            "train_throughput": run["train"]["steps_per_s"] / reference["train"]["steps_per_s"],
            "inference_speedup": reference["inference_seconds_per_case"]
            / run["inference_seconds_per_case"],
        }
    largest = report["largest_batch_runs"]
    if "reference" in largest and "fedseg" in largest:
        ratios["largest batch"] = {
            "train_throughput": largest["fedseg"]["train"]["voxels_per_s"]
            / largest["reference"]["train"]["voxels_per_s"]
        }
    measured = report["device"]["kind"] == "cuda" and not report["quick"]
    why = None
    if report["device"]["kind"] != "cuda":
        why = "no CUDA device: CPU numbers, the GPU goals are unmeasured"
    elif report["quick"]:
        why = "--quick sizes: the goals are unmeasured"
    best_train = max((r["train_throughput"] for r in ratios.values()), default=None)
    fedseg = [r for n, r in runs.items() if n != "reference" and not r.get("oom")]
    best_inference = min((r["inference_seconds_per_case"] for r in fedseg), default=None)
    h100 = "H100" in report["device"]["name"]
    goals = {
        "train_throughput_2x": {
            "target": f">= {GOAL_TRAIN_RATIO}x the reference's training throughput",
            "best": best_train,
            "met": (best_train >= GOAL_TRAIN_RATIO) if measured and best_train else None,
        },
        "inference_under_0.4_s_on_h100": {
            "target": f"< {GOAL_INFERENCE_SECONDS} s per 240x240x155 case on an H100",
            "best": best_inference,
            "met": (best_inference < GOAL_INFERENCE_SECONDS)
            if measured and h100 and best_inference
            else None,
        },
    }
    if measured and not h100:
        why = f"measured on {report['device']['name']}, not an H100: inference goal unjudged"
    return {"ratios": ratios, "goals": goals, "note": why}


def markdown(report: dict) -> str:
    device, versions, settings = report["device"], report["versions"], report["settings"]
    load = report["load_average"]
    shape = "x".join(map(str, settings["shape"]))
    roi = "x".join(map(str, settings["roi"]))
    lines = [
        "## fedseg engine against a plain MONAI loop (`benchmarks/train_gpu.py"
        + (" --quick`)" if report["quick"] else "`)"),
        "",
    ]
    if report["note"]:
        lines += [f"**{report['note'][0].upper()}{report['note'][1:]}.**", ""]
    lines += [
        f"Measured {report['date']} on "
        + (
            f"{device['name']} ({device['gpu_memory_gb']:.0f} GiB, CUDA {device['cuda']}, "
            f"cuDNN {device['cudnn']}), host {device['cpu']}"
            if device["kind"] == "cuda"
            else f"the CPU only, {device['cpu']}"
        )
        + f" with {device['cpus']} CPUs, Python {device['python']}; "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
        + ".",
        f"SegResNet (BraTS configuration, {report['parameters']:,} parameters, `{PROFILE}` "
        f"profile), synthetic 1 mm volumes of {shape} voxels, {roi} crops, "
        f"{settings['train_cases']} training and {settings['validation_cases']} validation "
        f"cases, {settings['warmup_steps']} warm-up steps then {settings['steps']} timed steps; "
        f"DataLoader workers of the reference: {settings['loader_workers']}. Peak memory: "
        + ("CUDA `max_memory_allocated`." if device["kind"] == "cuda" else "process peak RSS.")
        + " Inference: seconds per case of sliding-window inference (transfers included)."
        + (
            f" Each worker uses {settings['cpu_threads']} CPU thread(s) for tensor operations."
            if settings["cpu_threads"]
            else ""
        )
        + f" Load average (1 min) at start / end: {load['start']:.1f} / {load['end']:.1f}"
        + f" on {device['cpus']} CPUs; whole run {report['wall_seconds']:.0f} s.",
        "",
        "| loop | runs as | steps/s | M voxels/s | vs reference | inference s/case | faster "
        "| peak memory | cache build |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    ratios = report["ratios"]
    for name, run in report["runs"].items():
        if run.get("oom"):
            lines.append(f"| {name} | out of memory | | | | | | | |")
            continue
        ratio = ratios.get(name, {"train_throughput": 1.0, "inference_speedup": 1.0})
        lines.append(
            f"| {name} | {run['acceleration']} | {run['train']['steps_per_s']:.2f} | "
            f"{run['train']['voxels_per_s'] / 1e6:.1f} | **{ratio['train_throughput']:.2f}x** | "
            f"{run['inference_seconds_per_case']:.3f} | {ratio['inference_speedup']:.2f}x | "
            f"{run['peak_memory_mb']:.0f} MB | {run['cache_seconds']:.1f} s |"
        )
    largest = report["largest_batch_runs"]
    if largest:
        lines += ["", "Largest batch that fits, and training throughput there:", ""]
        lines += [
            "| loop | batch | steps/s | M voxels/s | peak memory |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for name, run in largest.items():
            train = run["train"]
            lines.append(
                f"| {name} | {train['batch_size']} | {train['steps_per_s']:.2f} | "
                f"{train['voxels_per_s'] / 1e6:.1f} | {run['peak_memory_mb']:.0f} MB |"
            )
        if "largest batch" in ratios:
            value = ratios["largest batch"]["train_throughput"]
            lines += [
                "",
                f"fedseg / reference voxels/s at their largest batches: **{value:.2f}x**.",
            ]
    elif device["kind"] != "cuda":
        lines += ["", "Largest batch: searched on CUDA only."]
    sweep = report["runs"].get("fedseg", {}).get("sweep")
    if sweep:
        lines += ["", "fedseg sliding-window inference by window batch and overlap:", ""]
        lines += ["| sw_batch_size | overlap | windows | s/case |", "| ---: | ---: | ---: | ---: |"]
        best = min(entry["seconds_per_case"] for entry in sweep)
        for entry in sweep:
            mark = "**" if entry["seconds_per_case"] == best else ""
            lines.append(
                f"| {entry['sw_batch_size']} | {entry['overlap']} | {entry['windows']} | "
                f"{mark}{entry['seconds_per_case']:.3f}{mark} |"
            )
    lines += ["", "Goals:", ""]
    for goal in report["goals"].values():
        state = {True: "met", False: "**not met**", None: "unmeasured"}[goal["met"]]
        best = "" if goal["best"] is None else f" (best here: {goal['best']:.3g})"
        lines.append(f"- {goal['target']}: {state}{best}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a CPU smoke test")
    parser.add_argument(
        "--variants",
        default=None,
        help=f"fedseg variants to run, comma-separated (default: all on CUDA, all but compile "
        f"on the CPU): {', '.join(VARIANTS)}",
    )
    parser.add_argument("--no-largest-batch", action="store_true", help="skip the batch search")
    parser.add_argument("--tag", default="", help="suffix of the results file and section")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    cuda = torch.cuda.is_available()
    if args.variants:
        variants = args.variants.split(",")
        unknown = sorted(set(variants) - set(VARIANTS))
        if unknown:
            parser.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    else:  # torch.compile applies on CUDA only: on the CPU it would repeat "fedseg"
        variants = [name for name in VARIANTS if cuda or name != "fedseg+compile"]
    if not cuda:
        print(
            "NOTE: no CUDA device. These are CPU numbers; the GPU goals (>= 2x training "
            "throughput, < 0.4 s inference per case on an H100) are unmeasured.",
            flush=True,
        )
    settings = QUICK if args.quick else FULL
    config = load_config(PROFILE)
    network = build_network(config.model.name, **config.model.args)
    report = {
        "date": date.today().isoformat(),
        "quick": args.quick,
        "device": machine(),
        "versions": {p: version(p) for p in ("torch", "monai", "numpy", "nibabel")},
        "settings": asdict(settings),
        "profile": PROFILE,
        "model": {"name": config.model.name, "args": config.model.args},
        "parameters": sum(p.numel() for p in network.parameters()),
    }
    started, load = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="fedseg-train-gpu-") as folder:
        report.update(measure(settings, variants, cuda and not args.no_largest_batch, Path(folder)))
    report["wall_seconds"] = time.perf_counter() - started
    report["load_average"] = {"start": load, "end": os.getloadavg()[0]}
    report.update(summarize(report))
    name = "train_gpu" + (f"-{args.tag}" if args.tag else "")
    write_json_atomic(HERE / "results" / f"{name}.json", report)
    write_section(HERE / "gpu.md", name, markdown(report), "GPU training and inference")
    if report["note"]:
        print(f"NOTE: {report['note']}.", flush=True)
    print(json.dumps({k: report[k] for k in ("device", "ratios", "goals", "note")}))


if __name__ == "__main__":
    main()
