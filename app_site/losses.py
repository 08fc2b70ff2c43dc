"""Training losses for the three overlapping BraTS regions (TC, WT, ET).

The regions nest (enhancing tumour lies inside the tumour core, which lies inside the whole
tumour), so each is a channel with a sigmoid of its own and a voxel may belong to all three.
Every term here is computed channel by channel: a region's logits never compete with
another's. MONAI's ``DiceCELoss`` does not do that for more than one channel: its
cross-entropy is a softmax across the channels, which gives background voxels no gradient at
all and voxels inside all three regions no push towards them.
"""

from __future__ import annotations

import torch
from monai.losses import DiceLoss

from fedseg.config import LOSSES

#: Dice's smoothing terms: an empty region predicted empty scores a perfect Dice.
_SMOOTH = 1e-5


class DiceBCELoss(torch.nn.Module):
    """Soft Dice plus binary cross-entropy, each region channel on its own sigmoid.

    nnU-Net's loss for region-based training, both terms weighted 1.

    Args:
        include_bce: Add the binary cross-entropy term; ``False`` leaves soft Dice alone.
    """

    def __init__(self, include_bce: bool = True):
        super().__init__()
        self.dice = DiceLoss(sigmoid=True, smooth_nr=_SMOOTH, smooth_dr=_SMOOTH)
        self.bce = torch.nn.BCEWithLogitsLoss() if include_bce else None

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The mean loss over the batch, regions and voxels.

        Args:
            logits: ``(batch, regions, *spatial)`` network outputs before the sigmoid.
            target: ``(batch, regions, *spatial)`` region masks, 0 or 1.

        Returns:
            A scalar tensor.
        """
        loss = self.dice(logits, target)
        if self.bce is not None:
            loss = loss + self.bce(logits, target)
        return loss


def region_loss(name: str) -> DiceBCELoss:
    """The training loss called ``name`` in the run configuration (``training.loss``).

    Args:
        name: ``dice_bce`` (soft Dice plus binary cross-entropy) or ``dice`` (soft Dice only,
            as MONAI's BraTS tutorial trains).

    Returns:
        The loss module.

    Raises:
        ValueError: If ``name`` is not one of :data:`fedseg.config.LOSSES`.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    return DiceBCELoss(include_bce=name == "dice_bce")
