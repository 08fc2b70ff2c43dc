"""The packed pipeline against NVFlare's stock HE filters, on the same data."""

import numpy as np
import pytest
import torch

from benchmarks.he_pipelines import packed_round, stock_round
from fedseg.config import load_config
from fedseg.packed_ckks import WeightedOverflowError
from models.networks import build_network


def site_models(count: int) -> list[dict[str, np.ndarray]]:
    """The tiny network's weights, perturbed differently for each site."""
    config = load_config("tiny")
    torch.manual_seed(0)
    base = {
        k: v.numpy()
        for k, v in build_network(config.model.name, **config.model.args).state_dict().items()
    }
    rng = np.random.default_rng(1)
    return [
        {k: v + (rng.normal(size=v.shape) * 1e-2).astype(v.dtype) for k, v in base.items()}
        for _ in range(count)
    ]


def weighted_mean(models, weights) -> dict[str, np.ndarray]:
    return {
        k: sum(m[k].astype(np.float64) * w for m, w in zip(models, weights, strict=True))
        / sum(weights)
        for k in models[0]
    }


def largest_error(average, expected) -> float:
    assert set(average) == set(expected)
    return max(float(np.abs(average[k].astype(np.float64) - expected[k]).max()) for k in expected)


def test_packed_aggregate_is_at_least_as_accurate_and_far_smaller_than_stock(provisioned):
    models = site_models(3)
    steps = [8, 5, 11]
    expected = weighted_mean(models, steps)
    errors, sizes = {}, {}
    for name, run in (("stock", stock_round), ("packed", packed_round)):
        measured = run(provisioned[name]["kits"], models, steps)
        errors[name] = largest_error(measured.average, expected)
        sizes[name] = measured.upload_bytes
    assert errors["packed"] <= errors["stock"] < 1e-5, errors
    assert sizes["packed"] * 4 <= sizes["stock"], sizes


def test_packed_filters_weigh_each_update_by_the_weight_its_site_declares(provisioned):
    models = site_models(3)
    cases = [220.0, 180.0, 140.0]  # training.aggregation_weight: cases, at every step count
    measured = packed_round(provisioned["packed"]["kits"], models, [20, 20, 20], cases)
    assert largest_error(measured.average, weighted_mean(models, cases)) < 1e-5
    assert largest_error(measured.average, weighted_mean(models, [1, 1, 1])) > 1e-4


def test_an_update_too_heavy_for_the_packed_context_is_refused_with_its_remedies(provisioned):
    models = site_models(1)
    name = next(iter(models[0]))
    models[0][name][...] = 8.0  # a PReLU slope of the demo's UNet reaches this in training
    with pytest.raises(WeightedOverflowError) as refused:  # 600 cases x 8 > 4096
        packed_round(provisioned["packed"]["kits"], models, [20], [600.0])
    message = str(refused.value)
    assert "weighted value 4.8e+03 (weight 600 times a value of 8)" in message
    assert "provision a smaller scale" in message
    assert "training.aggregation_weight: steps): this site's update counts for 600" in message
