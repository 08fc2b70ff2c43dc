"""A site's worker process lost by NVFlare's simulator: the run ends at once and is tried again.

The simulator's own failure is brought about for real: a thread kills site-3's worker process
as soon as the simulator has connected to it.
"""

import json
import logging
import threading
from pathlib import Path

import psutil
import pytest

from fedseg.config import load_config
from jobs.harmonization import harmonization_recipe
from jobs.runner import fit_harmonization, site_environment
from jobs.simulation import SiteProcessLost, lost_site, run_in_simulator, simulator_workers

CONFIG = load_config("tiny")

#: What NVFlare 2.9's simulator writes to its server log when it loses a site's worker.
LOST_LINES = {
    "Communication error with client site-3: [Errno 104] Connection reset by peer": (
        "2026-12-07 07:27:09,128 - SimulatorClientRunner - ERROR - Communication error with "
        "client site-3: [Errno 104] Connection reset by peer"
    ),
    "Subprocess died for client site-2, exit code: -9": (
        "2026-12-07 07:27:09,128 - SimulatorClientRunner - ERROR - Subprocess died for client "
        "site-2, exit code: -9"
    ),
    "run_client_thread error: RuntimeError: Failed to create connection to the child process "
    "in SimulatorClientRunner, timeout: 60.0": (
        "2026-12-07 13:59:59,454 - SimulatorClientRunner - ERROR - run_client_thread error: "
        "RuntimeError: Failed to create connection to the child process in "
        "SimulatorClientRunner, timeout: 60.0"
    ),
}


@pytest.mark.parametrize("words", sorted(LOST_LINES))
def test_the_simulators_words_for_a_lost_site_are_read_from_its_log(words):
    log = "2026-12-07 07:27:08,001 - ServerRunner - INFO - started\n" + LOST_LINES[words] + "\n"
    assert lost_site(log) == words


def test_a_failure_of_the_job_itself_is_no_lost_site():
    log = (
        "2026-12-07 13:59:57,810 - ServerRunner - ERROR - [identity=simulator_server] - "
        "Aborting current RUN due to FATAL_SYSTEM_ERROR received: harmonization fit failed: "
        "2 site(s) sent statistics, 3 needed (no answer)\n"
    )
    assert lost_site(log) is None


class WorkerKiller:
    """Kills site-3's simulator worker under ``root`` once the simulator has connected to it."""

    def __init__(self, root: Path):
        self.root = str(root)
        self.killed = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.stop.set()
        self.thread.join()

    def run(self) -> None:
        while not self.stop.wait(0.1):
            for process in simulator_workers():
                try:
                    command = process.cmdline()
                    if not (
                        "site-3" in command and any(part.startswith(self.root) for part in command)
                    ):
                        continue
                    if any(c.status == psutil.CONN_ESTABLISHED for c in process.net_connections()):
                        process.kill()
                        self.killed.set()
                        return
                except psutil.NoSuchProcess:
                    continue


def test_a_site_lost_once_is_simulated_again(datasets, tmp_path, caplog):
    folders = [datasets[name] for name in ("site-1", "site-2", "site-3")]
    with (
        caplog.at_level(logging.WARNING, logger="jobs.simulation"),
        WorkerKiller(tmp_path) as killer,
    ):
        artifact = fit_harmonization(CONFIG, folders, tmp_path)
    assert killer.killed.is_set()
    retried = [r.getMessage() for r in caplog.records if r.name == "jobs.simulation"]
    assert len(retried) == 1
    assert "lost a site's worker process (Communication error with client site-3" in retried[0]
    assert retried[0].endswith("running the simulation again (try 2 of 2)")
    assert sorted(json.loads(artifact.read_text())["site_images"]) == ["site-1", "site-2", "site-3"]


def test_a_site_lost_in_every_try_ends_the_run_before_the_servers_timeout(datasets, tmp_path):
    folders = [datasets[name] for name in ("site-1", "site-2", "site-3")]
    with (
        site_environment(folders),
        WorkerKiller(tmp_path) as killer,
        pytest.raises(SiteProcessLost, match=r"client site-3\b.*tried 1 time\(s\); see the logs"),
    ):
        run_in_simulator(
            lambda: harmonization_recipe(CONFIG, "MR", 3, timeout=600),
            3,
            tmp_path / "simulation",
            tries=1,
        )
    assert killer.killed.is_set()
    server_log = next((tmp_path / "simulation").rglob("server/log.txt")).read_text()
    assert "needed (no answer)" not in server_log  # ended by the watcher, not the server's wait
    assert not simulator_workers()
