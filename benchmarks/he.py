"""Benchmark: plaintext FedAvg against FedAvg with HE in a real local federation.

The same segmentation job (same model, data, harmonization artifact, initial weights and
rounds) runs three times on three simulated hospitals in real NVFlare processes, submitted
through the admin API: plaintext, packed CKKS (fedseg's default) and NVFlare's stock HE
filters (in a federation provisioned with their parameters). Measured:

- round time: the interval between the last update of one round reaching the server and the
  last update of the next (from the server's site reports), mean over rounds after the first;
- bytes each site uploads per round: the training result's model payload as the site's audit
  filter saw it leave (ciphertext bytes; for stock, each tensor's ciphertext plus the context
  NVFlare serializes with it; for plaintext, the arrays' bytes);
- server peak memory: the largest resident set of the server and its job processes, sampled
  every 0.2 s during the job;
- the final global model's mean Dice at each site.

Usage: python benchmarks/he.py [--rounds R] [--quick]     (--quick: 2 rounds, no files)
Writes benchmarks/results/he.json and its section of benchmarks/he.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from importlib.metadata import version
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from app_server import federation as poc  # noqa: E402
from app_site.he_filters import AUDIT_FILE  # noqa: E402
from app_site.ingest.pipeline import IngestOptions, ingest  # noqa: E402
from benchmarks.markdown import write_section  # noqa: E402
from fedseg.config import config_from_dict, load_config  # noqa: E402
from fedseg.files import write_json_atomic  # noqa: E402
from fedseg.synth.hospitals import SynthConfig, synthesize_hospitals  # noqa: E402
from jobs.runner import run_in_federation  # noqa: E402
from models.networks import build_network  # noqa: E402

MODES = ("none", "packed", "stock")


class MemorySampler:
    """Samples the resident set of a process and all its descendants in a thread."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.pid, self.interval, self.peak_mb = pid, interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, _tree_rss_mb(self.pid))


def _tree_rss_mb(root: int) -> float:
    parents, rss = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        parents[int(entry)] = int(fields["PPid"])
        rss[int(entry)] = int(fields.get("VmRSS", "0 kB").split()[0]) / 1024
    tree, frontier = {root}, [root]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier and p not in tree]
        tree.update(children)
        frontier = children
    return sum(rss.get(p, 0.0) for p in tree)


def hospitals(folder: Path) -> dict[str, Path]:
    """Three simulated hospitals, ingested."""
    sites = synthesize_hospitals(
        SynthConfig(out=folder / "hospitals", sites=3, cases_per_site=4, size=48, seed=3),
        workers=2,
    )
    datasets = {}
    for site in sites:
        output = folder / "datasets" / site.name
        ingest(
            IngestOptions(
                source=folder / "hospitals" / site.name / "dicom",
                output=output,
                manifest=folder / "hospitals" / site.name / "manifest.csv",
            )
        )
        datasets[site.name] = output
    return datasets


def measure(federation, config, workdir: Path, artifact: Path | None, mode: str) -> dict:
    """One job in a running federation, with its measurements."""
    server_pid = poc.running_processes(federation)["server"]
    started = time.monotonic()
    with MemorySampler(server_pid) as memory:
        report = run_in_federation(federation, config, workdir, artifact, mode)
    wall = time.monotonic() - started
    collected = json.loads(
        next((workdir / "segmentation").rglob("fedseg_site_reports.json")).read_text()
    )
    rounds = sorted({r["round"] for d in collected["sites"].values() for r in d["rounds"]})
    last_arrival = {
        n: max(
            r["received_at"]
            for d in collected["sites"].values()
            for r in d["rounds"]
            if r["round"] == n
        )
        for n in rounds
    }
    durations = [last_arrival[n] - last_arrival[n - 1] for n in rounds[1:]]
    job_id = next((workdir / "segmentation" / "result").iterdir()).name
    uploads = []
    for site in federation.sites:
        audit = federation.kit(site) / job_id / AUDIT_FILE
        for line in audit.read_text().splitlines():
            record = json.loads(line)
            if record["task"] == "train":
                uploads.append(
                    sum(
                        v.get("bytes", 0) + v.get("context_bytes", 0)
                        for v in record["data"].values()
                    )
                )
    finals = {}
    for path in sorted(report.glob("site-*.json")):
        document = json.loads(path.read_text())
        finals[document["site"]] = document["summary"]["metrics"]["dice_mean"]
    return {
        "mode": mode,
        "job_seconds": wall,
        "round_seconds": sum(durations) / len(durations),
        "upload_bytes_per_site_round": sum(uploads) / len(uploads),
        "server_peak_rss_mb": memory.peak_mb,
        "final_dice_mean": finals,
    }


