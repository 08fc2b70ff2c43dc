"""Benchmark: NVFlare's stock HE filters against fedseg's packed CKKS filters, one FedAvg round.

For each model (SegResNet in the BraTS configuration and the tiny profile's UNet), three sites
each hold the initial weights plus a small random update, weighted by 8 training steps; one
round runs through each pipeline (``benchmarks/he_pipelines.py``: the real NVFlare filter,
aggregator and shareable-generator classes, contexts from freshly provisioned startup kits,
messages serialized with FOBS), each pipeline in its own process so that its peak memory
(resident set) is its own. Both pipelines get the parameters they are provisioned with in a
deployment: NVFlare's defaults (poly modulus 8192, [60, 40, 40]) for stock, fedseg's
(4096, [60, 40]) for packed.

Measured: bytes one site uploads, bytes of the global model sent back, seconds for encrypt at
one site + aggregation of the three updates + decrypt at one site, peak memory, and the largest
error of the decrypted average against the plaintext weighted average. Goal: packed at least 4x
fewer bytes and at least 2x faster end to end than stock.

Usage: python benchmarks/he_packing.py [--quick]    (--quick: the tiny model only, no files)
Writes benchmarks/results/he_packing.json and its section of benchmarks/he.md. The last line of
output is one JSON object (the largest model's numbers, all models under ``models``).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from app_server.federation import prepare  # noqa: E402
from benchmarks.he_pipelines import packed_round, stock_round  # noqa: E402
from benchmarks.markdown import write_section  # noqa: E402
from fedseg.config import load_config  # noqa: E402
from fedseg.files import write_json_atomic  # noqa: E402
from models.networks import build_network  # noqa: E402

PROFILES = {"segresnet": "gpu", "unet": "tiny"}
STEPS = [8, 8, 8]


def site_models(profile: str) -> list[dict[str, np.ndarray]]:
    """The profile's initial network plus a different small update at each of three sites."""
    config = load_config(profile)
    torch.manual_seed(0)
    network = build_network(config.model.name, **config.model.args)
    base = {k: v.numpy() for k, v in network.state_dict().items()}
    rng = np.random.default_rng(0)
    return [
        {
            k: v + (rng.normal(size=v.shape) * 1e-3).astype(v.dtype) if v.dtype.kind == "f" else v
            for k, v in base.items()
        }
        for _ in STEPS
    ]


def worker(model: str, pipeline: str) -> dict:
    """One pipeline on one model, in this process."""
    models = site_models(PROFILES[model])
    with tempfile.TemporaryDirectory() as folder:
        federation = prepare(Path(folder), len(models), pipeline)
        run = {"stock": stock_round, "packed": packed_round}[pipeline]
        measured = run(federation.kits, models, STEPS)
    expected = {
        k: sum(m[k].astype(np.float64) * s for m, s in zip(models, STEPS, strict=True)) / sum(STEPS)
        for k in models[0]
    }
    error = max(
        float(np.abs(measured.average[k].astype(np.float64) - expected[k]).max()) for k in expected
    )
    return {
        "params": int(sum(v.size for v in models[0].values())),
        "tensors": len(models[0]),
        "upload_bytes": measured.upload_bytes,
        "download_bytes": measured.download_bytes,
        "encrypt_seconds": measured.encrypt_seconds,
        "aggregate_seconds": measured.aggregate_seconds,
        "decrypt_seconds": measured.decrypt_seconds,
        "seconds": measured.seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "max_abs_error": error,
    }


