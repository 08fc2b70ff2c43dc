"""Killing participants of a local federation and waiting for what the server records."""

import json
import os
import signal
import time
from pathlib import Path

from app_server import federation as poc


def wait_for_checkpoint(record_path: Path, round_number: int, timeout: float) -> dict:
    """The server's checkpoint record, once it holds ``round_number`` or a later round."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if record_path.is_file():
            record = json.loads(record_path.read_text())
            if record["round"] >= round_number:
                return record
        time.sleep(0.1)
    raise TimeoutError(f"no checkpoint of round {round_number} in {timeout:.0f} s")


def wait_for_connected(federation, sites: list[str], timeout: float) -> None:
    """Waits until the server sees exactly ``sites`` connected."""
    deadline = time.monotonic() + timeout
    while poc.connected_sites(federation) != sorted(sites):
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"the server sees {poc.connected_sites(federation)}, not {sorted(sites)}"
            )
        time.sleep(1)


def kill(federation, participant: str) -> None:
    """SIGKILL to the participant's process group (its job processes too), then wait."""
    os.killpg(poc.running_processes(federation)[participant], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while participant in poc.running_processes(federation):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{participant} still runs after SIGKILL")
        time.sleep(0.1)
