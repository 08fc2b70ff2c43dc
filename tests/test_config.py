import math
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

NAN, INF = math.nan, math.inf


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
        ({"training": {"rounds": 1.5}}, "training.rounds must be an integer, got 1.5"),
        ({"training": {"amp": "yes"}}, "training.amp must be true or false"),
        ({"data": {"spacing": [1, 1]}}, "data.spacing must be a list of 3 numbers"),
        ({"data": {"roi_size": [30, 32, 32]}}, "data.roi_size must be positive multiples of 4 "
         "(the total downsampling of model unet with these model.args), got [30, 32, 32]"),
        ({"model": {"name": "vnet"}}, "model.name must be one of"),
        ({"training": {"device": "tpu"}}, "training.device must be auto, cpu, cuda or cuda:N"),
        ({"training": {"device": "cuda:x"}},
         "training.device must be auto, cpu, cuda or cuda:N, got 'cuda:x'"),
        ({"training": {"loss": "dice_ce"}}, "training.loss must be one of dice_bce, dice"),
        ({"training": {"local_epochs": -1}}, "training.local_epochs must be at least 0 (0: off)"),
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
        # nonsense values: out of range, or not finite (nan fails no comparison)
        ({"training": {"weight_decay": -1.0}},
         "training.weight_decay must be at least 0, got -1.0"),
        ({"training": {"learning_rate": NAN}}, "training.learning_rate must be finite, got nan"),
        ({"training": {"learning_rate": INF}}, "training.learning_rate must be finite, got inf"),
        ({"data": {"spacing": [NAN, 1, 1]}}, "data.spacing must be finite, got [nan, 1.0, 1.0]"),
        ({"data": {"spacing": [INF, 1, 1]}}, "data.spacing must be finite, got [inf, 1.0, 1.0]"),
        ({"federation": {"max_update_ratio": NAN}},
         "federation.max_update_ratio must be finite, got nan"),
        ({"federation": {"outlier_factor": NAN}},
         "federation.outlier_factor must be finite, got nan"),
        ({"federation": {"task_request_interval": INF}},
         "federation.task_request_interval must be finite, got inf"),
        ({"data": {"cache_rate": NAN}}, "data.cache_rate must be finite, got nan"),
        ({"harmonization": {"mask": "brian"}},
         "harmonization.mask must be one of otsu, head, brain, nonzero, got 'brian'"),
        ({"harmonization": {"min_images": 0}},
         "harmonization.min_images must be at least 1, got 0"),
        ({"harmonization": {"min_images": -3}},
         "harmonization.min_images must be at least 1, got -3"),
        # tuple items follow the scalar rules
        ({"data": {"roi_size": [32.7, 32, 32]}},
         "data.roi_size must be a list of 3 integers, got [32.7, 32, 32]"),
        ({"data": {"roi_size": [47.9, 48, 48]}},
         "data.roi_size must be a list of 3 integers, got [47.9, 48, 48]"),
        ({"data": {"roi_size": [True, 32, 32]}},
         "data.roi_size must be a list of 3 integers, got [True, 32, 32]"),
        ({"data": {"spacing": [1, False, 1]}},
         "data.spacing must be a list of 3 numbers, got [1, False, 1]"),
        # type errors say what was expected
        ({"training": {"learning_rate": "fast"}},
         "run.yaml: training.learning_rate must be a number, got 'fast'"),
        ({"training": {"rounds": "ten"}},
         "run.yaml: training.rounds must be an integer, got 'ten'"),
        ({"training": {"rounds": None}}, "run.yaml: training.rounds must be an integer, got None"),
        ({"data": {"roi_size": [None, 32, 32]}},
         "run.yaml: data.roi_size must be a list of 3 integers, got [None, 32, 32]"),
        ({"model": {"args": [1]}}, "run.yaml: model.args must be a mapping, got [1]"),
        # sections
        ({"training": 5}, "run.yaml: training must be a mapping, got 5"),
        ({"training": [1]}, "run.yaml: training must be a mapping, got [1]"),
        # model settings that could not run
        ({"model": {"args": {"out_channels": 2}}},
         "model.args.out_channels must be 3 (the pipeline predicts the three BraTS regions), "
         "got 2"),
        ({"model": {"args": {"in_channels": 4}}},
         "model.args.in_channels must be 1 (the data pipeline feeds one image channel), got 4"),
        ({"model": {"name": "segresnet", "args": {"in_channels": 1.0}}},
         "model.args.in_channels must be 1"),
        ({"model": {"args": {"num_res_unit": 2}}},
         "run.yaml: model.args: network unet: SmallUNet.__init__() got an unexpected keyword "
         "argument 'num_res_unit'"),
        ({"model": {"args": {"channels": [8, 16, 32], "strides": [2]}}},
         "run.yaml: model.args: the length of `strides` should equal to `len(channels) - 1`"),
        ({"model": {"name": "segresnet", "args": {"dropout_prob": 2}}},
         "run.yaml: model.args: dropout probability has to be between 0 and 1"),
        ({"model": {"args": {"channels": [4, 8, 16, 32, 64, 128], "strides": [2, 2, 2, 2, 2]}},
          "data": {"roi_size": [48, 48, 48]}},
         "data.roi_size must be positive multiples of 32 (the total downsampling of model unet "
         "with these model.args), got [48, 48, 48]"),
        ({"model": {"name": "segresnet"}, "data": {"roi_size": [36, 40, 40]}},
         "data.roi_size must be positive multiples of 8"),
        ({"model": {"name": "vnet"}, "data": {"roi_size": [0, 40, 40]}},
         "data.roi_size must be positive, got [0, 40, 40]"),
    ],
)  # fmt: skip
def test_invalid_configurations_name_the_problem(document, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_dict(document, "run.yaml")


def test_all_problems_of_a_file_are_reported_together():
    document = {
        "model": {"args": {"out_channels": 2}},
        "harmonization": {"mask": "brian"},
        "training": {"learning_rate": NAN, "weight_decay": -1.0},
        "federation": {"outlier_factor": NAN},
    }
    with pytest.raises(ConfigError) as raised:
        config_from_dict(document, "run.yaml")
    message = str(raised.value)
    assert message.startswith("run.yaml: ")
    for key in (
        "model.args.out_channels",
        "harmonization.mask",
        "training.learning_rate",
        "training.weight_decay",
        "federation.outlier_factor",
    ):
        assert message.count(f"{key} must be") == 1, key  # one problem per key
    assert "learning_rate must be positive" not in message  # not finite says it all


def test_values_are_read_as_their_fields_types():
    config = config_from_dict(
        {
            "data": {"spacing": [2, 2, 3], "roi_size": [64, 32, 48]},
            "training": {"learning_rate": "1e-4", "weight_decay": 0},  # PyYAML: 1e-4 is a string
        }
    )
    assert config.data.spacing == (2.0, 2.0, 3.0) and config.data.roi_size == (64, 32, 48)
    assert all(type(v) is float for v in config.data.spacing)
    assert config.training.learning_rate == 1e-4 and type(config.training.weight_decay) is float
    # SegResNet divides by 8: 40 is fine (not a multiple of 16, which used to be required)
    segresnet = config_from_dict(
        {"model": {"name": "segresnet"}, "data": {"roi_size": [40, 40, 40]}}
    )
    assert segresnet.data.roi_size == (40, 40, 40)


def test_yaml_nan_and_inf_are_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("training:\n  learning_rate: .nan\ndata:\n  spacing: [.inf, 1, 1]\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert str(raised.value) == (
        f"{path}: data.spacing must be finite, got [inf, 1.0, 1.0]; "
        "training.learning_rate must be finite, got nan"
    )


def test_an_empty_section_stands_for_the_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("training:\n  # rounds: 7\nfederation:\ndata: {roi_size: [64, 64, 64]}\n")
    config = load_config(path)
    assert config.training == config_from_dict({}).training
    assert config.federation == config_from_dict({}).federation
    assert config.data.roi_size == (64, 64, 64)
    (tmp_path / "empty.yaml").write_text("# nothing set\n")
    assert load_config(tmp_path / "empty.yaml") == config_from_dict({})
    (tmp_path / "scalar.yaml").write_text("5\n")
    with pytest.raises(
        ConfigError, match=re.escape("scalar.yaml: top level must be a mapping, got 5")
    ):
        load_config(tmp_path / "scalar.yaml")


def test_duplicate_keys_are_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "training:\n"
        "  rounds: 7\n"
        "  learning_rate: 0.01\n"
        "  rounds: 8\n"
        "data:\n"
        "  cache_rate: 0.5\n"
        "training:\n"
        "  local_steps: 3\n"
    )
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert str(raised.value) == (
        f"{path}: duplicate key rounds on line 4 (first on line 2; YAML would keep only the "
        "last); duplicate key training on line 7 (first on line 1; YAML would keep only the last)"
    )
    merged = tmp_path / "merged.yaml"  # a merge key's settings may be overridden
    merged.write_text("training:\n  <<: {rounds: 3, local_steps: 4}\n  rounds: 5\n")
    config = load_config(merged)
    assert config.training.rounds == 5 and config.training.local_steps == 4


def test_a_round_is_local_steps_or_local_epochs_over_the_sites_own_cases():
    by_steps = config_from_dict({"training": {"local_steps": 20, "batch_size": 4}}).training
    assert by_steps.steps_per_round(3) == by_steps.steps_per_round(90) == 20
    by_epochs = config_from_dict(
        {"training": {"local_epochs": 2, "local_steps": 20, "batch_size": 4}}
    ).training
    assert [by_epochs.steps_per_round(cases) for cases in (1, 4, 5, 90)] == [2, 2, 4, 46]
    with pytest.raises(ValueError, match="training_cases must be at least 1"):
        by_epochs.steps_per_round(0)


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
