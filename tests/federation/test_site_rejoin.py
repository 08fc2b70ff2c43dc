"""A site killed mid-round in a real local federation: the rounds go on, then it rejoins.

Provisioned federations (server, three sites, packed HE, a minimum of two sites per round),
started as real processes, the server counting a site as gone after 30 s without a heartbeat.
Once round 0 is aggregated, ``site-3``'s process group is killed (SIGKILL, as in a power cut):
the following rounds complete with ``site-1`` and ``site-2``.

- Rejoin: ``site-3`` is started again once the server has noticed it is gone, and
  ``fedseg job rejoin`` brings it back into the job for the remaining rounds. The reports say
  who contributed to each round; no round is lost or counted twice at any site.
- Not restarted: the job completes (NVFlare's status included) with the other two sites.
  Then, in the same federation, a job needing all three sites: once ``site-3`` is killed
  again the round waits ``federation.round_timeout``, then the job fails saying why.
"""

import json
import math
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from app_server import federation as poc
from app_server.global_model import CHECKPOINT_FILE
from app_server.site_reports import SITE_REPORTS_FILE, read_site_reports
from fedseg.config import config_from_dict, load_config
from jobs.runner import server_run_folder
from jobs.segmentation import segmentation_recipe
from tests.federation.homes import isolated_home
from tests.federation.processes import kill, wait_for_checkpoint, wait_for_connected

pytestmark = pytest.mark.slow

ROUNDS = 16
SITES = ["site-1", "site-2", "site-3"]
KILLED = "site-3"
DEAD_SITE_SECONDS = 30
#: Below DEAD_SITE_SECONDS - 10 (the heartbeat interval): the round gives up on the killed site
#: before the server counts it as gone.
ROUND_TIMEOUT = 15
FEDSEG = str(Path(sys.executable).with_name("fedseg"))


def job_config(rounds: int = ROUNDS, min_sites: int = 2, round_timeout: int = 3600):
    document = load_config("tiny").to_dict()
    document["harmonization"]["method"] = "none"
    document["training"]["rounds"] = rounds
    document["training"]["min_sites"] = min_sites
    document["federation"]["straggler_seconds"] = 5
    document["federation"]["round_timeout"] = round_timeout
    # NVFlare's 2 s between tasks, not tiny's 0.2 s: the rounds left once the killed site is
    # counted as gone must outlast restarting it and the rejoin.
    document["federation"]["task_request_interval"] = 2.0
    return config_from_dict(document)


@contextmanager
def running_federation(root: Path, datasets: dict):
    """A started three-site federation (packed HE) under ``root``, stopped at the end."""
    names = {site: datasets[site] for site in SITES}
    with isolated_home(root / "home"):
        federation = poc.prepare(
            root / "poc", 3, "packed", names, dead_site_seconds=DEAD_SITE_SECONDS
        )
        try:
            poc.start(federation)
            yield federation
        finally:
            poc.stop(federation)


def submit_then_kill(federation, config, folder: Path) -> tuple[str, Path]:
    """Submits the packed-HE job and kills ``KILLED`` once round 0 is aggregated.

    Returns:
        The job id and its checkpoint record's path.
    """
    segmentation_recipe(config, encryption="packed").export(str(folder))
    job_id = poc.submit_job(federation, next(folder.rglob("meta.json")).parent)
    record_path = server_run_folder(federation, job_id) / "app_server" / CHECKPOINT_FILE
    wait_for_checkpoint(record_path, 0, timeout=600)
    kill(federation, KILLED)
    return job_id, record_path


