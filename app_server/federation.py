"""A local proof-of-concept federation: provision, start, stop, inspect; submit and fetch jobs.

Wraps NVFlare's provisioning and admin API the way a federation operator uses them, without
NVFlare's ``poc`` command (which writes ``~/.nvflare``): everything lives in one workspace
folder (by default under ``poc_workspace/``), which holds

- ``project.yml``: the provisioned project (``poc_workspace/project.yml`` with this federation's
  sites, ports and HE parameters);
- ``<project>/prod_00/<participant>/``: the signed startup kits, HE contexts included;
- ``jobs-storage/``, ``snapshot-storage/``: the server's job store and snapshots;
- ``processes.json``: the id of every process this module started, so that ``stop`` ends exactly
  those (and their children: each participant runs in its own process group).

Each site reads its dataset location from ``local/fedseg_site.json`` in its startup kit.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml
from nvflare.fuel.flare_api.flare_api import new_secure_session
from nvflare.lighter.constants import ProvisionMode
from nvflare.lighter.prov_utils import prepare_builders, prepare_packager
from nvflare.lighter.provision import prepare_project
from nvflare.lighter.provisioner import Provisioner
from nvflare.lighter.utils import update_storage_locations

from app_site.site_config import SITE_CONFIG_FILE, check_training_dataset, shared_host_threads
from fedseg.files import write_json_atomic, write_text_atomic

#: The project definition this module provisions from.
PROJECT_TEMPLATE = Path(__file__).resolve().parents[1] / "poc_workspace" / "project.yml"
PROCESSES_FILE = "processes.json"
HE_BUILDER = "nvflare.lighter.impl.he.HEBuilder"
#: HE parameters per encryption mode: packed updates need no multiplicative level; NVFlare's
#: stock filters need one (their defaults).
HE_PARAMETERS = {
    "packed": {"poly_modulus_degree": 4096, "coeff_mod_bit_sizes": [60, 40], "scale_bits": 40},
    "stock": {"poly_modulus_degree": 8192, "coeff_mod_bit_sizes": [60, 40, 40], "scale_bits": 40},
}
#: Seconds without a heartbeat after which the server counts a site as gone (NVFlare's own
#: default is 600 s). Sites send one every 10 s. A site found gone while a job runs leaves that
#: job (its rounds go on without it); one found gone after the job's server part ended makes
#: NVFlare fail the job, so the shorter this is, the smaller that window.
DEAD_SITE_SECONDS = 60
#: Job states after which a job will not change any more.
FINISHED_STATES = ("FINISHED:COMPLETED", "FINISHED:EXECUTION_EXCEPTION", "FINISHED:ABORTED")


class FederationError(RuntimeError):
    """The federation cannot do what was asked; the message says why and what to do."""


@dataclass(frozen=True)
class Federation:
    """A provisioned federation in its workspace folder."""

    workspace: Path

    @property
    def project(self) -> dict:
        """The provisioned project definition."""
        path = self.workspace / "project.yml"
        if not path.is_file():
            raise FederationError(f"{self.workspace} holds no federation: run fedseg poc prepare")
        return yaml.safe_load(path.read_text())

    @property
    def kits(self) -> Path:
        """The folder of the startup kits (the newest provisioning)."""
        folders = sorted((self.workspace / self.project["name"]).glob("prod_*"))
        if not folders:
            raise FederationError(f"{self.workspace}: not provisioned; run fedseg poc prepare")
        return folders[-1]

    def participants(self, kind: str) -> list[str]:
        """Names of the participants of a kind (``server``, ``client`` or ``admin``)."""
        return [p["name"] for p in self.project["participants"] if p["type"] == kind]

    @property
    def sites(self) -> list[str]:
        """The hospital sites."""
        return self.participants("client")

    @property
    def admin(self) -> str:
        """The project admin's user name."""
        return self.participants("admin")[0]

    @property
    def encryption(self) -> str:
        """``packed``, ``stock`` or ``none``: which HE contexts were provisioned."""
        builder = next((b for b in self.project["builders"] if b["path"] == HE_BUILDER), None)
        if builder is None:
            return "none"
        found = [m for m, p in HE_PARAMETERS.items() if p == builder.get("args", {})]
        return found[0] if found else "custom"

    def kit(self, participant: str) -> Path:
        """A participant's startup kit."""
        return self.kits / participant


