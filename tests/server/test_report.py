import json
import math

import numpy as np
import pytest

from app_server.report import bootstrap_interval, line_chart, write_reports
from app_server.site_reports import resumed_content, with_rejoined_sites


def site_document(site: str, dice: float) -> dict:
    cases = [
        {
            "case_id": f"case-{i:012x}",
            "dice": {"TC": dice - 0.1 * i, "WT": dice, "ET": dice / 2},
            "hd95": {"TC": 4.0 + i, "WT": 3.0, "ET": None},
        }
        for i in range(3)
    ]
    rounds = [
        {
            "round": r,
            "metrics": {
                **{f"dice_{g}": float(np.mean([c["dice"][g] for c in cases])) * (r + 1) / 2
                   for g in ("TC", "WT", "ET")},
                "hd95_TC": 5.0, "hd95_WT": 3.0, "hd95_ET": float("nan"), "dice_mean": 0.5,
            },
            "cases": cases,
            "train_loss": 1.0 - 0.1 * r,
            "train_steps": 8,
            "train_seconds": 1.5,
            "aggregation_weight": 32,
        }
        for r in range(2)
    ]  # fmt: skip
    return {
        "site": site,
        "device": "cpu",
        "data": {"training_cases": 4, "validation_cases": 3, "qc_counts": {"accepted": 7}},
        "harmonization_hash": "ab" * 32,
        "rounds": rounds,
        "final": {"metrics": {**rounds[-1]["metrics"], "dice_WT": dice}, "cases": cases},
    }


def collected(*documents) -> dict:
    """What the server gathers (fedseg_site_reports.json)."""
    return {
        "mode": "he-packed",
        "sites": {d["site"]: d for d in documents},
        "round_contributors": {"0": [d["site"] for d in documents], "1": [documents[0]["site"]]},
        "refusals": [{"site": "site-2", "round": 1, "reason": "refused at the site: diverged"}],
    }


def test_bootstrap_interval_brackets_the_mean():
    values = [0.6, 0.7, 0.8, 0.75, 0.65]
    low, high = bootstrap_interval(values)
    assert low < np.mean(values) < high and 0.6 <= low and high <= 0.8
    assert all(math.isnan(v) for v in bootstrap_interval([0.5]))  # one case: no spread
    assert all(math.isnan(v) for v in bootstrap_interval([None]))


def test_reports_hold_the_numbers_and_nothing_else(tmp_path):
    documents = [site_document(site, dice) for site, dice in (("site-1", 0.8), ("site-2", 0.6))]
    written = write_reports(tmp_path, collected(*documents))
    assert {p.name for p in written} == {
        "site-1.json", "site-1.html", "site-2.json", "site-2.html",
        "federation.json", "federation.html",
    }  # fmt: skip
    page = (tmp_path / "site-1.html").read_text()
    summary = json.loads((tmp_path / "site-1.json").read_text())["summary"]
    assert f"{summary['metrics']['dice_WT']:.3f}" in page
    low, high = summary["intervals"]["dice_TC"]
    assert f"{low:.3f} to {high:.3f}" in page
    assert "<svg" in page and "case-000000000002" in page and "n/a" in page  # ET HD95 undefined
    assert "bootstrap over 3 cases" in page
    # HD95 per round, plotted and tabulated with the final model's row, and its interval
    assert "HD95 per round" in page and page.count("<svg") == 2 and "<td>final</td>" in page
    hd95_low, hd95_high = summary["intervals"]["hd95_TC"]
    assert 4.0 <= hd95_low < hd95_high <= 6.0 and f"{hd95_low:.1f} to {hd95_high:.1f}" in page
    assert "<td class=num>5.0</td>" in page  # rounds' HD95 TC
    assert summary["model"] == "final global model"
    assert summary["metrics"]["hd95_ET"] is None  # standard JSON: null, never NaN
    assert "packed CKKS" in page and "Refused updates" not in page  # site-1 refused none
    federation = json.loads((tmp_path / "federation.json").read_text())
    assert federation["sites"] == ["site-1", "site-2"] and federation["mode"] == "he-packed"
    assert federation["summary"]["site-2"]["model"] == "final global model"
    assert federation["summary"]["site-2"]["metrics"]["dice_WT"] == pytest.approx(0.6)
    page = (tmp_path / "federation.html").read_text()
    assert "site-2" in page and "Contributions per round" in page
    assert "HD95 TC (mm)" in page and page.count("<svg") == 4  # Dice and HD95 of each site
    assert federation["curves"]["site-1"][0]["hd95_TC"] == 5.0
    assert "Final global model, all sites" in page
    assert page.count("<td>no</td>") == 1  # site-2 did not contribute to round 1
    assert "Refused updates" in page and "refused at the site: diverged" in page
    own = (tmp_path / "site-2.html").read_text()  # a site's refusals are on its own page too
    assert "Refused updates" in own and "refused at the site: diverged" in own