@pytest.fixture(scope="module")
def rejoined(datasets, tmp_path_factory):
    root = tmp_path_factory.mktemp("rejoin")
    with running_federation(root, datasets) as federation:
        job_id, record_path = submit_then_kill(federation, job_config(), root / "job")
        wait_for_connected(federation, ["site-1", "site-2"], timeout=DEAD_SITE_SECONDS + 60)
        without_killed = json.loads(record_path.read_text())["round"]
        poc.start(federation, [KILLED])
        refused_when_not_running = None
        rejoin = subprocess.run(
            [FEDSEG, "job", "rejoin", job_id, "--workspace", str(federation.workspace),
             "--workdir", str(root / "rejoined")],
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        if rejoin.returncode == 0:
            refused_when_not_running = subprocess.run(
                [FEDSEG, "job", "rejoin", job_id, "--workspace", str(federation.workspace),
                 "--workdir", str(root / "again")],
                capture_output=True, text=True, timeout=300,
            )  # fmt: skip
        final_status = poc.job_meta(federation, job_id)["status"]
        server = federation.participants("server")[0]
        server_log = (federation.kit(server) / "log.txt").read_text()
    return {
        "job_id": job_id,
        "rounds_without_killed": without_killed,
        "rejoin": rejoin,
        "again": refused_when_not_running,
        "final_status": final_status,
        "server_log": server_log,
        "report": root / "rejoined" / "report",
    }


def test_the_server_counts_a_silent_site_as_gone_after_the_provisioned_time(rejoined):
    assert f"server heartbeat timeout set to {DEAD_SITE_SECONDS}" in rejoined["server_log"]


def test_the_site_rejoins_and_the_job_completes(rejoined):
    rejoin = rejoined["rejoin"]
    assert rejoin.returncode == 0, rejoin.stdout[-3000:] + rejoin.stderr[-3000:]
    assert f"{KILLED} rejoined job {rejoined['job_id']}" in rejoin.stdout
    assert rejoined["final_status"] == "FINISHED:ABORTED"


def test_the_rounds_went_on_without_the_killed_site_and_with_it_after_it_rejoined(rejoined):
    federation = json.loads((rejoined["report"] / "federation.json").read_text())
    contributors = {int(r): sites for r, sites in federation["round_contributors"].items()}
    assert sorted(contributors) == list(range(ROUNDS))
    assert contributors[0] == SITES
    (resumption,) = federation["resumptions"]
    rejoined_at = resumption["next_round"]
    assert resumption["interrupted_job"] == rejoined["job_id"]
    assert resumption["rejoined"] == [KILLED]
    assert rejoined_at > rejoined["rounds_without_killed"] >= 1
    for round_number in range(1, rejoined["rounds_without_killed"] + 1):
        assert contributors[round_number] == ["site-1", "site-2"], round_number
    for round_number in range(rejoined_at, ROUNDS):
        assert contributors[round_number] == SITES, round_number


def test_no_round_is_lost_or_counted_twice_at_any_site(rejoined):
    federation = json.loads((rejoined["report"] / "federation.json").read_text())
    contributors = federation["round_contributors"]
    local_steps = job_config().training.local_steps
    for site in SITES:
        document = json.loads((rejoined["report"] / f"{site}.json").read_text())
        trained = [r["round"] for r in document["rounds"] if r["train_steps"]]
        assert trained == sorted(set(trained)), f"{site}: a round counted twice"
        assert trained == [int(r) for r, sites in contributors.items() if site in sites]
        assert sum(r["train_steps"] for r in document["rounds"]) == len(trained) * local_steps
        assert math.isfinite(document["final"]["metrics"]["dice_mean"])


def test_rejoining_a_job_that_no_longer_runs_is_refused(rejoined):
    again = rejoined["again"]
    assert again is not None and again.returncode != 0
    assert "not running" in again.stdout + again.stderr


@pytest.fixture(scope="module")
def abandoned(datasets, tmp_path_factory):
    """A site killed in round 1 of an eight-round job and never started again; then one killed
    in a job that needs every site."""
    root = tmp_path_factory.mktemp("abandoned")
    with running_federation(root, datasets) as federation:
        job_id, _ = submit_then_kill(federation, job_config(rounds=8), root / "job")
        meta = poc.wait_for_job(federation, job_id, timeout=900)
        result = poc.download_job(federation, job_id, root / "result")
        poc.start(federation, [KILLED])
        every_site = job_config(3, min_sites=3, round_timeout=ROUND_TIMEOUT)
        job_id, _ = submit_then_kill(federation, every_site, root / "all")
        too_few_meta = poc.wait_for_job(federation, job_id, timeout=600)
        too_few = poc.download_job(federation, job_id, root / "too-few")
    return {
        "status": meta["status"],
        "reports": read_site_reports(result, SITES),
        "too_few_status": too_few_meta["status"],
        "too_few_reports": json.loads(next(too_few.rglob(SITE_REPORTS_FILE)).read_text()),
    }


def test_a_job_whose_site_died_completes_with_the_others(abandoned):
    assert abandoned["status"] == "FINISHED:COMPLETED"
    reports = abandoned["reports"]
    contributors = {int(r): sites for r, sites in reports["round_contributors"].items()}
    assert contributors[0] == SITES
    assert all(contributors[r] == ["site-1", "site-2"] for r in range(1, 8)), contributors
    for site in ("site-1", "site-2"):
        assert math.isfinite(reports["sites"][site]["final"]["metrics"]["dice_mean"])
    assert not reports["sites"][KILLED]["final"]


def test_with_too_few_sites_the_round_waits_then_the_job_fails_saying_why(abandoned):
    assert abandoned["too_few_status"] != "FINISHED:COMPLETED"
    (failure,) = abandoned["too_few_reports"]["failures"]
    assert "2 usable update(s) (site-1, site-2), the job needs 3" in failure
    assert KILLED in failure.split("the job needs 3")[1], failure
