import numpy as np
import torch
from monai.data import MetaTensor

from transforms.spatial import (
    CanonicalOrientation,
    CanonicalOrientationd,
    ResampleToSpacing,
    ResampleToSpacingd,
)


def lps_image() -> MetaTensor:
    values = torch.arange(4 * 5 * 6, dtype=torch.float32).reshape(1, 4, 5, 6)
    affine = torch.diag(torch.tensor([-2.0, -1.0, 3.0, 1.0], dtype=torch.float64))
    return MetaTensor(values, affine=affine)


def test_canonical_orientation_flips_to_ras_keeping_points():
    image = lps_image()
    ras = CanonicalOrientation()(image)
    assert np.all(np.diag(np.asarray(ras.affine))[:3] > 0)
    # voxel (0,0,0) of the original lies at index (3,4,0) of the canonical image
    assert ras[0, 3, 4, 0] == image[0, 0, 0, 0]


def test_resample_to_spacing_and_dictionary_twins():
    image = lps_image()
    label = MetaTensor((image > 50).float(), affine=image.affine)
    data = {"image": image, "label": label}
    data = CanonicalOrientationd(keys=("image", "label"))(data)
    data = ResampleToSpacingd(keys=("image", "label"), spacing=(1.0, 1.0, 1.5), label_keys="label")(
        data
    )
    assert tuple(data["image"].shape[1:]) == (7, 5, 11)
    assert set(np.unique(np.asarray(data["label"]))) <= {0.0, 1.0}, "labels stay labels"
    resampled = ResampleToSpacing((2.0, 2.0, 2.0))(CanonicalOrientation()(lps_image()))
    np.testing.assert_allclose(resampled.pixdim, [2.0, 2.0, 2.0])
