import re

import pytest
import yaml

from fedseg.config import (
    ConfigError,
    TrainingConfig,
    config_from_dict,
    load_config,
    scheduled_learning_rate,
)


@pytest.mark.parametrize("profile", ["tiny", "demo", "gpu"])
def test_profiles_load_and_round_trip(profile):
    config = load_config(profile)
    assert config_from_dict(config.to_dict()) == config


def test_gpu_options_default_off_and_the_gpu_profile_turns_them_on():
    defaults = config_from_dict({})
    assert not defaults.data.device_cache and defaults.validation.mode == "constant"
    assert not (defaults.training.channels_last or defaults.training.compile)
    assert not defaults.training.cudnn_benchmark
    tiny, gpu = load_config("tiny"), load_config("gpu")  # tiny: the CPU path as it was
    assert not (tiny.data.device_cache or tiny.training.channels_last or tiny.training.compile)
    assert not (tiny.training.amp or tiny.training.cudnn_benchmark)
    assert tiny.validation.mode == "constant"
    assert gpu.data.device_cache and gpu.training.amp and gpu.training.cudnn_benchmark
    assert gpu.validation.mode == "gaussian" and gpu.model.args["in_channels"] == 1


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
        ({"training": {"compile": "yes"}}, "training.compile must be true or false"),
        ({"training": {"channels_last": 1}}, "training.channels_last must be true or false"),
        ({"training": {"cudnn_benchmark": None}},
         "training.cudnn_benchmark must be true or false"),
        ({"training": {"compiled": True}}, "unknown key training.compiled "
         "(did you mean training.compile?)"),
        ({"data": {"device_cache": "gpu"}}, "data.device_cache must be true or false"),
        ({"data": {"num_workers": -1}}, "data.num_workers must be at least 0"),
        ({"validation": {"mode": "linear"}}, "validation.mode must be constant or gaussian"),
        ({"validation": {"sw_batch_size": 0}}, "validation.sw_batch_size must be at least 1"),
        ({"validation": {"every_rounds": 0}}, "validation.every_rounds must be at least 1"),
        ({"validation": {"overlap": 1.0}}, "validation.overlap must be in [0, 1)"),
        ({"training": {"lr_schedule": "cosine"}},
         "training.lr_schedule must be one of poly, constant"),
        ({"training": {"aggregation_weight": "samples"}},
         "training.aggregation_weight must be one of steps, cases"),
        ({"federation": {"task_request_interval": 0}},
         "federation.task_request_interval must be positive"),
        ({"training": {"optimizer": "sgd", "shared_moments": True}},
         "training.shared_moments needs training.optimizer adamw"),
    ],
)  # fmt: skip
def test_invalid_configurations_name_the_problem(document, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_dict(document, "run.yaml")


@pytest.mark.parametrize(
    ("schedule", "step", "total", "rate"),
    [
        ("constant", 0, 10, 0.01),
        ("constant", 9, 10, 0.01),
        ("poly", 0, 10, 0.01),
        ("poly", 5, 10, 0.01 * 0.5**0.9),
        ("poly", 9, 10, 0.01 * 0.1**0.9),
        ("poly", 12, 10, 0.0),  # past the end: clamped, never negative
    ],
)
def test_the_learning_rate_follows_the_schedule(schedule, step, total, rate):
    training = TrainingConfig(learning_rate=0.01, lr_schedule=schedule)
    assert scheduled_learning_rate(training, step, total) == pytest.approx(rate, abs=1e-15)


def test_a_schedule_needs_a_length():
    with pytest.raises(ValueError, match="total_steps must be at least 1"):
        scheduled_learning_rate(TrainingConfig(), 0, 0)


def test_missing_profile(tmp_path):
    with pytest.raises(ConfigError, match="no such file or built-in profile"):
        load_config("huge")
    (tmp_path / "bad.yaml").write_text("training: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
