"""The region losses: each region channel on its own sigmoid, Dice plus binary cross-entropy."""

import pytest
import torch
from monai.losses import DiceLoss

from app_site.losses import region_loss

SHAPE = (2, 3, 6, 6, 6)


def _nested_regions() -> torch.Tensor:
    """Region masks where ET lies inside TC inside WT, and some voxels are background."""
    target = torch.zeros(SHAPE)
    target[:, 1, 1:5, 1:5, 1:5] = 1  # WT
    target[:, 0, 2:4, 2:5, 2:5] = 1  # TC
    target[:, 2, 2:4, 2:4, 2:4] = 1  # ET
    return target


@pytest.mark.parametrize("name", ["dice_bce", "dice"])
def test_a_region_channel_learns_on_its_own(name):
    """The gradient of one region's logits does not depend on another region's logits."""
    loss = region_loss(name)
    target = _nested_regions()
    gradients = []
    for et_logit in (-4.0, 4.0):
        logits = torch.zeros(SHAPE)
        logits[:, 2] = et_logit
        logits.requires_grad_(True)
        loss(logits, target).backward()
        gradients.append(logits.grad[:, :2].clone())
    assert torch.allclose(gradients[0], gradients[1])


def test_background_voxels_push_their_logits_down():
    """Raising the logits of background voxels raises the loss (softmax CE ignores them)."""
    loss = region_loss("dice_bce")
    target = _nested_regions()
    background = target.sum(dim=1, keepdim=True).expand(SHAPE) == 0
    confident = torch.where(target.bool(), 6.0, -6.0)
    wrong_background = confident.masked_fill(background, 0.0)
    assert loss(wrong_background, target) > loss(confident, target) + 0.05


def test_voxels_in_every_region_push_all_three_logits_up():
    """A voxel of enhancing tumour lies in all three regions: each logit gets pushed up."""
    loss = region_loss("dice_bce")
    target = _nested_regions()
    logits = torch.where(target.bool(), 0.0, -6.0).requires_grad_(True)
    loss(logits, target).backward()
    inside_all = target.all(dim=1)
    for channel in range(3):
        assert (logits.grad[:, channel][inside_all] < 0).all()


def test_dice_is_monais_soft_dice_and_dice_bce_adds_the_bce():
    torch.manual_seed(0)
    logits, target = torch.randn(SHAPE), _nested_regions()
    dice = DiceLoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5)(logits, target)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    assert region_loss("dice")(logits, target) == pytest.approx(float(dice))
    assert region_loss("dice_bce")(logits, target) == pytest.approx(float(dice + bce))


def test_an_unknown_loss_is_refused():
    with pytest.raises(ValueError, match="unknown loss 'dice_ce'; choose one of dice_bce, dice"):
        region_loss("dice_ce")
