"""The federated segmentation job, end to end in NVFlare's simulator (real processes)."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from app_server.global_model import CHECKPOINT_FILE, PLAINTEXT_MODEL_FILE, PLAINTEXT_MOMENTS_FILE
from app_server.site_reports import SITE_REPORTS_FILE
from app_site.he_filters import AUDIT_FILE
from fedseg.config import load_config
from fedseg.moments import zero_moments
from jobs.resume import ResumeError, find_resume_point
from jobs.runner import export_job
from jobs.segmentation import SERVER_MEMORY_CLEANUP_ROUNDS
from models.networks import build_network

FEDSEG = str(Path(sys.executable).with_name("fedseg"))


@pytest.fixture(scope="module")
def job_run(datasets, tmp_path_factory):
    """synth -> ingest -> federated harmonization fit -> 2 FedAvg rounds."""
    workdir = tmp_path_factory.mktemp("job")
    sites = [str(datasets[name]) for name in ("site-1", "site-2", "site-3")]
    config = workdir / "run.yaml"
    tiny = load_config("tiny").to_dict()
    tiny["harmonization"]["min_images"] = 2
    config.write_text(json.dumps(tiny))  # JSON is YAML
    result = subprocess.run(
        [FEDSEG, "job", "run", "--config", str(config), *[a for s in sites for a in ("--site", s)],
         "--workdir", str(workdir)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    return workdir, result


def test_every_site_reports_finite_metrics_for_every_round(job_run):
    workdir, result = job_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reports = sorted((workdir / "report").glob("site-*.json"))
    assert [p.stem for p in reports] == ["site-1", "site-2", "site-3"]
    for path in reports:
        report = json.loads(path.read_text())
        assert [r["round"] for r in report["rounds"]] == [0, 1]
        for entry in report["rounds"]:
            assert all(math.isfinite(v) for k, v in entry["metrics"].items() if "dice" in k)
            assert entry["train_steps"] == 8 and math.isfinite(entry["train_loss"])
            # Weighted by its training cases (the profiles' aggregation_weight).
            assert entry["aggregation_weight"] == report["data"]["training_cases"]
        assert report["device"] == "cpu"
        assert report["data"]["validation_cases"] >= 1
        assert report["summary"]["model"] == "final global model"
        assert all(math.isfinite(v) for k, v in report["final"]["metrics"].items() if "dice" in k)
        page = (workdir / "report" / f"{path.stem}.html").read_text()
        assert f"{report['summary']['metrics']['dice_WT']:.3f}" in page
    federation = json.loads((workdir / "report" / "federation.json").read_text())
    assert (
        federation["sites"] == ["site-1", "site-2", "site-3"] and federation["mode"] == "plaintext"
    )
    assert federation["round_contributors"] == {"0": federation["sites"], "1": federation["sites"]}
    assert (workdir / "report" / "federation.html").is_file()


def test_reported_cases_go_under_pseudonyms_only_their_site_resolves(datasets, job_run):
    """Not the dataset's case ids (hashes of series UIDs): keyed with a key kept at the site."""
    workdir, _ = job_run
    for site in ("site-1", "site-2", "site-3"):
        datalist = json.loads((datasets[site] / "datalist.json").read_text())
        validation = {case["case_id"] for case in datalist["validation"]}
        report = json.loads((workdir / "report" / f"{site}.json").read_text())
        reported = {case["case_id"] for case in report["summary"]["cases"]}
        assert len(reported) == len(validation) and not reported & validation
        (own_file,) = (workdir / "simulation").rglob(f"fedseg_metrics_{site}.json")
        own = json.loads(own_file.read_text())
        assert {own["report_ids"][pseudonym] for pseudonym in reported} == validation
        assert {case["case_id"] for case in own["final"]["cases"]} == validation
        assert "report_ids" not in report


def test_cross_site_evaluation_covers_every_model_on_every_site(job_run):
    workdir, _ = job_run
    matrix = json.loads((workdir / "report" / "federation.json").read_text())["cross_site"]
    assert sorted(matrix) == ["site-1", "site-2", "site-3"]
    for row in matrix.values():
        assert {"SRV_FL_global_model.pt", "site-1", "site-2", "site-3"} <= set(row)
        assert all(0.0 <= metrics["dice_mean"] <= 1.0 for metrics in row.values())
    assert "Cross-site evaluation" in (workdir / "report" / "federation.html").read_text()


