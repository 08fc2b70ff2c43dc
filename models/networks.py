"""Segmentation networks, built by name, that keep their constructor arguments as attributes.

NVFlare's persistor records a model by its import path and its constructor arguments read
back from attributes of the same names, so every network here stores exactly its arguments.
Output channels are the three BraTS regions (tumour core, whole tumour, enhancing tumour) as
independent sigmoid channels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from monai.networks.nets import SegResNet, UNet
from torch import nn

#: Region channels the networks predict, in order (see :mod:`transforms.regions`).
REGION_CHANNELS = 3
#: Image channels the data pipeline feeds the networks: each case is one 3D volume (what
#: ``fedseg ingest`` writes), loaded channel-first (:func:`app_site.engine.build_transforms`).
INPUT_CHANNELS = 1


class BratsSegResNet(SegResNet):
    """SegResNet in the BraTS configuration (Myronenko 2018, as in MONAI's BraTS bundle).

    Args:
        in_channels: Input modalities (1 for a single T1c, 4 for T1/T1c/T2/FLAIR).
        out_channels: Output region channels.
        init_filters: Filters of the first stage.
        blocks_down: Residual blocks per encoder stage.
        blocks_up: Residual blocks per decoder stage.
        dropout_prob: Dropout before the last convolution.
    """

    def __init__(
        self,
        in_channels: int = INPUT_CHANNELS,
        out_channels: int = REGION_CHANNELS,
        init_filters: int = 16,
        blocks_down: Sequence[int] = (1, 2, 2, 4),
        blocks_up: Sequence[int] = (1, 1, 1),
        dropout_prob: float = 0.2,
    ):
        super().__init__(
            spatial_dims=3,
            init_filters=init_filters,
            in_channels=in_channels,
            out_channels=out_channels,
            dropout_prob=dropout_prob,
            blocks_down=tuple(blocks_down),
            blocks_up=tuple(blocks_up),
        )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.init_filters = init_filters
        self.blocks_down = list(blocks_down)
        self.blocks_up = list(blocks_up)
        self.dropout_prob = dropout_prob

    @property
    def size_divisor(self) -> int:
        """Total downsampling: each encoder stage after the first halves the volume.

        Every side of an input must be a multiple of it, so that the decoder's upsampled
        features line up with the encoder's.
        """
        return 2 ** (len(self.blocks_down) - 1)


class SmallUNet(UNet):
    """A small residual 3D UNet that trains on two CPU cores in minutes.

    Args:
        in_channels: Input modalities.
        out_channels: Output region channels.
        channels: Feature channels per level.
        strides: Downsampling stride after each level but the last.
        num_res_units: Residual units per block.
    """

    def __init__(
        self,
        in_channels: int = INPUT_CHANNELS,
        out_channels: int = REGION_CHANNELS,
        channels: Sequence[int] = (8, 16, 32),
        strides: Sequence[int] = (2, 2),
        num_res_units: int = 1,
    ):
        super().__init__(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=out_channels,
            channels=tuple(channels),
            strides=tuple(strides),
            num_res_units=num_res_units,
            norm="INSTANCE",
        )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.channels = list(channels)
        self.strides = list(strides)
        self.num_res_units = num_res_units

    @property
    def size_divisor(self) -> int:
        """Total downsampling: the product of the strides in use (one per level but the last).

        Every side of an input must be a multiple of it, so that each skip connection's
        features line up with the upsampled ones. MONAI ignores strides beyond
        ``len(channels) - 1``; so does this.
        """
        return math.prod(self.strides[: len(self.channels) - 1])


#: The networks by name. Each has a ``size_divisor`` property: its total downsampling factor,
#: which every side of an input (``data.roi_size``) must be a multiple of.
NETWORKS: dict[str, type[nn.Module]] = {"segresnet": BratsSegResNet, "unet": SmallUNet}


def build_network(name: str, **arguments) -> nn.Module:
    """Builds a network by name.

    Args:
        name: ``segresnet`` or ``unet``.
        **arguments: Constructor arguments of that network.

    Returns:
        The network.

    Raises:
        ValueError: For an unknown name or argument.
    """
    if name not in NETWORKS:
        raise ValueError(f"unknown network {name!r}; choose one of {sorted(NETWORKS)}")
    try:
        return NETWORKS[name](**arguments)
    except TypeError as error:
        raise ValueError(f"network {name}: {error}") from error
