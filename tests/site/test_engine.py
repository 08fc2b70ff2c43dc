"""The site engine on a real (simulated, ingested) dataset, on the CPU (and CUDA when present).

CUDA-only decisions are pure functions of the configuration and the device, checked here for
a CUDA device without needing one; the engine tests run on whatever device is available.
"""

import dataclasses
import logging
import math
import threading

import numpy as np
import pytest
import torch
from monai.data import load_decathlon_datalist

from app_site.engine import (
    SegmentationEngine,
    ValidationResult,
    build_device_training_transforms,
    build_transforms,
    label_regions,
    plan_acceleration,
    region_metrics,
    select_device,
)
from app_site.harmonization import site_statistics
from fedseg.config import RunConfig, load_config, scheduled_learning_rate
from fedseg.harmonization import HarmonizationConfig, artifact_transform, combine_statistics
from fedseg.moments import moment_name
from transforms.regions import LabelsToRegions

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def harmonization(datasets):
    stats = site_statistics(datasets["site-1"], HarmonizationConfig(min_images=2))
    artifact = combine_statistics(HarmonizationConfig(min_images=2), {"site-1": stats}, "MR")
    return artifact_transform(artifact)


@pytest.fixture(scope="module")
def engine(datasets, harmonization):
    return SegmentationEngine(load_config("tiny"), datasets["site-1"], harmonization)


def variant(config: RunConfig, **sections: dict) -> RunConfig:
    """``config`` with some keys of some sections replaced."""
    changes = {
        name: dataclasses.replace(getattr(config, name), **keys) for name, keys in sections.items()
    }
    return dataclasses.replace(config, **changes)


def test_training_lowers_the_loss(engine):
    first = engine.train(6)
    for _ in range(4):
        last = engine.train(6)
    assert first.steps == 6 and math.isfinite(first.mean_loss)
    assert last.mean_loss < first.mean_loss


def test_training_is_reproducible_when_sites_share_a_process(datasets):
    """NVFlare's simulator runs sites as threads of one process: each must train the same."""
    config = load_config("tiny")
    start = SegmentationEngine(config, datasets["site-1"], device=CPU).weights()

    def train(results: list) -> None:
        engine = SegmentationEngine(config, datasets["site-1"], device=CPU)
        engine.load_weights(start)
        engine.train(4, first_step=2, total_steps=8)
        results.append((engine.weights(), engine.optimizer.param_groups[0]["lr"]))

    alone: list = []
    train(alone)
    together: list = []
    threads = [threading.Thread(target=train, args=(together,)) for _ in range(2)]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        torch.rand(64)  # another user of the process-wide generator
    for thread in threads:
        thread.join()
    (weights, rate), *_ = alone
    assert rate == pytest.approx(scheduled_learning_rate(config.training, 5, 8))
    for other, _ in together:
        assert all(np.array_equal(weights[key], other[key]) for key in weights)


def test_a_round_in_local_epochs_passes_over_the_sites_training_cases(datasets):
    config = variant(load_config("tiny"), training={"local_epochs": 2, "batch_size": 1})
    engine = SegmentationEngine(config, datasets["site-1"], device=CPU)
    cases = len(engine.train_files)
    assert cases > config.training.batch_size, "the test needs more than one batch per epoch"
    assert engine.steps_per_round == 2 * cases != config.training.local_steps
    engine.train(engine.steps_per_round)
    # the learning rate decays over the rounds of this site's own length
    total = config.training.rounds * engine.steps_per_round
    rate = scheduled_learning_rate(config.training, engine.steps_per_round - 1, total)
    assert engine.optimizer.param_groups[0]["lr"] == pytest.approx(rate)


def test_validation_gives_metrics_per_region_and_case(engine):
    validation = engine.validate()
    results = validation.cases
    assert len(results) == len(engine.validation_files) >= 1
    assert 0.0 < validation.inference_seconds <= validation.seconds
    for case in results:
        assert set(case.dice) == {"TC", "WT", "ET"}
        assert all(0.0 <= value <= 1.0 for value in case.dice.values())
        assert all(v >= 0 for v in case.hd95.values())


def test_weights_round_trip(engine):
    weights = engine.weights()
    changed = {k: v + 1.0 if v.dtype.kind == "f" else v for k, v in weights.items()}
    engine.load_weights(changed)
    restored = engine.weights()
    key = next(k for k, v in weights.items() if v.dtype.kind == "f")
    np.testing.assert_allclose(restored[key], weights[key] + 1.0)
    engine.load_weights(weights)


