"""Round progress read from the server's site reports while a job runs."""

import json
import os
import time

from app_server.site_reports import SITE_REPORTS_FILE
from jobs.progress import RoundProgress, recorded_rounds, watching_rounds


def reports(*rounds: tuple[int, float | None]) -> dict:
    """Site reports of two sites; a round's Dice ``None`` means it was not validated."""
    return {
        "sites": {
            site: {
                "rounds": [
                    {"round": number, "metrics": None if dice is None else {"dice_mean": dice}}
                    for number, dice in rounds
                ]
            }
            for site in ("site-2", "site-1")
        }
    }


def test_rounds_are_listed_in_order_with_the_sites_that_validated():
    assert recorded_rounds(reports((1, None), (0, 0.25))) == [
        RoundProgress(0, ("site-1", "site-2"), {"site-1": 0.25, "site-2": 0.25}),
        RoundProgress(1, ("site-1", "site-2"), {}),
    ]
    assert recorded_rounds({"sites": {}}) == []


def test_each_new_round_is_handed_over_once_and_an_earlier_runs_file_is_ignored(tmp_path):
    stale = tmp_path / "old-run" / SITE_REPORTS_FILE
    stale.parent.mkdir()
    stale.write_text(json.dumps(reports((0, 0.9), (1, 0.9), (2, 0.9))))
    os.utime(stale, (time.time() - 60, time.time() - 60))
    current = tmp_path / "run" / SITE_REPORTS_FILE
    current.parent.mkdir()
    seen = []
    with watching_rounds(tmp_path, seen.append, interval=0.01):
        current.write_text(json.dumps(reports((0, 0.1))))
        deadline = time.time() + 10
        while not seen and time.time() < deadline:
            time.sleep(0.01)
        current.write_text(json.dumps(reports((0, 0.1), (1, None))))
    assert [(p.round, p.dice.get("site-1")) for p in seen] == [(0, 0.1), (1, None)]
