"""What a site declares with its update: weight, validation summary, case pseudonyms."""

import pytest

from app_site.engine import CaseMetrics
from app_site.training_task import (
    aggregation_weight,
    case_pseudonym,
    check_fedseg_version,
    summarize,
)
from fedseg.config import ConfigError


def test_steps_weigh_every_full_round_alike_and_cases_follow_the_training_split():
    assert aggregation_weight("steps", 20, 22, 20) == aggregation_weight("steps", 20, 14, 20) == 20
    assert aggregation_weight("cases", 20, 22, 20) == 22
    assert aggregation_weight("cases", 10, 22, 20) == 11  # half a round counts half
    with pytest.raises(ValueError, match="steps or cases, got 'samples'"):
        aggregation_weight("samples", 20, 22, 20)


def test_the_summary_counts_every_case_and_refuses_none():
    found = CaseMetrics("case-a", {"TC": 0.8, "WT": 0.9, "ET": 0.7}, {"TC": 2, "WT": 1, "ET": 3})
    missed = CaseMetrics("case-b", {"TC": 0.6, "WT": 0.7, "ET": 0.0}, {"TC": 4, "WT": 3, "ET": 99})
    summary = summarize([found, missed])
    assert summary["dice_ET"] == pytest.approx(0.35)
    assert summary["hd95_ET"] == pytest.approx(51.0)  # the missed ET counts, at its worst
    assert summary["dice_mean"] == pytest.approx((0.7 + 0.8 + 0.35) / 3)
    with pytest.raises(ValueError, match="no validation case"):
        summarize([])


def test_a_pseudonym_is_stable_for_its_key_and_says_nothing_without_it():
    key, other = b"k" * 32, b"o" * 32
    pseudonym = case_pseudonym(key, "case-0123456789ab")
    assert pseudonym == case_pseudonym(key, "case-0123456789ab")  # one job: one name per case
    assert pseudonym.startswith("case-") and len(pseudonym) == len("case-0123456789ab")
    assert pseudonym != "case-0123456789ab"
    assert pseudonym != case_pseudonym(other, "case-0123456789ab")
    assert pseudonym != case_pseudonym(key, "case-0123456789ac")


def test_a_job_built_with_another_fedseg_is_refused_naming_both_versions():
    check_fedseg_version({"fedseg_version": "0.2.0"}, installed="0.2.0")
    check_fedseg_version({})  # a job built before the manifest recorded it
    with pytest.raises(
        ConfigError,
        match=r"runs fedseg 0\.1\.0, but the job was built with "
        r"fedseg 0\.2\.0; refusing to train: install fedseg 0\.2\.0",
    ):
        check_fedseg_version({"fedseg_version": "0.2.0"}, installed="0.1.0")
