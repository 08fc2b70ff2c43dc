import re

import pytest
import yaml

from fedseg.config import ConfigError, config_from_dict, load_config


@pytest.mark.parametrize("profile", ["tiny", "gpu"])
def test_profiles_load_and_round_trip(profile):
    config = load_config(profile)
    assert config_from_dict(config.to_dict()) == config


def test_a_yaml_file_overrides_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"training": {"rounds": 7, "learning_rate": 0.01}}))
    config = load_config(path)
    assert config.training.rounds == 7 and config.training.learning_rate == 0.01
    assert config.model.name == "unet"


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"training": {"learning_rat": 0.1}}, "unknown key training.learning_rat "
         "(did you mean training.learning_rate?)"),
        ({"trainig": {}}, "unknown key trainig (did you mean training?)"),
        ({"training": {"rounds": 1.5}}, "training.rounds must be int"),
        ({"training": {"amp": "yes"}}, "training.amp must be true or false"),
        ({"data": {"spacing": [1, 1]}}, "data.spacing must be a list of 3 numbers"),
        ({"data": {"roi_size": [30, 32, 32]}}, "data.roi_size must be multiples of 16"),
        ({"model": {"name": "vnet"}}, "model.name must be one of"),
        ({"training": {"device": "tpu"}}, "training.device must be auto, cpu or cuda"),
        ({"harmonization": {"method": "histogram"}}, "harmonization.method must be"),
    ],
)  # fmt: skip
def test_invalid_configurations_name_the_problem(document, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_dict(document, "run.yaml")


def test_missing_profile(tmp_path):
    with pytest.raises(ConfigError, match="no such file or built-in profile"):
        load_config("huge")
    (tmp_path / "bad.yaml").write_text("training: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
