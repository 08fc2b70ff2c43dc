"""Running a recipe in NVFlare's simulator, which now and then loses a site's worker process.

The simulator runs each site in a worker process that it drives over a local socket. Once in a
while a worker dies or its socket is reset before the site's first task; the simulator logs
it to its server log and carries on, and the server waits for the lost site until the task's
timeout (``federation.round_timeout``: an hour by default). A watcher reads that log while the
simulation runs; when it reports a lost site, the watcher ends the simulation at once and the
run is tried again. The simulator starts every run from an empty workspace and a run is
deterministic, so a second try gives what the first would have given.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
from nvflare.recipe import SimEnv
from nvflare.recipe.spec import Recipe

LOGGER = logging.getLogger(__name__)

#: How the simulator's server log reports a site whose worker process it lost.
LOST_SITE_LINE = re.compile(
    r"SimulatorClientRunner - ERROR - (?P<what>(?:Communication error with client|"
    r"Subprocess died for client|run_client_thread error).*)"
)

#: The module the simulator runs each site's worker process as.
SIMULATOR_WORKER = "nvflare.private.fed.app.simulator.simulator_worker"


class SiteProcessLost(RuntimeError):
    """NVFlare's simulator lost a site's worker process in every try."""


def lost_site(log: str) -> str | None:
    """What the simulator's server log says of the first site whose process it lost.

    Args:
        log: The text of the simulator's ``server/log.txt``.

    Returns:
        The simulator's words (``Communication error with client site-3: [Errno 104]
        Connection reset by peer``), or ``None`` if it lost no site.
    """
    match = LOST_SITE_LINE.search(log)
    return match.group("what").strip().rstrip(":") if match else None


def run_in_simulator(
    recipe: Callable[[], Recipe], sites: int, workspace: Path, tries: int = 2
) -> Path:
    """Runs a job in NVFlare's simulator; tries again when the simulator loses a site.

    Args:
        recipe: Builds the job's recipe; called for each try, as a run spends its recipe.
        sites: How many sites to simulate (``site-1`` ... ``site-N``).
        workspace: The simulator's workspace root; the job runs in a folder of it.
        tries: How many times to run the simulation when it loses a site's process.

    Returns:
        The job's result folder.

    Raises:
        SiteProcessLost: If the simulator lost a site's process in each of ``tries`` runs.
        RuntimeError: If the simulation failed for another reason (NVFlare's message names
            the logs).
    """
    if tries < 1:
        raise ValueError(f"tries must be at least 1, not {tries}")
    attempt = 1
    while True:
        with watching_for_lost_sites(workspace) as lost:
            try:
                run = recipe().execute(
                    SimEnv(num_clients=sites, workspace_root=str(workspace), log_config="WARNING")
                )
                return Path(run.get_result())
            except RuntimeError as error:
                failure = error
        if not lost:  # read after the watch ended: it looks once more at the end
            raise failure
        message = f"NVFlare's simulator lost a site's worker process ({lost[0]})"
        if attempt == tries:
            raise SiteProcessLost(
                f"{message}; tried {tries} time(s); see the logs under {workspace}"
            ) from failure
        attempt += 1
        LOGGER.warning("%s; running the simulation again (try %d of %d)", message, attempt, tries)


@contextmanager
def watching_for_lost_sites(workspace: Path, interval: float = 2.0) -> Iterator[list[str]]:
    """Ends the simulation under ``workspace`` as soon as its server log reports a lost site.

    Only a log written after the block began counts (an earlier run's, left in the same
    folder, does not). The log is read once more as the block ends, so that a site lost in
    the last moments of a failed run is not missed.

    Args:
        workspace: The simulator's workspace root (searched recursively for ``server/log.txt``).
        interval: Seconds between looks.

    Yields:
        A list that holds, once a site was lost, the simulator's words for it
        (:func:`lost_site`); empty while none is.
    """
    began = time.time()
    lost: list[str] = []
    stop = threading.Event()

    def look() -> str | None:
        for log in Path(workspace).rglob("server/log.txt"):
            try:
                if log.stat().st_mtime < began:
                    continue
                found = lost_site(log.read_text(errors="replace"))
            except OSError:  # the simulator clears its workspace as it starts
                continue
            if found:
                return found
        return None

    def watch() -> None:
        while not stop.wait(interval):
            found = look()
            if found:
                lost.append(found)
                end_simulation()
                return

    watcher = threading.Thread(target=watch, name="fedseg-lost-sites", daemon=True)
    watcher.start()
    try:
        yield lost
    finally:
        stop.set()
        watcher.join()
        if not lost and (found := look()):  # lost in the last moments of a failed run
            lost.append(found)


def end_simulation() -> None:
    """Kills the simulator this process runs: its site workers and the process that drives them.

    The simulator's process then exits with a failure, which NVFlare's ``SimEnv`` raises as a
    ``RuntimeError``.
    """
    workers = simulator_workers()
    drivers = {_parent(worker) for worker in workers} - {None, psutil.Process()}
    for process in [*workers, *drivers]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def simulator_workers() -> list[psutil.Process]:
    """The site worker processes of the simulator this process runs."""
    return [
        process
        for process in psutil.Process().children(recursive=True)
        if _is_simulator_worker(process)
    ]


def _parent(process: psutil.Process) -> psutil.Process | None:
    try:
        return process.parent()
    except psutil.NoSuchProcess:
        return None


def _is_simulator_worker(process: psutil.Process) -> bool:
    try:
        return SIMULATOR_WORKER in process.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