def test_gradient_rms_is_shared_through_adamw_state(datasets, harmonization):
    """Sites start a round from the shared gradient RMS; a fresh site gets a full AdamW state."""
    config = load_config("tiny")
    trained = SegmentationEngine(config, datasets["site-1"], harmonization)
    assert all(not np.any(v) for v in trained.gradient_rms().values()), "zeros before a step"
    trained.train(3)
    shared = trained.gradient_rms()
    parameters = dict(trained.model.named_parameters())
    assert set(shared) == {moment_name(name) for name in parameters}
    for name, parameter in parameters.items():
        expected = trained.optimizer.state[parameter]["exp_avg_sq"].sqrt().numpy()
        np.testing.assert_allclose(shared[moment_name(name)], expected)
    assert any(np.any(v > 0) for v in shared.values())

    fresh = SegmentationEngine(config, datasets["site-2"], harmonization)
    fresh.load_gradient_rms({k: np.zeros_like(v) for k, v in shared.items()}, steps_done=0)
    assert not fresh.optimizer.state, "zeros from the initial model change nothing"
    noisy = {k: v - 1e-9 for k, v in shared.items()}  # CKKS noise around zero
    fresh.load_gradient_rms(noisy, steps_done=30)
    for name, parameter in fresh.model.named_parameters():
        state = fresh.optimizer.state[parameter]
        np.testing.assert_allclose(
            state["exp_avg_sq"].numpy(), np.maximum(noisy[moment_name(name)], 0) ** 2
        )
        assert float(state["step"]) == 30 and not state["exp_avg"].any()
    before = fresh.weights()
    fresh.train(2)  # AdamW accepts the state it was given and moves the weights
    assert any(not np.array_equal(before[k], v) for k, v in fresh.weights().items())

    trained.load_gradient_rms(fresh.gradient_rms(), steps_done=3)
    own = trained.optimizer.state[next(trained.model.parameters())]
    assert float(own["step"]) == 3, "a site keeps its own step count and momentum"
    wrong = dict(shared)
    wrong.pop(next(iter(wrong)))
    with pytest.raises(ValueError, match=r"missing optimizer\.grad_rms"):
        trained.load_gradient_rms(wrong, steps_done=3)
    with pytest.raises(ValueError, match="non-finite"):
        trained.load_gradient_rms({k: v * np.nan for k, v in shared.items()}, steps_done=3)


def test_region_metric_conventions():
    empty = torch.zeros(3, 8, 8, 8, dtype=torch.bool)
    full = empty.clone()
    full[:, 2:6, 2:6, 2:6] = True
    both_empty = region_metrics("a", empty, empty, (1.0, 1.0, 1.0))
    assert both_empty.dice == {"TC": 1.0, "WT": 1.0, "ET": 1.0} and both_empty.hd95["WT"] == 0.0
    # a region missed, or predicted where there is none, scores the grid's diagonal (mm)
    missed = region_metrics("b", empty, full, (1.0, 1.0, 1.0))
    assert missed.dice["WT"] == 0.0 and missed.hd95["WT"] == pytest.approx(8 * 3**0.5)
    invented = region_metrics("b", full, empty, (2.0, 1.0, 1.0))
    assert invented.dice["ET"] == 0.0 and invented.hd95["ET"] == pytest.approx(384**0.5)
    shifted = full.roll(1, dims=1)
    partial = region_metrics("c", shifted, full, (2.0, 2.0, 2.0))
    assert partial.dice["WT"] == pytest.approx(0.75) and partial.hd95["WT"] == pytest.approx(2.0)


def test_device_selection():
    if torch.cuda.is_available():
        assert select_device("auto").type == "cuda"
    else:
        with pytest.raises(RuntimeError, match="no CUDA device"):
            select_device("cuda")
        with pytest.raises(RuntimeError, match="no CUDA device"):
            select_device("cuda:1")
        assert select_device("auto").type == "cpu"
    assert select_device("cpu").type == "cpu"
    count = torch.cuda.device_count()
    if count:
        assert select_device(f"cuda:{count - 1}") == torch.device("cuda", count - 1)
        with pytest.raises(RuntimeError, match=f"has {count} CUDA device"):
            select_device(f"cuda:{count}")


def test_training_refuses_zero_steps(engine):
    with pytest.raises(ValueError, match="steps must be at least 1, got 0"):
        engine.train(0)


def test_plan_on_cuda_uses_bf16_where_supported_else_fp16_with_scaling():
    config = variant(load_config("gpu"), training={"compile": True, "channels_last": True})
    bf16 = plan_acceleration(config, CUDA, bf16_supported=True)
    assert bf16.amp_dtype == torch.bfloat16 and not bf16.grad_scaling
    assert bf16.compile and bf16.cudnn_benchmark and bf16.device_cache and bf16.channels_last
    assert bf16.not_applied == ()
    assert bf16.describe() == (
        "cuda: bf16 autocast, channels-last 3D, torch.compile, cuDNN autotuning, "
        "training cache on the device (ThreadDataLoader)"
    )
    fp16 = plan_acceleration(config, CUDA, bf16_supported=False)
    assert fp16.amp_dtype == torch.float16 and fp16.grad_scaling
    assert fp16.describe().startswith("cuda: fp16 autocast with gradient scaling")
    plain = plan_acceleration(variant(config, training={"amp": False}), CUDA, True)
    assert plain.amp_dtype is None and not plain.grad_scaling


