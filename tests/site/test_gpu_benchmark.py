"""The shared logic of benchmarks/train_gpu.py that its CUDA-only parts rely on, on the CPU."""

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference

from benchmarks.train_gpu import largest_batch, synthetic_case, windows


@pytest.mark.parametrize(
    ("shape", "roi", "overlap"),
    [((64, 64, 48), (32, 32, 32), 0.25), ((240, 240, 155), (128, 128, 128), 0.5),
     ((240, 240, 155), (128, 128, 128), 0.0), ((20, 40, 33), (32, 32, 32), 0.5)],
)  # fmt: skip
def test_window_count_matches_monai(shape, roi, overlap):
    calls = []

    def predictor(window):
        calls.append(window.shape[0])
        return window

    sliding_window_inference(torch.zeros(1, 1, *shape), roi, 1, predictor, overlap=overlap)
    assert windows(shape, roi, overlap) == len(calls)


def test_largest_batch_doubles_then_bisects():
    def step_up_to(limit):
        def step(batch):
            if batch > limit:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")

        return step

    assert largest_batch(step_up_to(40), start=2) == 40  # 32 fits, 64 not, then 48, 40, 44
    assert largest_batch(step_up_to(2), start=2) == 2
    assert largest_batch(step_up_to(10_000), start=2, limit=64) == 64


def test_synthetic_case_has_every_tumour_label_inside_the_head():
    image, label = synthetic_case((64, 64, 48), seed=1)
    assert image.dtype == np.float32 and label.dtype == np.uint8
    assert set(np.unique(label)) == {0, 1, 2, 3}
    assert image[label == 3].mean() > image[label == 2].mean() > image[label == 1].mean()
    assert image[0, 0, 0] < 100  # outside the head: background and noise
    again, _ = synthetic_case((64, 64, 48), seed=1)
    np.testing.assert_array_equal(image, again)
