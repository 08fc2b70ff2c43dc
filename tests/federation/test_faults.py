"""Faults and hostile input in real NVFlare runs: broken data, broken updates, tampered jobs."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.app_constant import AppConstants

from app_server.aggregation import PlaintextAggregator, RoundTooSmall
from app_server.site_reports import SITE_REPORTS_FILE
from benchmarks.he_pipelines import LocalEngine
from fedseg.config import config_from_dict, load_config
from fedseg.messages import AGGREGATION_WEIGHT_META_KEY
from fedseg.moments import moment_name
from jobs.runner import export_job, run_job
from models.networks import build_network

pytestmark = pytest.mark.slow


def plain_config(**federation) -> object:
    document = load_config("tiny").to_dict()
    document["harmonization"]["method"] = "none"
    document["federation"] = {"straggler_seconds": 30, "round_timeout": 300, **federation}
    return config_from_dict(document)


def corrupt_copy(dataset, folder):
    """A copy of a dataset whose training images turned into NaN after ingestion."""
    shutil.copytree(dataset, folder)
    datalist = json.loads((folder / "datalist.json").read_text())
    for entry in datalist["training"]:
        path = folder / entry["image"]
        image = nib.load(path)
        broken = np.full(image.shape, np.nan, dtype=np.float32)
        nib.save(nib.Nifti1Image(broken, image.affine), path)
    return folder


def test_a_site_with_corrupt_data_refuses_its_update_and_the_rounds_go_on(datasets, tmp_path):
    sites = [
        datasets["site-1"],
        datasets["site-2"],
        corrupt_copy(datasets["site-3"], tmp_path / "d3"),
    ]
    report = run_job(plain_config(), sites, tmp_path / "run")
    federation = json.loads((report / "federation.json").read_text())
    refusals = federation["refusals"]
    assert {r["site"] for r in refusals} == {"site-3"} and {r["round"] for r in refusals} == {0, 1}
    assert all(
        "refused at the site: non-finite values after training" in r["reason"] for r in refusals
    )
    assert federation["round_contributors"] == {
        "0": ["site-1", "site-2"],
        "1": ["site-1", "site-2"],
    }
    page = (report / "federation.html").read_text()
    assert "Refused updates" in page and "non-finite values after training" in page
    # every update of site-3 was refused: it has no local model for cross-site evaluation
    models = {"SRV_FL_global_model.pt", "site-1", "site-2"}
    assert all(set(row) == models for row in federation["cross_site"].values())
    assert "No local model from site-3" in page
    site_3 = json.loads((report / "site-3.json").read_text())
    assert site_3["final"] is not None, "the site still validated the final global model"
    for site in ("site-1", "site-2"):
        final = json.loads((report / f"{site}.json").read_text())["final"]["metrics"]
        assert np.isfinite(final["dice_WT"]), "the global model stayed finite"


def server_context(root, round_number=0):
    fl_ctx = FLContext()
    engine = LocalEngine(root, [f"site-{n}" for n in range(1, 5)])
    fl_ctx.set_prop(ReservedKey.ENGINE, engine, private=True, sticky=False)
    fl_ctx.set_prop(ReservedKey.RUN_NUM, "job", private=False, sticky=False)
    fl_ctx.set_prop(AppConstants.CURRENT_ROUND, round_number, private=True, sticky=False)
    return fl_ctx


def submit(aggregator, fl_ctx, site, update, steps=8, weight=None):
    peer = FLContext()
    peer.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=False)
    fl_ctx.set_peer_context(peer)
    meta = {MetaKey.NUM_STEPS_CURRENT_ROUND: steps}
    if weight is not None:
        meta[AGGREGATION_WEIGHT_META_KEY] = weight
    shareable = DXO(DataKind.WEIGHT_DIFF, update, meta).to_shareable()
    shareable.add_cookie(
        AppConstants.CONTRIBUTION_ROUND, fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
    )
    return aggregator.accept(shareable, fl_ctx)


def test_the_outlier_rule_judges_the_weights_not_the_shared_moments(tmp_path):
    """Late in a poly schedule the weights barely move while a site's gradient RMS still can."""
    aggregator = PlaintextAggregator(min_sites=2, outlier_factor=10.0)
    fl_ctx = server_context(tmp_path)
    aggregator.reset(fl_ctx)
    rng = np.random.default_rng(1)
    for site, moments in (("site-1", 1e-4), ("site-2", 1e-4), ("site-3", 1.0)):
        update = {"w": rng.normal(size=50) * 1e-4, moment_name("w"): np.full(50, moments)}
        assert submit(aggregator, fl_ctx, site, update)
    aggregator.aggregate(fl_ctx)  # site-3's moments moved 10000 times more: not an outlier
    stored = json.loads(next(tmp_path.rglob(SITE_REPORTS_FILE)).read_text())
    assert stored["round_contributors"] == {"0": ["site-1", "site-2", "site-3"]}
    assert stored["refusals"] == []
    aggregator.reset(fl_ctx)
    for site, scale in (("site-1", 1e-4), ("site-2", 1e-4), ("site-3", 1.0)):
        update = {"w": rng.normal(size=50) * scale, moment_name("w"): np.full(50, 1e-4)}
        assert submit(aggregator, fl_ctx, site, update)
    aggregator.aggregate(fl_ctx)
    (refusal,) = json.loads(next(tmp_path.rglob(SITE_REPORTS_FILE)).read_text())["refusals"]
    assert refusal["site"] == "site-3" and "weight update norm" in refusal["reason"]
    assert "with shared moments" in refusal["reason"]


