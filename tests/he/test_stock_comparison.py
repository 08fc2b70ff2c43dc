"""The packed pipeline against NVFlare's stock HE filters, on the same data."""

import numpy as np
import torch

from benchmarks.he_pipelines import packed_round, stock_round
from fedseg.config import load_config
from models.networks import build_network


def test_packed_aggregate_is_at_least_as_accurate_and_far_smaller_than_stock(provisioned):
    config = load_config("tiny")
    torch.manual_seed(0)
    base = {
        k: v.numpy()
        for k, v in build_network(config.model.name, **config.model.args).state_dict().items()
    }
    rng = np.random.default_rng(1)
    models = [
        {k: v + (rng.normal(size=v.shape) * 1e-2).astype(v.dtype) for k, v in base.items()}
        for _ in range(3)
    ]
    steps = [8, 5, 11]
    expected = {
        k: sum(m[k].astype(np.float64) * s for m, s in zip(models, steps, strict=True)) / sum(steps)
        for k in base
    }
    errors, sizes = {}, {}
    for name, run in (("stock", stock_round), ("packed", packed_round)):
        measured = run(provisioned[name]["kits"], models, steps)
        assert set(measured.average) == set(expected)
        errors[name] = max(
            float(np.abs(measured.average[k].astype(np.float64) - expected[k]).max())
            for k in expected
        )
        sizes[name] = measured.upload_bytes
    assert errors["packed"] <= errors["stock"] < 1e-5, errors
    assert sizes["packed"] * 4 <= sizes["stock"], sizes