def test_the_job_used_the_federated_harmonization_artifact(job_run):
    workdir, _ = job_run
    artifact = json.loads((workdir / "harmonization.json").read_text())
    assert artifact["n_sites"] == 3
    for path in (workdir / "report").glob("site-*.json"):
        assert json.loads(path.read_text())["harmonization_hash"] == artifact["hash"]
    assert list((workdir / "simulation").rglob("FL_global_model.pt")), "global model persisted"


def test_the_same_run_gives_the_same_global_model_bit_for_bit(datasets, tmp_path, job_run):
    """Again, validating every other round only: validation does not touch training."""
    workdir, _ = job_run
    sites = [str(datasets[name]) for name in ("site-1", "site-2", "site-3")]
    config = json.loads((workdir / "run.yaml").read_text())
    config["validation"]["every_rounds"] = 2
    (tmp_path / "run.yaml").write_text(json.dumps(config))
    again = subprocess.run(
        [FEDSEG, "job", "run", "--config", str(tmp_path / "run.yaml"),
         *[a for s in sites for a in ("--site", s)], "--workdir", str(tmp_path),
         "--harmonization", str(workdir / "harmonization.json")],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    first, second = (
        torch.load(next(w.rglob("app_server/FL_global_model.pt")), weights_only=True)
        for w in (workdir / "simulation", tmp_path / "simulation")
    )
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    for site in ("site-1", "site-2", "site-3"):
        report = json.loads((tmp_path / "report" / f"{site}.json").read_text())
        validated, skipped = report["rounds"]
        assert validated["metrics"]["dice_mean"] >= 0 and validated["cases"]
        assert skipped["metrics"] is None and skipped["cases"] == []
        assert skipped["train_steps"] == 8 and report["final"]["metrics"]
    curves = json.loads((tmp_path / "report" / "federation.json").read_text())["curves"]
    assert all([point["round"] for point in curve] == [0] for curve in curves.values())


def test_sites_share_their_adamw_moments_and_the_model_file_holds_the_network(job_run):
    workdir, _ = job_run
    network = build_network("unet", **load_config("tiny").model.args)
    server = next((workdir / "simulation").rglob(f"app_server/{PLAINTEXT_MODEL_FILE}")).parent
    network.load_state_dict(torch.load(server / PLAINTEXT_MODEL_FILE, weights_only=True))
    moments = torch.load(server / PLAINTEXT_MOMENTS_FILE, weights_only=True)
    assert moments.keys() == zero_moments(network).keys()
    assert all(bool((v >= 0).all() and v.isfinite().all()) for v in moments.values())
    assert sum(int((v > 0).sum()) for v in moments.values()) > 0.9 * sum(
        v.numel() for v in moments.values()
    ), "the global model carries the sites' averaged gradient RMS"
    audits = sorted((workdir / "simulation").rglob(AUDIT_FILE))
    assert len(audits) == 3
    for audit in audits:
        records = [json.loads(line) for line in audit.read_text().splitlines()]
        train = [r for r in records if r["task"] == "train"]
        assert len(train) == 2 and all(r["kind"] == "WEIGHT_DIFF" for r in train)
        assert all(set(moments) < set(r["data"]) for r in train), "each update carried them"


def test_a_site_refuses_an_altered_artifact(datasets, tmp_path, job_run):
    workdir, _ = job_run
    altered = json.loads((workdir / "harmonization.json").read_text())
    altered["standard_scale"][4] += 1.0
    (tmp_path / "altered.json").write_text(json.dumps(altered))
    result = subprocess.run(
        [FEDSEG, "job", "run", "--config", "tiny", "--site", str(datasets["site-1"]),
         "--site", str(datasets["site-2"]), "--workdir", str(tmp_path / "w"),
         "--harmonization", str(tmp_path / "altered.json")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2 and "it was altered" in result.stderr
    assert not (tmp_path / "w" / "simulation").exists(), "refused before any training"


@pytest.mark.parametrize(
    ("encryption", "components"),
    [
        ("packed", ["PackedHEAggregator", "GlobalModelPersistor", "PackedHEEncryptor"]),
        ("stock", ["HEInTimeAccumulateWeightedAggregator", "HEModelEncryptor"]),
        ("none", ["PlaintextAggregator", "GlobalModelLocator", "CrossSiteModelEval"]),
    ],
)
def test_exported_job_folder(tmp_path, job_run, encryption, components):
    workdir, _ = job_run
    config = load_config(workdir / "run.yaml")
    assert config.training.aggregation_weight == "cases"
    job = export_job(config, tmp_path / "export", workdir / "harmonization.json", encryption)
    meta = json.loads((job / "meta.json").read_text())
    assert meta["min_clients"] == 2
    configs = json.dumps([json.loads(p.read_text()) for p in job.rglob("config_fed_*.json")])
    assert all(name in configs for name in components)
    assert "SiteReportFilter" in configs and "OutgoingAudit" in configs
    assert ("FinalValidation" in configs) == (encryption != "stock")
    (server_config,) = job.rglob("config_fed_server.json")
    interval = json.loads(server_config.read_text())["server"]["task_request_interval"]
    assert interval == load_config("tiny").federation.task_request_interval == 0.2
    shipped = {p.name for p in job.rglob("fedseg_*")}
    assert {"fedseg_run.yaml", "fedseg_harmonization.json", "fedseg_job.json",
            "fedseg_initial_model.pt"} <= shipped  # fmt: skip
    manifest = json.loads(next(job.rglob("fedseg_job.json")).read_text())
    # NVFlare's stock HE filters weigh by steps: the sites are told so, not left to disagree.
    assert manifest["aggregation_weight"] == ("steps" if encryption == "stock" else "cases")
    if encryption != "stock":  # the server refuses updates that declare no case weight
        server = json.loads(server_config.read_text())
        (aggregator,) = [c for c in server["components"] if c["id"] == "aggregator"]
        assert aggregator["args"]["aggregation_weight"] == "cases"
        # memory clean-up every few rounds, not after each (NVFlare's default)
        (rounds,) = [w for w in server["workflows"] if w["path"].endswith("ScatterAndGather")]
        assert rounds["args"]["memory_gc_rounds"] == SERVER_MEMORY_CLEANUP_ROUNDS > 1


def test_empty_cross_site_results_fail_loudly(tmp_path):
    from jobs.runner import read_cross_site_results

    with pytest.raises(RuntimeError, match="no cross-site evaluation results"):
        read_cross_site_results(tmp_path, ["site-1"])
    folder = tmp_path / "server" / "cross_site_val"
    folder.mkdir(parents=True)
    (folder / "cross_val_results.json").write_text("{}")  # what NVFlare writes when CSE fails
    with pytest.raises(RuntimeError, match="no results for site-1, site-2"):
        read_cross_site_results(tmp_path, ["site-1", "site-2"])
    (folder / "cross_val_results.json").write_text(json.dumps({"site-1": {"site-1": {}}}))
    with pytest.raises(RuntimeError, match="no results for site-1, site-2"):
        read_cross_site_results(tmp_path, ["site-1", "site-2"])


def server_run_copy(job_run, destination):
    """A copy of the finished job's server run folder, to stage what a crash leaves behind."""
    workdir, _ = job_run
    (manifest,) = (workdir / "simulation").rglob(
        "server/simulate_job/app_server/custom/fedseg_job.json"
    )
    shutil.copytree(manifest.parents[2], destination)
    return destination


def remove_final_validation(run_folder, failures=()):
    """Stages a server that stopped before its sites' final validation arrived."""
    reports = run_folder / SITE_REPORTS_FILE
    content = json.loads(reports.read_text())
    for document in content["sites"].values():
        document["final"] = None
    if failures:
        content["failures"] = list(failures)
    reports.write_text(json.dumps(content))


def test_a_completed_job_has_nothing_to_resume(job_run, tmp_path):
    run_folder = server_run_copy(job_run, tmp_path / "run")
    result = subprocess.run(
        [FEDSEG, "job", "resume", str(run_folder), "--out", str(tmp_path / "job")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    assert "completed all 2 rounds and its final validation" in result.stderr
    assert not (tmp_path / "job").exists()


def test_a_global_model_that_no_longer_matches_its_checkpoint_is_refused(job_run, tmp_path):
    run_folder = server_run_copy(job_run, tmp_path / "run")
    with open(run_folder / "app_server" / PLAINTEXT_MODEL_FILE, "ab") as model:
        model.write(b"\0")
    with pytest.raises(ResumeError, match="does not match its checkpoint record"):
        find_resume_point(run_folder)


def test_a_server_stopped_between_record_and_model_resumes_at_the_model_on_disk(job_run, tmp_path):
    """The record of round 2 was written, the server died before the model replaced round 1's."""
    run_folder = server_run_copy(job_run, tmp_path / "run")
    record_path = run_folder / "app_server" / CHECKPOINT_FILE
    record = json.loads(record_path.read_text())
    assert record["round"] == 1
    previous = {k: record[k] for k in ("round", "sha256", "moments_sha256")}
    ahead = {**record, "round": 2, "sha256": "0" * 64, "moments_sha256": "0" * 64}
    record_path.write_text(json.dumps({**ahead, "previous": previous}))
    remove_final_validation(run_folder)
    point = find_resume_point(run_folder)
    assert point.next_round == 2
    assert point.moments == run_folder / "app_server" / PLAINTEXT_MOMENTS_FILE


def test_moments_that_do_not_match_the_checkpoint_record_are_not_resumed(job_run, tmp_path):
    """The server died after replacing the model and before replacing its moments."""
    run_folder = server_run_copy(job_run, tmp_path / "run")
    moments_path = run_folder / "app_server" / PLAINTEXT_MOMENTS_FILE
    moments = torch.load(moments_path, weights_only=True)
    torch.save({key: value * 2 for key, value in moments.items()}, moments_path)
    remove_final_validation(run_folder)
    point = find_resume_point(run_folder)
    assert point.next_round == 2 and point.moments is None


def test_a_job_stopped_during_its_final_validation_resumes_with_only_that_left(
    datasets, job_run, tmp_path
):
    """The server died after the last round: its reports hold every round but no final one."""
    run_folder = server_run_copy(job_run, tmp_path / "run")
    remove_final_validation(run_folder, failures=["the server stopped"])
    sites = [str(datasets[name]) for name in ("site-1", "site-2", "site-3")]
    result = subprocess.run(
        [FEDSEG, "job", "resume", str(run_folder), *[a for s in sites for a in ("--site", s)],
         "--workdir", str(tmp_path / "resumed")],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = tmp_path / "resumed" / "report"
    federation = json.loads((report / "federation.json").read_text())
    every_site = ["site-1", "site-2", "site-3"]
    assert federation["round_contributors"] == {"0": every_site, "1": every_site}
    (resumption,) = federation["resumptions"]
    assert resumption["next_round"] == 2 and resumption["dropped_rounds"] == []
    assert resumption["failures"] == ["the server stopped"]
    for site in ("site-1", "site-2", "site-3"):
        document = json.loads((report / f"{site}.json").read_text())
        assert [r["round"] for r in document["rounds"]] == [0, 1]
        assert math.isfinite(document["final"]["metrics"]["dice_WT"])
    assert "Resumed after an interruption" in (report / "federation.html").read_text()
    before, after = (
        torch.load(next(w.rglob(f"app_server/{PLAINTEXT_MODEL_FILE}")), weights_only=True)
        for w in (run_folder, tmp_path / "resumed" / "simulation")
    )
    assert all(torch.equal(before[key], after[key]) for key in before), "no round was trained again"
    moments_before, moments_after = (
        torch.load(next(w.rglob(f"app_server/{PLAINTEXT_MOMENTS_FILE}")), weights_only=True)
        for w in (run_folder, tmp_path / "resumed" / "simulation")
    )
    assert moments_before.keys() == moments_after.keys()
    assert all(torch.equal(moments_before[k], moments_after[k]) for k in moments_before)
    assert any(bool(value.any()) for value in moments_after.values()), "not restarted from zeros"
