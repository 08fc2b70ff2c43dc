"""The server's store of declared site reports, and the loud failure on missing results."""

import json

import pytest

from app_server.site_reports import (
    SITE_REPORTS_FILE,
    SiteReportError,
    SiteReports,
    read_site_reports,
)

CASES = [{"case_id": "case-0123456789ab", "dice": {"TC": 0.5, "WT": 0.6, "ET": 0.4},
          "hd95": {"TC": 3.0, "WT": 2.0, "ET": None}}]  # fmt: skip
METRICS = {"dice_TC": 0.5, "dice_WT": 0.6, "dice_ET": 0.4, "dice_mean": 0.5,
           "hd95_TC": 3.0, "hd95_WT": 2.0, "hd95_ET": 373.1}  # fmt: skip
SITE = {
    "device": "cpu",
    "data": {"training_cases": 3, "validation_cases": 1, "qc_counts": {"accepted": 4}},
    "harmonization_hash": "ab" * 32,
}


def round_report(loss=1.0):
    return {
        **SITE,
        "validation": {"metrics": dict(METRICS), "cases": CASES},
        "training": {"loss": loss, "steps": 8, "seconds": 1.5, "weight": 24},
    }


def test_rounds_and_final_validation_make_one_document_per_site(tmp_path):
    store = SiteReports(tmp_path / SITE_REPORTS_FILE, "he-packed")
    store.record_round("site-2", 1, round_report(0.5))
    store.record_round("site-1", 0, round_report())
    store.record_round("site-2", 0, round_report())
    store.record_round("site-2", 1, round_report(0.4))  # a repeated round replaces, never doubles
    store.record_final("site-2", {**SITE, "validation": {"metrics": METRICS, "cases": CASES}})
    store.record_contributors(0, ["site-2", "site-1"])
    store.record_refusal("site-1", 1, "refused at the site: non-finite values")
    store.record_contributors(1, ["site-2"])
    content = json.loads((tmp_path / SITE_REPORTS_FILE).read_text())
    assert content["mode"] == "he-packed"
    assert content["round_contributors"] == {"0": ["site-1", "site-2"], "1": ["site-2"]}
    assert content["refusals"] == [
        {"site": "site-1", "round": 1, "reason": "refused at the site: non-finite values"}
    ]
    site_2 = content["sites"]["site-2"]
    assert [r["round"] for r in site_2["rounds"]] == [0, 1]
    assert site_2["rounds"][1]["train_loss"] == 0.4
    assert site_2["rounds"][1]["aggregation_weight"] == 24
    assert site_2["final"]["metrics"] == METRICS and content["sites"]["site-1"]["final"] is None
    reopened = SiteReports.open(tmp_path / SITE_REPORTS_FILE, "he-packed")
    assert reopened.to_dict() == content  # a restarted server goes on from the file


def test_a_round_is_written_once_aggregated_or_flushed_and_refusals_at_once(tmp_path):
    path = tmp_path / SITE_REPORTS_FILE
    store = SiteReports(path, "plaintext")
    for site in ("site-1", "site-2"):
        store.record_round(site, 0, round_report())
    assert not path.exists()  # held until the round is aggregated
    store.record_contributors(0, ["site-1", "site-2"])
    content = json.loads(path.read_text())
    assert content["round_contributors"] == {"0": ["site-1", "site-2"]}
    assert [r["round"] for r in content["sites"]["site-2"]["rounds"]] == [0]
    path.unlink()
    store.flush()
    assert not path.exists()  # nothing new: nothing written
    store.record_round("site-1", 1, round_report(0.5))
    store.flush()  # a round without contributors (NVFlare's stock aggregator)
    assert json.loads(path.read_text())["sites"]["site-1"]["rounds"][-1]["round"] == 1
    store.record_round("site-1", 2, round_report(0.25))
    store.record_refusal("site-2", 2, "refused at the site: non-finite values")
    content = json.loads(path.read_text())  # a refusal is written at once, with what it follows
    assert content["refusals"][0]["site"] == "site-2"
    assert content["sites"]["site-1"]["rounds"][-1]["train_loss"] == 0.25


