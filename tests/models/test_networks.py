import importlib.metadata
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import models
from fedseg.config import PROFILES_DIR, load_config
from models.networks import INPUT_CHANNELS, NETWORKS, BratsSegResNet, SmallUNet, build_network
from transforms.regions import REGIONS, LabelsToRegions, LabelsToRegionsd


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_networks_rebuild_from_their_recorded_arguments(name):
    """What NVFlare's persistor records (import path + attributes) rebuilds the same network."""
    network = build_network(name, in_channels=1, out_channels=3)
    cls = type(network)
    parameters = [
        p for p in cls.__init__.__code__.co_varnames[1 : cls.__init__.__code__.co_argcount]
    ]
    recorded = {p: getattr(network, p) for p in parameters}
    rebuilt = cls(**recorded)
    assert cls.__module__ == "models.networks"
    assert sum(p.numel() for p in rebuilt.parameters()) == sum(
        p.numel() for p in network.parameters()
    )
    output = network(torch.zeros(1, 1, 32, 32, 32))
    assert tuple(output.shape) == (1, 3, 32, 32, 32)


def test_segresnet_brats_configuration_size():
    network = BratsSegResNet()
    assert sum(p.numel() for p in network.parameters()) == pytest.approx(4.7e6, rel=0.02)
    assert network.blocks_down == [1, 2, 2, 4] and network.init_filters == 16
    assert SmallUNet().channels == [8, 16, 32]


def test_unknown_networks_and_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown network 'vnet'"):
        build_network("vnet")
    with pytest.raises(ValueError, match="network unet"):
        build_network("unet", depth=5)


def test_regions_from_labels():
    label = np.array([0, 1, 2, 3]).reshape(1, 4, 1, 1)
    regions = np.asarray(LabelsToRegions()(label))[:, :, 0, 0]
    np.testing.assert_array_equal(regions[0], [0, 1, 0, 1])  # TC: necrotic + enhancing
    np.testing.assert_array_equal(regions[1], [0, 1, 1, 1])  # WT: all tumour
    np.testing.assert_array_equal(regions[2], [0, 0, 0, 1])  # ET
    twin = LabelsToRegionsd("label")({"label": torch.as_tensor(label)})
    assert isinstance(twin["label"], torch.Tensor) and twin["label"].shape[0] == 3
    with pytest.raises(ValueError, match="one-channel label map"):
        LabelsToRegions()(np.zeros((2, 3, 3, 3)))


def test_bundle_metadata_matches_the_code():
    metadata = json.loads((Path(models.__file__).parent / "metadata.json").read_text())
    assert list(metadata["regions"]) == list(REGIONS)
    for region, labels in REGIONS.items():
        assert tuple(metadata["regions"][region]["labels"]) == labels
    formats = metadata["network_data_format"]
    assert formats["outputs"]["pred"]["num_channels"] == len(REGIONS)
    assert list(formats["outputs"]["pred"]["channel_def"].values()) == list(REGIONS)
    assert formats["inputs"]["image"]["num_channels"] == INPUT_CHANNELS
    assert metadata["version"] in metadata["changelog"]
    # the versions it was made with are the ones installed (pyproject.toml pins them)
    assert metadata["monai_version"] == importlib.metadata.version("monai")
    assert metadata["pytorch_version"] == torch.__version__.split("+")[0]
    assert metadata["numpy_version"] == np.__version__
    for package, version in metadata["optional_packages_version"].items():
        assert importlib.metadata.version(package) == version, package
    # its patch shape suits the network of every built-in profile
    (side,) = {int(s.removesuffix("*n")) for s in formats["inputs"]["image"]["spatial_shape"]}
    for profile in PROFILES_DIR.glob("*.yaml"):
        config = load_config(profile)
        with torch.device("meta"):
            network = build_network(config.model.name, **config.model.args)
        assert side % network.size_divisor == 0, profile.stem


@pytest.mark.parametrize(
    ("name", "arguments", "divisor"),
    [
        ("segresnet", {}, 8),
        ("segresnet", {"blocks_down": [1, 2], "blocks_up": [1]}, 2),
        ("unet", {}, 4),
        ("unet", {"channels": [4, 8, 16, 32, 64, 128], "strides": [2, 2, 2, 2, 2]}, 32),
        ("unet", {"channels": [4, 8, 16], "strides": [2, 3, 2]}, 6),  # MONAI drops the last
    ],
)
@pytest.mark.filterwarnings("ignore:`len\\(strides\\) > len\\(channels\\) - 1`")
def test_inputs_must_divide_by_the_total_downsampling(name, arguments, divisor):
    """On the meta device: shapes are computed, nothing is allocated."""
    with torch.device("meta"):
        network = build_network(name, in_channels=1, **arguments)
    assert network.size_divisor == divisor
    side = 2 * divisor
    output = network(torch.zeros(1, 1, side, side, side, device="meta"))
    assert tuple(output.shape) == (1, 3, side, side, side)
    side += divisor // 2
    with pytest.raises(RuntimeError):
        network(torch.zeros(1, 1, side, side, side, device="meta"))