def test_the_server_refuses_non_finite_and_outlier_updates_in_a_plaintext_job(tmp_path):
    aggregator = PlaintextAggregator(min_sites=2, outlier_factor=10.0)
    fl_ctx = server_context(tmp_path)
    aggregator.reset(fl_ctx)
    rng = np.random.default_rng(0)
    honest = [{"w": rng.normal(size=50) * 0.01} for _ in range(2)]
    assert submit(aggregator, fl_ctx, "site-1", honest[0])
    assert submit(aggregator, fl_ctx, "site-2", honest[1], steps=4)
    assert not submit(aggregator, fl_ctx, "site-3", {"w": np.full(50, np.nan)})
    assert submit(aggregator, fl_ctx, "site-4", {"w": honest[0]["w"] * 1000})  # judged at the end
    mean = from_shareable(aggregator.aggregate(fl_ctx)).data["w"]
    np.testing.assert_allclose(mean, (honest[0]["w"] * 8 + honest[1]["w"] * 4) / 12)
    stored = json.loads(next(tmp_path.rglob(SITE_REPORTS_FILE)).read_text())
    reasons = {r["site"]: r["reason"] for r in stored["refusals"]}
    assert "non-finite values in w" in reasons["site-3"]
    assert "over 10 times the median" in reasons["site-4"]
    assert stored["round_contributors"] == {"0": ["site-1", "site-2"]}
    # A straggler's update that arrives once its round was aggregated is refused for its round.
    aggregator.reset(fl_ctx)
    fl_ctx.set_prop(AppConstants.CURRENT_ROUND, 1, private=True, sticky=False)
    late = DXO(DataKind.WEIGHT_DIFF, honest[0], {MetaKey.NUM_STEPS_CURRENT_ROUND: 8})
    late = late.to_shareable()
    late.add_cookie(AppConstants.CONTRIBUTION_ROUND, 0)
    assert not aggregator.accept(late, fl_ctx)
    (straggler,) = json.loads(next(tmp_path.rglob(SITE_REPORTS_FILE)).read_text())["refusals"][2:]
    assert straggler["site"] == "site-4" and straggler["round"] == 0
    assert "after its round was aggregated without it" in straggler["reason"]
    # A round with fewer usable updates than the minimum fails, naming who sent nothing.
    fl_ctx.set_prop(AppConstants.CURRENT_ROUND, 0, private=True, sticky=False)
    aggregator.reset(fl_ctx)
    assert submit(aggregator, fl_ctx, "site-1", honest[0])
    with pytest.raises(RoundTooSmall, match=r"1 usable update\(s\) \(site-1\), the job needs 2"):
        aggregator.aggregate(fl_ctx)


def test_a_declared_aggregation_weight_replaces_the_step_count(tmp_path):
    aggregator = PlaintextAggregator(min_sites=2, outlier_factor=10.0)
    fl_ctx = server_context(tmp_path)
    aggregator.reset(fl_ctx)
    updates = {"site-1": {"w": np.full(4, 1.0)}, "site-2": {"w": np.full(4, 4.0)}}
    assert submit(aggregator, fl_ctx, "site-1", updates["site-1"], weight=22 * 8)
    assert submit(aggregator, fl_ctx, "site-2", updates["site-2"], weight=14 * 8)
    mean = from_shareable(aggregator.aggregate(fl_ctx)).data["w"]
    np.testing.assert_allclose(mean, (1.0 * 22 + 4.0 * 14) / 36)  # cases, not equal steps
    aggregator.reset(fl_ctx)
    assert not submit(aggregator, fl_ctx, "site-1", updates["site-1"], weight=0)
    stored = json.loads(next(tmp_path.rglob(SITE_REPORTS_FILE)).read_text())
    assert "no positive aggregation weight" in stored["refusals"][-1]["reason"]