def test_a_report_without_its_fields_is_refused(tmp_path):
    store = SiteReports(tmp_path / SITE_REPORTS_FILE, "plaintext")
    with pytest.raises(SiteReportError, match="site-1's report lacks training"):
        store.record_round("site-1", 0, {**SITE, "validation": {}})
    with pytest.raises(SiteReportError, match="site-1 sent no report"):
        store.record_final("site-1", None)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"data": {**SITE["data"], "training_cases": "<script>"}}, "data.training_cases"),
        ({"data": {**SITE["data"], "qc_counts": {"accepted": "<img>"}}}, "data.qc_counts"),
        ({"device": 0}, "device is not a string"),
        ({"training": {"loss": "low", "steps": 8, "seconds": 1.0}}, "training.loss"),
        ({"training": {"loss": 0.5, "steps": 8.5, "seconds": 1.0}}, "training.steps"),
        ({"validation": {"metrics": {"dice_WT": None}, "cases": []}}, "validation.metrics"),
        ({"validation": {"metrics": METRICS, "cases": [{"case_id": 7}]}}, "validation.cases"),
        # every region's summary and per-case metrics, or the reports could not be rendered
        (
            {
                "validation": {
                    "metrics": {k: v for k, v in METRICS.items() if k != "hd95_ET"},
                    "cases": CASES,
                }
            },
            "validation.metrics is not a mapping of numbers with",
        ),
        (
            {"validation": {"metrics": METRICS, "cases": [{**CASES[0], "dice": {"WT": 0.6}}]}},
            "validation.cases is not case ids with Dice and HD95 numbers of TC, WT, ET",
        ),
    ],
)
def test_a_report_of_the_wrong_form_is_refused_and_nothing_recorded(tmp_path, change, message):
    """What a site declares reaches the pages; a wrong type is refused, naming the field."""
    store = SiteReports(tmp_path / SITE_REPORTS_FILE, "plaintext")
    with pytest.raises(SiteReportError, match=rf"site-1's report: {message}"):
        store.record_round("site-1", 0, {**round_report(), **change})
    assert store.sites == {}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: None, None),
        (lambda s: s.sites.pop("site-2"), "site-2 reported no training round"),
        (lambda s: s.sites["site-2"].update(final=None), "site-2 did not validate the final"),
        (lambda s: s.sites["site-1"]["rounds"][0]["metrics"].update(dice_WT=float("nan")),
         "site-1 reported non-finite Dice"),
    ],
)  # fmt: skip
def test_missing_or_broken_results_fail_loudly(tmp_path, change, message):
    store = SiteReports(tmp_path / "server" / SITE_REPORTS_FILE, "he-packed")
    for site in ("site-1", "site-2"):
        store.record_round(site, 0, round_report())
        store.record_final(site, {**SITE, "validation": {"metrics": dict(METRICS), "cases": CASES}})
    change(store)
    store._write()
    if message is None:
        assert sorted(read_site_reports(tmp_path, ["site-1", "site-2"])["sites"]) == [
            "site-1",
            "site-2",
        ]
    else:
        with pytest.raises(RuntimeError, match=message):
            read_site_reports(tmp_path, ["site-1", "site-2"])


def test_a_job_without_final_validation_is_read_when_told(tmp_path):
    store = SiteReports(tmp_path / SITE_REPORTS_FILE, "he-stock")
    store.record_round("site-1", 0, round_report())
    store.flush()
    with pytest.raises(RuntimeError, match="did not validate the final"):
        read_site_reports(tmp_path, ["site-1"])
    assert read_site_reports(tmp_path, ["site-1"], final=False)["mode"] == "he-stock"


def test_a_round_without_validation_is_recorded_and_read(tmp_path):
    """validation.every_rounds > 1: the site trained but did not validate the model it got."""
    store = SiteReports(tmp_path / SITE_REPORTS_FILE, "plaintext")
    store.record_round("site-1", 0, round_report())
    store.record_round("site-1", 1, {**round_report(0.5), "validation": None})
    store.record_final("site-1", {**SITE, "validation": {"metrics": METRICS, "cases": CASES}})
    rounds = read_site_reports(tmp_path, ["site-1"])["sites"]["site-1"]["rounds"]
    assert [(r["round"], r["metrics"], r["cases"]) for r in rounds][1] == (1, None, [])
    assert rounds[1]["train_loss"] == 0.5 and rounds[0]["metrics"] == METRICS


def test_no_reports_at_all_fail_loudly(tmp_path):
    with pytest.raises(RuntimeError, match="recorded no site reports"):
        read_site_reports(tmp_path, ["site-1"])