def test_reports_are_standard_json_and_replace_an_earlier_run_whole(tmp_path):
    documents = [site_document(site, 0.7) for site in ("site-1", "site-2", "site-3")]
    write_reports(tmp_path / "report", collected(*documents))
    write_reports(tmp_path / "report", collected(*documents[:2]))  # rerun with fewer sites
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == [
        "federation.html", "federation.json", "site-1.html", "site-1.json", "site-2.html",
        "site-2.json",
    ]  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no staging folder left
    for path in (tmp_path / "report").glob("*.json"):
        json.loads(path.read_text(), parse_constant=pytest.fail)  # no NaN or Infinity
    with pytest.raises(ValueError, match="a site is named 'federation'"):
        write_reports(tmp_path / "report", collected(site_document("federation", 0.7)))


def test_without_a_final_validation_the_last_round_is_summarized(tmp_path):
    document = {**site_document("site-1", 0.7), "final": None}
    write_reports(tmp_path, collected(document, site_document("site-2", 0.6)))
    summary = json.loads((tmp_path / "site-1.json").read_text())["summary"]
    assert summary["model"] == "global model of round 1"
    assert summary["metrics"]["dice_WT"] == document["rounds"][-1]["metrics"]["dice_WT"]
    federation = json.loads((tmp_path / "federation.json").read_text())
    assert federation["summary"]["site-1"]["model"] == "global model of round 1"
    page = (tmp_path / "federation.html").read_text()  # never under a "final" heading
    assert "Final global model, all sites" not in page
    assert "not every site validated the final global model" in page
    assert "<td>global model of round 1</td>" in page and "<td>final global model</td>" in page


def test_rounds_without_validation_are_left_out_of_curves_and_summary(tmp_path):
    document = site_document("site-1", 0.7)
    validated = document["rounds"][0]
    document = {**document, "final": None}
    document["rounds"][1].update(metrics=None, cases=[])  # validation.every_rounds 2
    write_reports(tmp_path, collected(document))
    summary = json.loads((tmp_path / "site-1.json").read_text())["summary"]
    assert summary["model"] == "global model of round 0" and summary["rounds"] == 2
    assert summary["metrics"]["dice_WT"] == validated["metrics"]["dice_WT"]
    curves = json.loads((tmp_path / "federation.json").read_text())["curves"]["site-1"]
    assert [point["round"] for point in curves] == [0]
    assert "<svg" in (tmp_path / "site-1.html").read_text()


def test_nothing_to_report_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no site metrics"):
        write_reports(tmp_path, {"mode": "plaintext", "sites": {}})


def test_a_rejoin_is_reported_with_the_site_that_came_back(tmp_path):
    documents = [site_document(site, 0.7) for site in ("site-1", "site-2")]
    interrupted = {**collected(*documents), "failures": [], "resumptions": []}
    resumed = with_rejoined_sites(resumed_content(interrupted, 1, "job-a"), ["site-2"])
    (resumption,) = resumed["resumptions"]
    assert resumption == {
        "interrupted_job": "job-a", "next_round": 1, "dropped_rounds": [1], "failures": [],
        "rejoined": ["site-2"],
    }  # fmt: skip
    write_reports(tmp_path, resumed)
    page = (tmp_path / "federation.html").read_text()
    assert "Resumed after an interruption" in page
    assert "restarted so that site-2 could rejoin" in page


def test_a_site_that_reported_nothing_fails_the_job_after_the_others_reports(tmp_path):
    """The job fails naming the site, and the reports of the sites that did report exist."""
    from app_server.site_reports import SITE_REPORTS_FILE
    from jobs.runner import write_job_reports

    result = tmp_path / "result" / "server"
    result.mkdir(parents=True)
    content = collected(site_document("site-1", 0.8))
    (result / SITE_REPORTS_FILE).write_text(json.dumps(content))
    report = tmp_path / "report"
    with pytest.raises(RuntimeError) as failure:
        write_job_reports(tmp_path / "result", report, ["site-1", "site-2"], "packed")
    assert "site-2 reported no training round" in str(failure.value)
    assert f"the reports of the sites that did report are in {report}" in str(failure.value)
    assert sorted(p.name for p in report.iterdir()) == [
        "federation.html",
        "federation.json",
        "site-1.html",
        "site-1.json",
    ]
    assert json.loads((report / "federation.json").read_text())["absent"] == ["site-2"]
    assert "No report from site-2" in (report / "federation.html").read_text()
    # complete reports: no failure, nobody absent
    assert write_job_reports(tmp_path / "result", report, ["site-1"], "packed") == report
    assert json.loads((report / "federation.json").read_text())["absent"] == []


def test_a_long_job_keeps_its_pages_readable(tmp_path):
    """Hundreds of rounds: ten round labels per chart, long tables folded with their size."""
    document = site_document("site-1", 0.8)
    first = document["rounds"][0]
    document["rounds"] = [{**first, "round": number} for number in range(300)]
    write_reports(tmp_path, collected(document))
    page = (tmp_path / "site-1.html").read_text()
    assert page.count("<details><summary>300 rows (show)</summary>") == 1  # training
    assert page.count("<details><summary>301 rows (show)</summary>") == 1  # validation + final
    chart = line_chart({"TC": [(x, 0.5) for x in range(300)]}, "Dice", (0, 1))
    labels = chart.count('text-anchor="middle">')
    assert labels == 11 and ">0</text>" in chart and ">299</text>" in chart  # 10 rounds, "round"