def measure(model: str) -> dict:
    """Both pipelines on one model, each in a fresh process."""
    results = {}
    for pipeline in ("stock", "packed"):
        output = subprocess.run(
            [sys.executable, __file__, "--worker", model, pipeline],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        results[pipeline] = json.loads(output.strip().splitlines()[-1])
    stock, packed = results["stock"], results["packed"]
    float32_bytes = 4 * packed["params"]
    return {
        "model": model,
        "params": packed["params"],
        "tensors": packed["tensors"],
        "stock_bytes": stock["upload_bytes"],
        "packed_bytes": packed["upload_bytes"],
        "bytes_ratio": stock["upload_bytes"] / packed["upload_bytes"],
        "stock_bytes_per_float32": stock["upload_bytes"] / float32_bytes,
        "packed_bytes_per_float32": packed["upload_bytes"] / float32_bytes,
        "stock_download_bytes": stock["download_bytes"],
        "packed_download_bytes": packed["download_bytes"],
        "stock_seconds": stock["seconds"],
        "packed_seconds": packed["seconds"],
        "speedup": stock["seconds"] / packed["seconds"],
        "stock": stock,
        "packed": packed,
    }


def markdown(report: dict) -> str:
    rows = []
    for entry in report["models"]:
        stock, packed = entry["stock"], entry["packed"]
        rows.append(
            f"| {entry['model']} | {entry['params']:,} | "
            f"{stock['upload_bytes'] / 1e6:.1f} MB ({entry['stock_bytes_per_float32']:.1f}x) | "
            f"{packed['upload_bytes'] / 1e6:.2f} MB ({entry['packed_bytes_per_float32']:.1f}x) | "
            f"**{entry['bytes_ratio']:.1f}x** | "
            f"{stock['download_bytes'] / 1e6:.1f} / {packed['download_bytes'] / 1e6:.2f} MB | "
            f"{stock['seconds']:.2f} s | {packed['seconds']:.2f} s | **{entry['speedup']:.1f}x** | "
            f"{stock['peak_rss_mb']:.0f} / {packed['peak_rss_mb']:.0f} MB | "
            f"{stock['max_abs_error']:.1e} / {packed['max_abs_error']:.1e} |"
        )
    detail = []
    for entry in report["models"]:
        for name in ("stock", "packed"):
            r = entry[name]
            detail.append(
                f"| {entry['model']} | {name} | {r['encrypt_seconds']:.3f} | "
                f"{r['aggregate_seconds']:.3f} | {r['decrypt_seconds']:.3f} |"
            )
    return (
        "## Packed CKKS against NVFlare's stock HE filters (`benchmarks/he_packing.py`)\n\n"
        f"Measured {report['date']} on {report['machine']}; {report['versions']}.\n"
        "One FedAvg round, three sites, real filter/aggregator classes, provisioned contexts, "
        "FOBS-serialized messages; each pipeline in its own process. Upload = one site's "
        "encrypted update (in brackets: times the float32 size); download = the encrypted "
        "global model sent to a site; seconds = encrypt at one site + aggregate three + "
        "decrypt at one site; error = largest deviation of the decrypted average from the "
        "plaintext weighted average.\n\n"
        "| model | parameters | stock upload | packed upload | fewer bytes | "
        "download stock / packed | stock time | packed time | faster | peak memory "
        "stock / packed | error stock / packed |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
        + "\n".join(rows)
        + "\n\nGoal: at least 4x fewer bytes and at least 2x faster. Stages (seconds):\n\n"
        "| model | pipeline | encrypt (one site) | aggregate (three) | decrypt (one site) |\n"
        "| --- | --- | ---: | ---: | ---: |\n" + "\n".join(detail) + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model only; no files")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "PIPELINE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    models = ["unet"] if args.quick else ["unet", "segresnet"]
    report = {
        "date": __import__("datetime").date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, "
        f"{__import__('os').cpu_count()} CPUs, Python {platform.python_version()}",
        "versions": ", ".join(f"{p} {version(p)}" for p in ("nvflare", "tenseal", "torch")),
        "models": [],
    }
    for model in models:
        entry = measure(model)
        report["models"].append(entry)
        print(
            f"{model}: {entry['params']:,} parameters; upload stock {entry['stock_bytes']:,} B, "
            f"packed {entry['packed_bytes']:,} B ({entry['bytes_ratio']:.1f}x fewer); "
            f"stock {entry['stock_seconds']:.2f} s, packed {entry['packed_seconds']:.2f} s "
            f"({entry['speedup']:.1f}x faster)",
            flush=True,
        )
    if not args.quick:
        write_json_atomic(HERE / "results" / "he_packing.json", report)
        write_section(HERE / "he.md", "he_packing", markdown(report), "Homomorphic encryption")
    summary = {k: v for k, v in report["models"][-1].items() if k not in ("stock", "packed")}
    print(json.dumps({**summary, "models": report["models"]}))


if __name__ == "__main__":
    main()