def prepare(
    workspace: Path,
    sites: int = 3,
    encryption: str = "packed",
    datasets: Mapping[str, Path] | None = None,
    template: Path = PROJECT_TEMPLATE,
    dead_site_seconds: float = DEAD_SITE_SECONDS,
) -> Federation:
    """Provisions a federation: server, ``sites`` sites, the project admin, HE contexts.

    Re-running replaces the kits (a stopped federation only).

    Args:
        workspace: Its folder.
        sites: Number of hospital sites (``site-1`` ... ``site-N``).
        encryption: ``packed`` or ``stock`` (HE contexts with those parameters), or ``none``.
        datasets: Dataset folder of each site, written to its kit's ``local`` folder.
        template: The project definition to start from.
        dead_site_seconds: Seconds without a heartbeat after which the server counts a site
            as gone (``heart_beat_timeout`` in the server kit's ``local/resources.json``).

    Returns:
        The federation.

    Raises:
        FederationError: If it is running, or the arguments do not fit (a dataset for a site
            it does not have, a folder that is not a dataset or one without training or
            validation cases): checked before the kits of an earlier provisioning are
            replaced.
    """
    if encryption not in (*HE_PARAMETERS, "none"):
        raise FederationError(f"encryption must be packed, stock or none, got {encryption!r}")
    if sites < 1:
        raise FederationError("a federation needs at least one site")
    if dead_site_seconds < 20:
        raise FederationError(
            f"dead_site_seconds must be at least 20 (sites send a heartbeat every 10 s), "
            f"got {dead_site_seconds}"
        )
    federation = Federation(Path(workspace).resolve())
    if running_processes(federation):
        raise FederationError(f"{federation.workspace} is running: fedseg poc stop first")
    project = _project(yaml.safe_load(Path(template).read_text()), sites, encryption)
    site_names = [p["name"] for p in project["participants"] if p["type"] == "client"]
    for site, dataset in (datasets or {}).items():  # before the old kits are replaced
        if site not in site_names:
            raise FederationError(
                f"{site} is not a site of this federation ({', '.join(site_names)}); name a "
                "site it has, or provision more sites"
            )
        try:
            check_training_dataset(Path(dataset))
        except (OSError, ValueError) as error:
            raise FederationError(f"{site}: {error}") from error
    federation.workspace.mkdir(parents=True, exist_ok=True)
    write_text_atomic(
        federation.workspace / "project.yml", yaml.safe_dump(project, sort_keys=False)
    )
    for old in (federation.workspace / project["name"]).glob("prod_*"):
        shutil.rmtree(old)
    provisioner = Provisioner(
        str(federation.workspace),
        prepare_builders(copy.deepcopy(project)),
        prepare_packager(project),
    )
    provisioner.provision(prepare_project(copy.deepcopy(project)), mode=ProvisionMode.POC)
    # The server's job and snapshot storage in this workspace, not NVFlare's shared /tmp/nvflare.
    server = federation.participants("server")[0]
    update_storage_locations(str(federation.kit(server) / "local"), str(federation.workspace))
    _set_dead_site_seconds(federation.kit(server) / "local" / "resources.json", dead_site_seconds)
    for site, dataset in (datasets or {}).items():
        set_dataset(federation, site, dataset)
    return federation


def set_dataset(federation: Federation, site: str, dataset: Path) -> Path:
    """Tells a site where its dataset is (``local/fedseg_site.json`` in its startup kit).

    Raises:
        FederationError: If the site is not in the federation.
    """
    if site not in federation.sites:
        raise FederationError(f"{site} is not a site of this federation ({federation.sites})")
    path = federation.kit(site) / "local" / SITE_CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"dataset": str(Path(dataset).resolve())})
    return path


