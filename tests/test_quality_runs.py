"""The quality benchmark's stored models stay reachable from its command line.

``benchmarks/quality.py`` keeps each measured model in a folder named by a digest of its
setting, and a rerun continues from it. A changed default (of the ``tiny`` profile, of the
benchmark's configuration or of its arguments) moves the digest or the FedAvg file name: the
rerun would silently start over, hours of measurement later. These tests make that a decision.
"""

import json
import re

import pytest

from benchmarks.quality import (
    ARMS,
    RUNS_FOLDER,
    MeasuredModels,
    argument_parser,
    arm_folder,
    arm_runs,
    folders_on_other_data,
    model_setting,
    run_config,
)
from fedseg.config import AGGREGATION_WEIGHTS

FEDAVG_FILE = re.compile(
    rf"seed-(\d+)-fedavg-(\d+)x(\d+)-by-({'|'.join(AGGREGATION_WEIGHTS)})\.json"
)
OTHER_MODEL_FILE = re.compile(r"seed-(\d+)-(centralized|local-site-\d+)\.json")
STORED = [
    (folder, json.loads((folder / "setting.json").read_text()))
    for folder in sorted(RUNS_FOLDER.glob("*-*"))
]


@pytest.mark.parametrize("arm", sorted(ARMS))
def test_the_default_measurement_of_each_arm_is_stored(arm):
    defaults = argument_parser().parse_args([])
    config = run_config(
        defaults.rounds, defaults.local_steps, ARMS[arm], defaults.aggregation_weight
    )
    expected = model_setting(defaults, config)
    matching = [
        (folder, setting)
        for folder, setting in STORED
        if setting["arm"] == arm and all(setting[key] == value for key, value in expected.items())
    ]
    assert matching, (
        f"no folder in {RUNS_FOLDER} holds the {arm} arm measured with the benchmark's defaults: "
        "a default changed since, and `python benchmarks/quality.py` would measure every model "
        "again; keep the default, or re-measure and remove the old folder"
    )
    missing = {}
    for folder, setting in matching:
        store = MeasuredModels(RUNS_FOLDER, setting, config)
        paths = [store.path(run) for run in arm_runs(0, 1)]
        missing[folder.name] = [path.name for path in paths if not path.is_file()]
    assert not all(missing.values()), (
        f"{missing}: the default FedAvg schedule or weighting changed since these models were "
        "measured"
    )


@pytest.mark.parametrize(("folder", "setting"), STORED, ids=[f.name for f, _ in STORED])
def test_each_stored_folder_is_named_by_its_setting(folder, setting):
    assert arm_folder(RUNS_FOLDER, setting) == folder


@pytest.mark.parametrize(("folder", "setting"), STORED, ids=[f.name for f, _ in STORED])
def test_each_stored_fedavg_model_is_named_by_its_schedule_and_weighting(folder, setting):
    """FedAvg models are compared with the folder's centralized ones: they share its budget.

    A folder being measured may not hold its FedAvg models yet; every model file it holds is
    named as the benchmark names them.
    """
    models = sorted(folder.glob("seed-*.json"))
    assert models, f"{folder.name} holds no model"
    assert all(
        OTHER_MODEL_FILE.fullmatch(path.name) or FEDAVG_FILE.fullmatch(path.name) for path in models
    ), [path.name for path in models]
    for path in folder.glob("seed-*-fedavg*.json"):
        match = FEDAVG_FILE.fullmatch(path.name)
        assert match, f"{path.name}: expected seed-K-fedavg-RxS-by-WEIGHT.json"
        seed, rounds, local_steps, weighting = match.groups()
        result = json.loads(path.read_text())
        training = result["training"]
        assert result["seed"] == int(seed), path.name
        assert training["rounds"] == int(rounds), path.name
        assert set(training["steps_per_site"].values()) == {int(rounds) * int(local_steps)}, (
            path.name
        )
        assert int(rounds) * int(local_steps) == setting["budget_steps"], path.name
        # models measured before the option existed were weighted by steps and do not say so
        assert training.get("aggregation_weight", "steps") == weighting, path.name


@pytest.mark.parametrize(("folder", "setting"), STORED, ids=[f.name for f, _ in STORED])
def test_a_stored_folder_on_other_data_is_named_to_the_machine_that_measures_anew(folder, setting):
    """The same code wrote other data on another machine: its models are not mixed in."""
    assert folder not in folders_on_other_data(RUNS_FOLDER, setting)
    elsewhere = folders_on_other_data(RUNS_FOLDER, {**setting, "data": "0" * 64})
    assert folder in elsewhere
    assert all(path.name.startswith(f"{setting['arm']}-") for path in elsewhere)
