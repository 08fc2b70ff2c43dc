"""The quality benchmark's reading of goal 1 apart by tumour-core size."""

import nibabel as nib
import numpy as np
import pytest

from benchmarks.quality import (
    REGIONS,
    SMALL_TUMOUR_CORE_ML,
    TRAINING_SITES,
    fedavg_gaps,
    fedavg_gaps_by_tumour_core,
    tumour_core_ml,
)


def test_tumour_core_counts_labels_1_and_3_at_the_header_spacing(tmp_path):
    label = np.zeros((6, 6, 6), dtype=np.uint8)
    label[0, 0, :5] = 1  # necrosis: tumour core
    label[1, :4, 0] = 3  # enhancing: tumour core
    label[2:4, 2:4, 2:4] = 2  # oedema: whole tumour only
    path = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(label, np.diag([2.0, 1.0, 1.5, 1.0])), path)
    assert tumour_core_ml(path) == pytest.approx(9 * 3.0 / 1000.0)


def evaluation(cases: dict[str, list[float]]) -> dict:
    return {site: {"cases": {r: values for r in REGIONS}} for site, values in cases.items()}


def test_the_gap_is_split_at_the_small_tumour_core_volume():
    small, large = SMALL_TUMOUR_CORE_ML - 1.0, SMALL_TUMOUR_CORE_ML + 1.0
    cores = {"site-1": [large, large], "site-2": [large, large], "site-3": [small, large, small]}
    central = {"site-1": [0.9, 0.8], "site-2": [0.9, 0.9], "site-3": [0.6, 0.9, 0.7]}
    seed_0 = {"site-1": [0.9, 0.8], "site-2": [0.8, 0.8], "site-3": [0.4, 0.9, 0.5]}
    seed_1 = {"site-1": [0.9, 0.8], "site-2": [0.8, 0.8], "site-3": [0.5, 0.9, 0.5]}
    arm = {
        "repeats": {
            "centralized": [evaluation(central), evaluation(central)],
            "fedavg": [evaluation(seed_0), evaluation(seed_1)],
        }
    }

    strata = fedavg_gaps_by_tumour_core(arm, cores)

    assert set(strata) == set(TRAINING_SITES)
    assert strata["site-1"]["small"] == {"cases": 0, "gap": {}}
    site_3 = strata["site-3"]
    assert (site_3["small"]["cases"], site_3["other"]["cases"]) == (2, 1)
    small_gap = site_3["small"]["gap"]["TC"]
    assert small_gap["gap"] == pytest.approx(0.175)
    assert small_gap["per_seed"] == pytest.approx([0.2, 0.15])
    assert site_3["other"]["gap"]["TC"]["gap"] == pytest.approx(0.0)
    assert strata["site-2"]["other"]["gap"]["WT"] == fedavg_gaps(arm)["site-2"]["WT"]
