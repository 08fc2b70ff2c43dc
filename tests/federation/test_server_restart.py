"""A server killed mid-job in a real local federation, restarted, and the job resumed.

One provisioned federation (server, three sites, packed HE), started as real processes. A
five-round encrypted job is submitted through the admin API; once the server has persisted the
global model of round 1, the server's process group is killed (SIGKILL: no shutdown, as in a
power cut) and started again. ``fedseg job resume`` then goes on from the last completed round
in the same federation. No round may be lost or counted twice.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from app_server import federation as poc
from app_server.global_model import CHECKPOINT_FILE, ENCRYPTED_MODEL_FILE
from app_server.site_reports import read_site_reports
from fedseg.config import config_from_dict, load_config
from fedseg.files import file_sha256
from jobs.runner import server_run_folder
from jobs.segmentation import segmentation_recipe
from tests.federation.homes import isolated_home
from tests.federation.processes import kill, wait_for_checkpoint, wait_for_connected

pytestmark = pytest.mark.slow

ROUNDS = 5
SITES = ["site-1", "site-2", "site-3"]
FEDSEG = str(Path(sys.executable).with_name("fedseg"))


def five_round_config():
    document = load_config("tiny").to_dict()
    document["harmonization"]["method"] = "none"
    document["training"]["rounds"] = ROUNDS
    return config_from_dict(document)


@pytest.fixture(scope="module")
def restarted(datasets, tmp_path_factory):
    root = tmp_path_factory.mktemp("restart")
    names = {site: datasets[site] for site in SITES}
    with isolated_home(root / "home"):
        federation = poc.prepare(root / "poc", 3, "packed", names)
        server = federation.participants("server")[0]
        try:
            poc.start(federation)
            recipe = segmentation_recipe(five_round_config(), encryption="packed")
            recipe.export(str(root / "job"))
            job_folder = next((root / "job").rglob("meta.json")).parent
            job_id = poc.submit_job(federation, job_folder)
            run_folder = server_run_folder(federation, job_id)
            record_path = run_folder / "app_server" / CHECKPOINT_FILE
            wait_for_checkpoint(record_path, 1, timeout=600)
            kill(federation, server)
            at_kill = json.loads(record_path.read_text())
            model_at_kill = file_sha256(run_folder / "app_server" / ENCRYPTED_MODEL_FILE)
            poc.start(federation, [server])
            wait_for_connected(federation, SITES, timeout=300)
            resumed = subprocess.run(
                [FEDSEG, "job", "resume", job_id, "--workspace", str(federation.workspace),
                 "--workdir", str(root / "resumed")],
                capture_output=True, text=True, timeout=900,
            )  # fmt: skip
        finally:
            poc.stop(federation)
    return {
        "job_id": job_id,
        "at_kill": at_kill,
        "model_at_kill": model_at_kill,
        "resumed": resumed,
        "workdir": root / "resumed",
    }


def test_the_resumed_job_completes(restarted):
    resumed = restarted["resumed"]
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"at round {restarted['at_kill']['round'] + 2} of {ROUNDS}" in resumed.stdout


def test_no_round_is_lost_or_counted_twice(restarted):
    report = restarted["workdir"] / "report"
    federation = json.loads((report / "federation.json").read_text())
    assert federation["round_contributors"] == {str(r): SITES for r in range(ROUNDS)}
    local_steps = five_round_config().training.local_steps
    for site in SITES:
        document = json.loads((report / f"{site}.json").read_text())
        assert [r["round"] for r in document["rounds"]] == list(range(ROUNDS))
        assert sum(r["train_steps"] for r in document["rounds"]) == ROUNDS * local_steps
        assert math.isfinite(document["final"]["metrics"]["dice_mean"])
    (resumption,) = federation["resumptions"]
    assert resumption["interrupted_job"] == restarted["job_id"]
    assert resumption["next_round"] == restarted["at_kill"]["round"] + 1


def test_training_went_on_from_the_model_persisted_before_the_crash(restarted):
    result = restarted["workdir"] / "segmentation" / "result"
    (started_from,) = result.rglob("app_server/custom/fedseg_resumed_model.fedseg-ckks")
    assert file_sha256(started_from) == restarted["model_at_kill"]
    content = read_site_reports(result, SITES)
    for site in SITES:  # 40 steps of raw (unharmonized) data: the loss tells, Dice barely moves
        losses = [r["train_loss"] for r in content["sites"][site]["rounds"]]
        assert losses[-1] < losses[0], f"{site}: training did not lower the loss ({losses})"
