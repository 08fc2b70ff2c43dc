"""The quality benchmark's stored models stay reachable from its configuration.

``benchmarks/quality.py`` keeps each measured model in a folder named by a digest of its
setting, and a rerun continues from it. A changed default (of the ``tiny`` profile or of the
benchmark's configuration) moves the digest: the rerun would silently start over in a new
folder, hours of measurement later. These tests make that a decision instead.
"""

import copy
import json

import pytest

from benchmarks.quality import ARMS, RUNS_FOLDER, MeasuredModels, run_config


@pytest.mark.parametrize("arm", sorted(ARMS))
def test_the_stored_models_were_measured_with_the_current_configuration(arm):
    (folder,) = RUNS_FOLDER.glob(f"{arm}-*")
    setting = json.loads((folder / "setting.json").read_text())
    arguments = setting["arguments"]
    config = run_config(arguments["rounds"], arguments["local_steps"], ARMS[arm]).to_dict()
    weighting = config["training"].pop("aggregation_weight")
    assert config == setting["config"], (
        f"{folder} was measured with another run configuration; quality.py would measure "
        "every model again in a new folder: keep the defaults, or re-measure and remove it"
    )
    stored = copy.deepcopy(setting)
    stored["config"]["training"]["aggregation_weight"] = weighting
    assert MeasuredModels(RUNS_FOLDER, arm, stored).folder == folder
