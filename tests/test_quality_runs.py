"""The quality benchmark's stored models stay reachable from its command line.

``benchmarks/quality.py`` keeps each measured model in a folder named by a digest of its
setting, and a rerun continues from it. A changed default (of the ``tiny`` profile, of the
benchmark's configuration or of its arguments) moves the digest: the rerun would silently
start over in a new folder, hours of measurement later. These tests make that a decision.
"""

import copy
import json

import pytest

from benchmarks.quality import (
    ARMS,
    RUNS_FOLDER,
    SETTING_ARGUMENTS,
    MeasuredModels,
    argument_parser,
    run_config,
)

STORED = [
    (folder, json.loads((folder / "setting.json").read_text()))
    for folder in sorted(RUNS_FOLDER.glob("*-*"))
]


@pytest.mark.parametrize("arm", sorted(ARMS))
def test_the_default_measurement_of_each_arm_is_stored(arm):
    defaults = argument_parser().parse_args([])
    arguments = {key: getattr(defaults, key) for key in SETTING_ARGUMENTS}
    config = run_config(
        defaults.rounds, defaults.local_steps, ARMS[arm], defaults.aggregation_weight
    ).to_dict()
    del config["training"]["aggregation_weight"]  # names files within a folder, not the folder
    matching = [
        folder
        for folder, setting in STORED
        if setting["arm"] == arm
        and setting["arguments"] == arguments
        and setting["config"] == config
    ]
    assert matching, (
        f"no folder in {RUNS_FOLDER} holds the {arm} arm measured with the benchmark's defaults: "
        "a default changed since, and `python benchmarks/quality.py` would measure every model "
        "again; keep the default, or re-measure and remove the old folder"
    )


@pytest.mark.parametrize(("folder", "setting"), STORED, ids=[f.name for f, _ in STORED])
def test_each_stored_folder_is_named_by_its_setting(folder, setting):
    with_weighting = copy.deepcopy(setting)
    with_weighting["config"]["training"]["aggregation_weight"] = "cases"
    assert MeasuredModels(RUNS_FOLDER, setting["arm"], with_weighting).folder == folder