def markdown(report: dict) -> str:
    plain = report["modes"]["none"]
    rows = []
    for mode, name in (("none", "plaintext"), ("packed", "packed CKKS"), ("stock", "stock HE")):
        r = report["modes"][mode]
        dice = ", ".join(f"{v:.3f}" for v in r["final_dice_mean"].values())
        rows.append(
            f"| {name} | {r['round_seconds']:.1f} s | "
            f"{r['round_seconds'] / plain['round_seconds']:.2f}x | "
            f"{r['upload_bytes_per_site_round'] / 1e6:.3f} MB | "
            f"{r['upload_bytes_per_site_round'] / plain['upload_bytes_per_site_round']:.1f}x | "
            f"{r['server_peak_rss_mb']:.0f} MB | {r['job_seconds']:.0f} s | {dice} |"
        )
    return (
        "## Plaintext against HE FedAvg in a local federation (`benchmarks/he.py`)\n\n"
        f"Measured {report['date']} on {report['machine']}; {report['versions']}. "
        f"{report['sites']} sites on one machine, {report['rounds']} rounds of the `tiny` profile "
        f"({report['params']:,} parameters), same data, artifact and initial weights in every "
        "mode; jobs submitted through the admin API. Round time: between the last updates of "
        "consecutive rounds reaching the server; upload: the model payload one site sends per "
        "round; server memory: peak resident set of the server and its job process.\n\n"
        "| mode | round time | vs plaintext | upload per site per round | vs plaintext | "
        "server peak memory | job wall time | final mean Dice per site |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n" + "\n".join(rows) + "\n\n"
        "All sites share the machine's cores here, so round time is dominated by local "
        "training; the cost of encryption at the tiny model's size is small next to it. Job "
        "wall time includes the plaintext job's cross-site evaluation (every site's model at "
        "every site), which encrypted jobs cannot run. Per-round costs at SegResNet's size: "
        "the `he_packing` section above.\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="2 rounds, no files written")
    args = parser.parse_args()
    rounds = 2 if args.quick else args.rounds
    document = load_config("tiny").to_dict()
    document["training"]["rounds"] = rounds
    config = config_from_dict(document)
    with tempfile.TemporaryDirectory(prefix="fedseg-he-bench-") as folder:
        root = Path(folder)
        os.environ["HOME"] = str(root)  # NVFlare must not write to the operator's home
        datasets = hospitals(root)
        results, artifact = {}, None
        for provisioned, modes in (("packed", ("none", "packed")), ("stock", ("stock",))):
            federation = poc.prepare(root / f"federation-{provisioned}", 3, provisioned, datasets)
            poc.start(federation)
            try:
                for mode in modes:
                    results[mode] = measure(federation, config, root / mode, artifact, mode)
                    artifact = artifact or root / mode / "harmonization.json"
                    print(json.dumps(results[mode]), flush=True)
            finally:
                poc.stop(federation)
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
        "versions": ", ".join(f"{p} {version(p)}" for p in ("nvflare", "tenseal", "torch")),
        "sites": 3,
        "rounds": rounds,
        "params": _parameter_count(config),
        "modes": results,
        "round_time_ratio": {
            m: results[m]["round_seconds"] / results["none"]["round_seconds"] for m in MODES
        },
    }
    if not args.quick:
        write_json_atomic(HERE / "results" / "he.json", report)
        write_section(HERE / "he.md", "he_federation", markdown(report), "Homomorphic encryption")
    print(json.dumps(report))


def _parameter_count(config) -> int:
    return sum(
        p.numel() for p in build_network(config.model.name, **config.model.args).parameters()
    )


if __name__ == "__main__":
    main()
