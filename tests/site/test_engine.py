"""The site engine on a real (simulated, ingested) dataset, on the CPU."""

import math

import numpy as np
import pytest
import torch

from app_site.engine import SegmentationEngine, region_metrics, select_device
from app_site.harmonization import site_statistics
from fedseg.config import load_config
from fedseg.harmonization import HarmonizationConfig, artifact_transform, combine_statistics


@pytest.fixture(scope="module")
def engine(datasets):
    config = load_config("tiny")
    stats = site_statistics(datasets["site-1"], HarmonizationConfig(min_images=2))
    artifact = combine_statistics(HarmonizationConfig(min_images=2), {"site-1": stats}, "MR")
    return SegmentationEngine(config, datasets["site-1"], artifact_transform(artifact))


def test_training_lowers_the_loss(engine):
    first = engine.train(6)
    for _ in range(4):
        last = engine.train(6)
    assert first.steps == 6 and math.isfinite(first.mean_loss)
    assert last.mean_loss < first.mean_loss


def test_validation_gives_metrics_per_region_and_case(engine):
    results = engine.validate()
    assert len(results) == len(engine.validation_files) >= 1
    for case in results:
        assert set(case.dice) == {"TC", "WT", "ET"}
        assert all(0.0 <= value <= 1.0 for value in case.dice.values())
        assert all(v is None or v >= 0 for v in case.hd95.values())


def test_weights_round_trip(engine):
    weights = engine.weights()
    changed = {k: v + 1.0 if v.dtype.kind == "f" else v for k, v in weights.items()}
    engine.load_weights(changed)
    restored = engine.weights()
    key = next(k for k, v in weights.items() if v.dtype.kind == "f")
    np.testing.assert_allclose(restored[key], weights[key] + 1.0)
    engine.load_weights(weights)


def test_region_metric_conventions():
    empty = torch.zeros(3, 8, 8, 8, dtype=torch.bool)
    full = empty.clone()
    full[:, 2:6, 2:6, 2:6] = True
    both_empty = region_metrics("a", empty, empty, (1.0, 1.0, 1.0))
    assert both_empty.dice == {"TC": 1.0, "WT": 1.0, "ET": 1.0} and both_empty.hd95["WT"] == 0.0
    missed = region_metrics("b", empty, full, (1.0, 1.0, 1.0))
    assert missed.dice["WT"] == 0.0 and missed.hd95["WT"] is None
    shifted = full.roll(1, dims=1)
    partial = region_metrics("c", shifted, full, (2.0, 2.0, 2.0))
    assert partial.dice["WT"] == pytest.approx(0.75) and partial.hd95["WT"] == pytest.approx(2.0)


def test_device_selection():
    if torch.cuda.is_available():
        assert select_device("auto").type == "cuda"
    else:
        with pytest.raises(RuntimeError, match="no CUDA device"):
            select_device("cuda")
        assert select_device("auto").type == "cpu"
    assert select_device("cpu").type == "cpu"
