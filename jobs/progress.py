"""Round-by-round progress of a running job, read from the reports its server writes.

The server rewrites ``fedseg_site_reports.json`` once per round (:mod:`app_server.site_reports`);
a watcher thread reads it every few seconds and hands each newly completed round to a
callback, so that a run of hours in the simulator is not silent. Metrics only, as in the
reports.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from app_server.site_reports import SITE_REPORTS_FILE


@dataclass(frozen=True)
class RoundProgress:
    """One round the server recorded.

    Attributes:
        round: The round (0-based, as in the reports).
        sites: The sites that reported it.
        dice: Mean Dice of the three regions per site that validated the round's global
            model (sites validate every ``validation.every_rounds`` rounds).
    """

    round: int
    sites: tuple[str, ...]
    dice: dict[str, float]


def recorded_rounds(content: dict) -> list[RoundProgress]:
    """The rounds a server's site reports hold, in order.

    Args:
        content: The content of ``fedseg_site_reports.json``.

    Returns:
        One entry per round any site reported.
    """
    by_round: dict[int, dict[str, dict]] = {}
    for site, document in content.get("sites", {}).items():
        for entry in document.get("rounds", []):
            by_round.setdefault(entry["round"], {})[site] = entry
    return [
        RoundProgress(
            number,
            tuple(sorted(entries)),
            {
                site: entry["metrics"]["dice_mean"]
                for site, entry in sorted(entries.items())
                if entry.get("metrics")
            },
        )
        for number, entries in sorted(by_round.items())
    ]


@contextmanager
def watching_rounds(
    folder: Path, on_round: Callable[[RoundProgress], None] | None, interval: float = 2.0
) -> Iterator[None]:
    """Calls ``on_round`` for each round recorded under ``folder`` while the block runs.

    Only a reports file written after the block began counts (an earlier run's, left in the
    same folder, does not). Rounds recorded since the last look are handed over in order, and
    once more when the block ends, so that none is missed.

    Args:
        folder: Where the job's server writes its run folder (searched recursively).
        on_round: The callback; ``None`` watches nothing.
        interval: Seconds between looks.
    """
    if on_round is None:
        yield
        return
    began = time.time()
    reported: set[int] = set()
    stop = threading.Event()

    def look() -> None:
        for path in sorted(Path(folder).rglob(SITE_REPORTS_FILE)):
            try:
                if path.stat().st_mtime < began:
                    continue
                content = json.loads(path.read_text())
            except (OSError, ValueError):  # replaced while read: the next look reads it
                continue
            for progress in recorded_rounds(content):
                if progress.round not in reported:
                    reported.add(progress.round)
                    on_round(progress)

    def watch() -> None:
        while not stop.wait(interval):
            look()

    watcher = threading.Thread(target=watch, name="fedseg-progress", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
        look()
