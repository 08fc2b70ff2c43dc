"""The federated segmentation job, end to end in NVFlare's simulator (real processes)."""

import importlib.metadata
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


def fedseg(*arguments: str) -> None:
    """Runs a ``fedseg`` command as a user does; fails the test with its output."""
    result = subprocess.run([FEDSEG, *arguments], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """Three hospitals from ``fedseg synth``, each turned into a dataset by ``fedseg ingest``."""
    hospitals = tmp_path_factory.mktemp("hospitals")
    fedseg("synth", "--out", str(hospitals), "--sites", "3", "--cases-per-site", "2",
           "--size", "48", "--seed", "7")  # fmt: skip
    folders = {}
    for site in ("site-1", "site-2", "site-3"):
        folders[site] = tmp_path_factory.mktemp(f"dataset-{site}")
        source = hospitals / site
        fedseg("ingest", "--input", str(source / "dicom"), "--output", str(folders[site]),
               "--manifest", str(source / "manifest.csv"))  # fmt: skip
    return folders


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
    # progress while it runs: every round validated (tiny: every_rounds 1)
    for number in (1, 2):
        assert f"round {number} of 2: 3 site(s); mean Dice of the global model" in result.stdout
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
        # each site's own model, not the global one it validated before (same model, same
        # data: the same metrics to the last digit)
        for owner in ("site-1", "site-2", "site-3"):
            assert row[owner] != row["SRV_FL_global_model.pt"], owner
    assert "Cross-site evaluation" in (workdir / "report" / "federation.html").read_text()


def test_the_job_used_the_federated_harmonization_artifact(job_run):
    workdir, _ = job_run
    artifact = json.loads((workdir / "harmonization.json").read_text())
    assert artifact["n_sites"] == 3
    for path in (workdir / "report").glob("site-*.json"):
        assert json.loads(path.read_text())["harmonization_hash"] == artifact["hash"]
    assert list((workdir / "simulation").rglob("FL_global_model.pt")), "global model persisted"


def test_the_same_run_gives_the_same_global_model_bit_for_bit(datasets, tmp_path, job_run):
    """Again, validating every other round only, with rounds sized in local epochs as long.

    Validation does not touch training; each site holds fewer training cases than a batch,
    so an epoch is one step and 8 local epochs are the first run's 8 local steps.
    """
    workdir, _ = job_run
    sites = [str(datasets[name]) for name in ("site-1", "site-2", "site-3")]
    config = json.loads((workdir / "run.yaml").read_text())
    config["validation"]["every_rounds"] = 2
    for site in ("site-1", "site-2", "site-3"):
        report = json.loads((workdir / "report" / f"{site}.json").read_text())
        assert report["data"]["training_cases"] <= config["training"]["batch_size"]
    config["training"]["local_epochs"] = config["training"]["local_steps"]
    config["training"]["local_steps"] = 1  # not read: local_epochs replaces it
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
    # nothing ties the job to this machine: the client script is found in the app's custom folder
    assert str(Path(__file__).resolve().parents[2]) not in configs
    (client_config,) = job.rglob("config_fed_client.json")
    scripts = [
        executor["executor"]["args"]["task_script_path"]
        for executor in json.loads(client_config.read_text())["executors"]
    ]
    assert scripts and all(
        not Path(script).is_absolute() and (client_config.parents[1] / "custom" / script).is_file()
        for script in scripts
    ), scripts
    shipped = {p.name for p in job.rglob("fedseg_*")}
    assert {"fedseg_run.yaml", "fedseg_harmonization.json", "fedseg_job.json",
            "fedseg_initial_model.pt"} <= shipped  # fmt: skip
    manifest = json.loads(next(job.rglob("fedseg_job.json")).read_text())
    assert manifest["fedseg_version"] == importlib.metadata.version("fedseg")  # sites check it
    # NVFlare's stock HE filters weigh by steps: the sites are told so, not left to disagree.
    assert manifest["aggregation_weight"] == ("steps" if encryption == "stock" else "cases")
    if encryption != "stock":  # the server refuses updates that declare no case weight
        server = json.loads(server_config.read_text())
        (aggregator,) = [c for c in server["components"] if c["id"] == "aggregator"]
        assert aggregator["args"]["aggregation_weight"] == "cases"
        if encryption == "none":  # cross-site evaluation waits as long as a round
            (evaluation,) = [
                w for w in server["workflows"] if w["path"].endswith("CrossSiteModelEval")
            ]
            timeout = config.federation.round_timeout
            assert evaluation["args"]["submit_model_timeout"] == timeout
            assert evaluation["args"]["validation_timeout"] == timeout
        # memory clean-up every few rounds, not after each (NVFlare's default)
        (rounds,) = [w for w in server["workflows"] if w["path"].endswith("ScatterAndGather")]
        assert rounds["args"]["memory_gc_rounds"] == SERVER_MEMORY_CLEANUP_ROUNDS > 1


def test_the_harmonization_fit_exports_and_its_result_feeds_the_job_export(job_run, tmp_path):
    """The operator's way: export the fit, submit it, download it, export the job with it."""
    workdir, _ = job_run
    run_config = str(workdir / "run.yaml")
    fedseg("harmonize", "export", "--config", run_config, "--out", str(tmp_path / "fit"))
    (fit,) = (tmp_path / "fit").iterdir()
    assert json.loads((fit / "meta.json").read_text())["min_clients"] == 2
    server = json.dumps(json.loads(next(fit.rglob("config_fed_server.json")).read_text()))
    assert "HarmonizationController" in server and '"nyul"' in server
    (client_config,) = fit.rglob("config_fed_client.json")
    (executor,) = json.loads(client_config.read_text())["executors"]
    script = executor["executor"]["args"]["task_script_path"]
    assert (client_config.parents[1] / "custom" / script).is_file(), script
    # the fit's result folder (here the simulator's) stands for its artifact
    fedseg("job", "export", "--config", run_config, "--out", str(tmp_path / "job"),
           "--harmonization", str(workdir / "simulation"))  # fmt: skip
    manifest = json.loads(next((tmp_path / "job").rglob("fedseg_job.json")).read_text())
    artifact = json.loads((workdir / "harmonization.json").read_text())
    assert manifest["harmonization_hash"] == artifact["hash"]


def test_a_configuration_without_harmonization_has_no_fit_to_export(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("harmonization:\n  method: none\n")
    result = subprocess.run(
        [FEDSEG, "harmonize", "export", "--config", str(config), "--out", str(tmp_path / "fit")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and "there is nothing to fit" in result.stderr
    assert not (tmp_path / "fit").exists()


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


def test_partial_cross_site_results_fail_naming_the_gaps(tmp_path):
    """Every site validates the global model and every local model, each with a finite Dice."""
    from jobs.runner import read_cross_site_results

    folder = tmp_path / "server" / "cross_site_val"
    folder.mkdir(parents=True)
    good = {"dice_mean": 0.5}
    matrix = {
        "site-1": {"SRV_FL_global_model.pt": good, "site-1": good, "site-2": good},
        "site-2": {"SRV_FL_global_model.pt": good, "site-1": {"dice_mean": None}},
    }
    (folder / "cross_val_results.json").write_text(json.dumps(matrix))
    with pytest.raises(RuntimeError, match="no finite Dice for site-2 on site-1, site-2 on site-2"):
        read_cross_site_results(tmp_path, ["site-1", "site-2"])
    matrix["site-2"].update({"site-1": good, "site-2": good})
    (folder / "cross_val_results.json").write_text(json.dumps(matrix))
    assert read_cross_site_results(tmp_path, ["site-1", "site-2"]) == matrix
    # a site without a usable local model submits none: its column is missing everywhere
    without_site_2 = {site: {**row} for site, row in matrix.items()}
    for row in without_site_2.values():
        del row["site-2"]
    (folder / "cross_val_results.json").write_text(json.dumps(without_site_2))
    assert read_cross_site_results(tmp_path, ["site-1", "site-2"]) == without_site_2
    # a job that trained no round has no local models: the global model alone is evaluated
    global_only = {site: {"SRV_FL_global_model.pt": good} for site in ("site-1", "site-2")}
    (folder / "cross_val_results.json").write_text(json.dumps(global_only))
    with pytest.raises(RuntimeError, match="holds no site's local model"):
        read_cross_site_results(tmp_path, ["site-1", "site-2"])
    assert read_cross_site_results(tmp_path, ["site-1", "site-2"], local_models=False)
    del global_only["site-2"]["SRV_FL_global_model.pt"]
    global_only["site-2"]["site-1"] = good
    (folder / "cross_val_results.json").write_text(json.dumps(global_only))
    with pytest.raises(RuntimeError, match=r"site-2 on SRV_FL_global_model\.pt"):
        read_cross_site_results(tmp_path, ["site-1", "site-2"], local_models=False)


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


def test_resuming_into_the_simulation_that_holds_the_interrupted_run_is_refused(datasets, job_run):
    """The simulator clears its job folder first: the interrupted run's logs would be lost."""
    workdir, _ = job_run
    (manifest,) = (workdir / "simulation").rglob(
        "server/simulate_job/app_server/custom/fedseg_job.json"
    )
    run_folder = manifest.parents[2]
    sites = [a for name in ("site-1", "site-2", "site-3") for a in ("--site", str(datasets[name]))]
    result = subprocess.run(
        [FEDSEG, "job", "resume", str(run_folder), *sites, "--workdir", str(workdir)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and "which the simulator clears" in result.stderr
    assert manifest.is_file()


def test_a_workdir_the_simulator_cannot_run_in_is_refused_before_any_work(datasets, tmp_path):
    workdir = tmp_path / "results #1"
    sites = [a for name in ("site-1", "site-2") for a in ("--site", str(datasets[name]))]
    result = subprocess.run(
        [FEDSEG, "job", "run", "--config", "tiny", *sites, "--workdir", str(workdir)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and "choose a --workdir without them" in result.stderr
    assert "' '" in result.stderr and "'#'" in result.stderr and not workdir.exists()


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
    # it trained no round, so its sites hold no local model: the global model alone is evaluated
    assert all(set(row) == {"SRV_FL_global_model.pt"} for row in federation["cross_site"].values())
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