def test_a_job_weighted_by_cases_refuses_an_update_weighted_only_by_its_steps(tmp_path):
    aggregator = PlaintextAggregator(min_sites=2, outlier_factor=10.0, aggregation_weight="cases")
    fl_ctx = server_context(tmp_path)
    aggregator.reset(fl_ctx)
    updates = {n: {"w": np.full(4, float(n))} for n in (1, 2, 3)}
    assert submit(aggregator, fl_ctx, "site-1", updates[1], weight=22)
    assert submit(aggregator, fl_ctx, "site-2", updates[2], weight=14)
    assert not submit(aggregator, fl_ctx, "site-3", updates[3], steps=20)  # an older site
    mean = from_shareable(aggregator.aggregate(fl_ctx)).data["w"]
    np.testing.assert_allclose(mean, (1.0 * 22 + 2.0 * 14) / 36)
    stored = json.loads(next(tmp_path.rglob(SITE_REPORTS_FILE)).read_text())
    (refusal,) = stored["refusals"]
    assert refusal["site"] == "site-3"
    assert "declares no weight" in refusal["reason"] and "upgrade fedseg" in refusal["reason"]


def test_an_outlier_refusal_in_a_job_sharing_moments_says_what_to_do(tmp_path):
    aggregator = PlaintextAggregator(min_sites=2, outlier_factor=10.0)
    fl_ctx = server_context(tmp_path)
    aggregator.reset(fl_ctx)
    moment = moment_name("w")
    updates = [{"w": np.full(8, scale), moment: np.full(8, scale)} for scale in (0.01, 0.01, 1.0)]
    for number, update in enumerate(updates, start=1):
        assert submit(aggregator, fl_ctx, f"site-{number}", update)
    aggregate = from_shareable(aggregator.aggregate(fl_ctx)).data
    np.testing.assert_allclose(aggregate[moment], 0.01)  # averaged with the weights
    stored = json.loads(next(tmp_path.rglob(SITE_REPORTS_FILE)).read_text())
    (refusal,) = stored["refusals"]
    assert refusal["site"] == "site-3" and "harmonize the sites' intensities" in refusal["reason"]


def test_the_global_model_does_not_depend_on_the_order_updates_arrive_in(tmp_path):
    rng = np.random.default_rng(1)
    updates = {f"site-{n}": {"w": rng.normal(size=4096).astype(np.float32)} for n in (1, 2, 3)}
    means = []
    for order in (("site-1", "site-2", "site-3"), ("site-3", "site-1", "site-2")):
        aggregator = PlaintextAggregator(min_sites=3, outlier_factor=10.0)
        fl_ctx = server_context(tmp_path / "-".join(order))
        aggregator.reset(fl_ctx)
        for site in order:
            assert submit(aggregator, fl_ctx, site, updates[site], steps=int(site[-1]) + 2)
        means.append(from_shareable(aggregator.aggregate(fl_ctx)).data["w"])
    assert means[0].tobytes() == means[1].tobytes()
    assert means[0].dtype == np.float32, "the global model keeps the sites' precision"


def run_exported(job, datasets, workspace):
    """Runs an exported job folder in NVFlare's simulator (real processes)."""
    environment = {**os.environ}
    for n in (1, 2, 3):
        environment[f"FEDSEG_DATASET_SITE_{n}"] = str(datasets[f"site-{n}"])
    nvflare = str(Path(sys.executable).with_name("nvflare"))
    return subprocess.run(
        [nvflare, "simulator", "-w", str(workspace), "-n", "3", "-t", "3", str(job)],
        capture_output=True, text=True, timeout=600, env=environment,
    )  # fmt: skip


def site_logs(workspace):
    return "".join(p.read_text(errors="replace") for p in workspace.rglob("log.txt"))


@pytest.mark.parametrize("tamper", ["run_configuration", "initial_model"])
def test_a_tampered_job_is_refused_before_any_training(datasets, tmp_path, tamper):
    job = export_job(plain_config(), tmp_path / "export", encryption="none")
    if tamper == "run_configuration":
        path = next(job.rglob("fedseg_run.yaml"))
        path.write_text(path.read_text().replace("local_steps: 8", "local_steps: 800"))
        expected = "copy of the run configuration was altered"
    else:
        other = load_config("tiny").to_dict()["model"]["args"] | {"channels": [4, 8, 16]}
        state = build_network("unet", **other).state_dict()
        torch.save(state, next(job.rglob("fedseg_initial_model.pt")))
        expected = "the global model does not fit this job's network"
    result = run_exported(job, datasets, tmp_path / "sim")
    logs = site_logs(tmp_path / "sim")
    assert expected in logs, result.stdout[-2000:] + result.stderr[-2000:]
    assert "train_steps" not in "".join(
        p.read_text() for p in (tmp_path / "sim").rglob("fedseg_metrics_*.json")
    ), "nothing was trained"
    stored = json.loads(next((tmp_path / "sim").rglob(SITE_REPORTS_FILE)).read_text())
    assert stored["failures"] and "0 usable update(s)" in stored["failures"][0]