def test_plan_on_cpu_names_the_cuda_only_options_it_leaves_out():
    config = variant(load_config("gpu"), training={"compile": True, "channels_last": True})
    plan = plan_acceleration(config, CPU, bf16_supported=False)
    assert plan.amp_dtype is None and not plan.compile and not plan.cudnn_benchmark
    assert plan.channels_last and plan.device_cache  # both work on any device
    assert plan.describe() == (
        "cpu: float32, channels-last 3D, training cache on the device (ThreadDataLoader); "
        "not applied on cpu (CUDA only): training.amp, training.compile, "
        "training.cudnn_benchmark"
    )
    tiny = plan_acceleration(load_config("tiny"), CPU, bf16_supported=False)
    assert tiny.describe() == "cpu: float32, training cache in host memory (DataLoader)"


def test_label_regions_matches_the_numpy_transform():
    label = torch.tensor([0, 1, 2, 3, 3, 0], dtype=torch.uint8).reshape(1, 6, 1, 1)
    expected = LabelsToRegions()(label.float())
    regions = label_regions(label)
    assert regions.dtype == torch.float32 and regions.shape == (3, 6, 1, 1)
    np.testing.assert_array_equal(regions.numpy(), np.asarray(expected))
    with pytest.raises(ValueError, match="one-channel label map"):
        label_regions(torch.zeros(2, 4, 4, 4))


def test_device_pipeline_draws_the_same_crops_as_the_host_pipeline(datasets, harmonization):
    config = load_config("tiny")
    files = load_decathlon_datalist(datasets["site-1"] / "datalist.json", data_list_key="training")
    host = build_transforms(config, harmonization, train=True).set_random_state(seed=3)
    device = build_device_training_transforms(config, harmonization, CPU).set_random_state(seed=3)
    for item in files:
        (expected,) = host(item)
        (actual,) = device(item)
        assert type(actual["image"]) is torch.Tensor  # no metadata on the device path
        assert actual["image"].shape == (1, *config.data.roi_size)
        for key in ("image", "label"):
            assert actual[key].dtype == torch.float32
            np.testing.assert_array_equal(actual[key].numpy(), expected[key].numpy())


@pytest.mark.parametrize(
    ("channels_last", "device_cache", "mode"),
    [(True, False, "constant"), (False, True, "gaussian"), (True, True, "gaussian")],
)
def test_engine_options_train_and_validate(datasets, channels_last, device_cache, mode):
    config = variant(
        load_config("tiny"),
        data={"device_cache": device_cache},
        training={"channels_last": channels_last, "compile": False},
        validation={"mode": mode},
    )
    engine = SegmentationEngine(config, datasets["site-2"], device=CPU)
    assert engine.acceleration.channels_last is channels_last
    assert engine.acceleration.device_cache is device_cache
    trained = engine.train(3)
    assert trained.steps == 3 and math.isfinite(trained.mean_loss) and trained.seconds > 0
    validation = engine.validate()
    assert isinstance(validation, ValidationResult)
    assert len(validation.cases) == len(engine.validation_files)
    weights = engine.weights()
    assert all(v.flags.c_contiguous for v in weights.values())  # whatever the memory format
    engine.load_weights(weights)
    for key, value in engine.weights().items():
        np.testing.assert_array_equal(value, weights[key])


def test_predict_takes_other_sliding_window_settings(engine):
    image = engine.validation_data[0]["image"]
    for settings in (
        dataclasses.replace(engine.config.validation, mode="gaussian", overlap=0.5),
        dataclasses.replace(engine.config.validation, sw_batch_size=1, overlap=0.0),
    ):
        masks = engine.predict(image, settings)
        assert masks.dtype == torch.bool and masks.shape == (3, *image.shape[1:])
        assert masks.device == CPU


def test_gpu_settings_run_on_the_available_device(datasets, caplog):
    """The gpu profile's options at tiny size: CUDA paths on a GPU host, CPU fallbacks here."""
    caplog.set_level(logging.INFO, logger="app_site.engine")
    config = variant(
        load_config("tiny"),
        data={"device_cache": True},
        training={"amp": True, "cudnn_benchmark": True, "channels_last": True, "device": "auto"},
        validation={"mode": "gaussian"},
    )
    engine = SegmentationEngine(config, datasets["site-3"])
    device = select_device("auto")
    assert engine.device.type == device.type
    cuda = device.type == "cuda"
    assert engine.acceleration == plan_acceleration(
        config, engine.device, bf16_supported=cuda and torch.cuda.is_bf16_supported()
    )
    assert (engine.acceleration.amp_dtype is not None) is cuda
    assert f"site engine on {engine.acceleration.describe()}" in caplog.messages
    assert torch.backends.cudnn.benchmark is cuda
    trained = engine.train(2)
    assert math.isfinite(trained.mean_loss)
    assert len(engine.validate().cases) == len(engine.validation_files)