def start(
    federation: Federation, participants: list[str] | None = None, timeout: float = 120
) -> None:
    """Starts the server and the sites (or the named participants) and waits until they are up.

    Each participant runs in its own process group; its output goes to ``fedseg_stdout.log``
    in its kit. The python of this environment runs them.

    Raises:
        FederationError: If one is already running, or the federation does not come up in time.
    """
    server = federation.participants("server")[0]
    names = participants or [server, *federation.sites]
    processes = running_processes(federation)
    already = sorted(set(names) & set(processes))
    if already:
        raise FederationError(f"already running: {', '.join(already)}")
    environment = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    site_environment = {**environment, **shared_host_threads(len(federation.sites))}
    for name in names:
        kit = federation.kit(name)
        with open(kit / "fedseg_stdout.log", "ab") as log:
            process = subprocess.Popen(
                ["bash", str(kit / "startup" / "sub_start.sh"), "--once"],
                cwd=kit,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment if name == server else site_environment,
                start_new_session=True,
            )
        processes[name] = process.pid
        _write_processes(federation, processes)
        if name == server:
            _wait_for(lambda: _server_answers(federation), timeout, "the server did not come up")
    sites = [n for n in names if n != server]
    _wait_for(
        lambda: set(sites) <= set(connected_sites(federation)),
        timeout,
        f"not every site connected: {sites}",
    )


def stop(
    federation: Federation, participants: list[str] | None = None, grace: float = 20
) -> list[str]:
    """Stops the federation (or the named participants): politely, then by process id.

    Returns:
        The participants that were stopped.
    """
    processes = running_processes(federation)
    names = [n for n in (participants or list(processes)) if n in processes]
    server = federation.participants("server")[0]
    if server in names and _server_answers(federation):
        try:
            with admin_session(federation) as session:
                session.shutdown("all", wait=False)
        except Exception:
            pass
    deadline = time.monotonic() + grace
    for name in names:
        _end_process_group(processes[name], deadline)
        processes.pop(name)
    _write_processes(federation, processes)
    return names


def running_processes(federation: Federation) -> dict[str, int]:
    """Participant -> process id of those this module started that are still alive."""
    path = federation.workspace / PROCESSES_FILE
    if not path.is_file():
        return {}
    recorded = json.loads(path.read_text())
    return {name: pid for name, pid in recorded.items() if _alive(pid)}


def connected_sites(federation: Federation) -> list[str]:
    """The sites the server sees connected (empty when the server does not answer)."""
    try:
        with admin_session(federation, timeout=5) as session:
            return sorted(c.name for c in session.get_connected_client_list())
    except Exception:
        return []


def status(federation: Federation) -> dict:
    """Which participants run (with their process ids) and which sites are connected."""
    processes = running_processes(federation)
    server = federation.participants("server")[0]
    return {
        "workspace": str(federation.workspace),
        "encryption": federation.encryption,
        "processes": {n: processes.get(n) for n in [server, *federation.sites]},
        "connected_sites": connected_sites(federation) if server in processes else [],
    }


@contextmanager
def admin_session(federation: Federation, timeout: float = 30):
    """A FLARE API session of the project admin (what the admin console uses)."""
    session = new_secure_session(
        federation.admin, str(federation.kit(federation.admin)), timeout=timeout
    )
    try:
        yield session
    finally:
        session.close()


def submit_job(federation: Federation, job_folder: Path) -> str:
    """Submits a job folder through the admin API (``submit_job``); returns the job id."""
    with admin_session(federation) as session:
        return session.submit_job(str(job_folder))


def wait_for_job(
    federation: Federation,
    job_id: str,
    on_poll: Callable[[dict], None] | None = None,
    timeout: float = 0,
    poll_interval: float = 2.0,
) -> dict:
    """Waits until the job has finished.

    Args:
        federation: The federation.
        job_id: The job.
        on_poll: Called with the job's meta after every poll (for progress output); while
            the job trains, ``meta["progress"]`` holds the round, the number of rounds and
            the sites the round still waits for.
        timeout: Seconds (0: no limit).
        poll_interval: Seconds between polls.

    Returns:
        The job's final meta (``status`` is one of :data:`FINISHED_STATES`).

    Raises:
        FederationError: On timeout.
    """
    start_time = time.monotonic()
    with admin_session(federation) as session:
        while True:
            meta = session.get_job_meta(job_id)
            if on_poll:
                if meta.get("status") == "RUNNING":
                    meta["progress"] = _round_progress(session, job_id)
                on_poll(meta)
            if meta.get("status") in FINISHED_STATES:
                return meta
            if timeout and time.monotonic() - start_time > timeout:
                raise FederationError(f"job {job_id} did not finish within {timeout:.0f} s")
            time.sleep(poll_interval)


