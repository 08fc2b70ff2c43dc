"""Segmentation network factories of fedseg, built by name from the run configuration."""

from models.networks import NETWORKS, BratsSegResNet, SmallUNet, build_network

__all__ = ["NETWORKS", "BratsSegResNet", "SmallUNet", "build_network"]