def job_meta(federation: Federation, job_id: str) -> dict:
    """A job's meta in the server's job store (``status`` among it)."""
    with admin_session(federation) as session:
        return session.get_job_meta(job_id)


def abort_job(federation: Federation, job_id: str) -> None:
    """Aborts a job (``abort_job``); :func:`wait_for_job` then sees it ``FINISHED:ABORTED``."""
    with admin_session(federation) as session:
        session.abort_job(job_id)


def sites_running_job(federation: Federation, job_id: str) -> list[str]:
    """The sites whose job process for ``job_id`` runs (``check_status client``)."""
    with admin_session(federation) as session:
        entries = session.get_client_job_status() or []
    return sorted({e["client_name"] for e in entries if e.get("job_id") == job_id})


def download_job(federation: Federation, job_id: str, destination: Path) -> Path:
    """Downloads a finished job's workspace (``download_job``) into ``destination``.

    Returns:
        The downloaded job folder.
    """
    destination = Path(destination).resolve()
    destination.mkdir(parents=True, exist_ok=True)
    with admin_session(federation) as session:
        return Path(session.download_job_result(job_id, str(destination)))


def _round_progress(session, job_id: str) -> dict | None:
    """The training workflow's round and the sites it waits for, from the server's stats."""
    try:
        stats = session.show_stats(job_id, "server").get("server", {})
    except Exception:  # progress is best effort: the job may be ending
        return None
    workflow = stats.get("ScatterAndGather")
    if not workflow or workflow.get("phase") != "train":
        return None
    return {
        "round": workflow.get("current_round"),
        "rounds": workflow.get("num_rounds"),
        "waiting_for": sorted(workflow.get("tasks", {}).get("train", [])),
    }


def _project(project: dict, sites: int, encryption: str) -> dict:
    project = copy.deepcopy(project)
    template_sites = [p for p in project["participants"] if p["type"] == "client"]
    others = [p for p in project["participants"] if p["type"] != "client"]
    base = template_sites[0] if template_sites else {"type": "client", "org": "hospital"}
    clients = [{**base, "name": f"site-{n}", "org": f"hospital_{n}"} for n in range(1, sites + 1)]
    project["participants"] = others[:1] + clients + others[1:]
    server = next(p for p in project["participants"] if p["type"] == "server")
    server["fed_learn_port"], server["admin_port"] = _free_ports(2)
    builders = [b for b in project["builders"] if b["path"] != HE_BUILDER]
    if encryption != "none":
        he = {"path": HE_BUILDER, "args": dict(HE_PARAMETERS[encryption])}
        signature = next(
            i for i, b in enumerate(builders) if b["path"].endswith("SignatureBuilder")
        )
        builders.insert(signature, he)  # before signing, so the contexts are signed
    project["builders"] = builders
    return project


def _set_dead_site_seconds(resources: Path, seconds: float) -> None:
    """Sets the server's ``heart_beat_timeout`` in its kit's ``local/resources.json``."""
    settings = json.loads(resources.read_text())
    for server in settings["servers"]:
        server["heart_beat_timeout"] = seconds
    write_json_atomic(resources, settings)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("localhost", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _server_answers(federation: Federation) -> bool:
    server = next(p for p in federation.project["participants"] if p["type"] == "server")
    try:
        with socket.create_connection(("localhost", server["admin_port"]), timeout=2):
            return True
    except OSError:
        return False


def _wait_for(condition: Callable[[], bool], timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise FederationError(
                f"{message} within {timeout:.0f} s; see fedseg_stdout.log in the kits"
            )
        time.sleep(1)


def _write_processes(federation: Federation, processes: dict[str, int]) -> None:
    write_json_atomic(federation.workspace / PROCESSES_FILE, processes)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as gone
        finished, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return finished == 0


def _end_process_group(pid: int, deadline: float) -> None:
    """Waits for the group to end until ``deadline``, then terminates it, then kills it."""
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None:
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                return
        while time.monotonic() < deadline and _group_alive(pid):
            time.sleep(0.5)
        if not _group_alive(pid):
            return
        deadline = time.monotonic() + 5


def _group_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    _alive(pid)  # reaps the leader if it is our finished child
    return True
