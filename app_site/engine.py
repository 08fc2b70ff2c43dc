"""The site engine: MONAI training and validation on the site's own data. No NVFlare here.

Images are loaded, harmonized (with the job's artifact), reoriented to RAS and resampled to
the configured spacing; labels become the three BraTS region channels (TC, WT, ET). Training
uses random crops around tumour and background, DiceCE loss on sigmoid outputs, and mixed
precision where CUDA is present. Validation runs sliding-window inference on whole volumes
and reports Dice and HD95 per region and per case.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, load_decathlon_datalist
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import compute_hausdorff_distance
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    RandCropByPosNegLabeld,
    RandFlipd,
    SpatialPadd,
    Transform,
)
from monai.utils import set_determinism

from fedseg.config import RunConfig
from models.networks import build_network
from transforms.base import Applyd
from transforms.regions import REGIONS, LabelsToRegionsd
from transforms.spatial import CanonicalOrientationd, ResampleToSpacingd

KEYS = ("image", "label")


def select_device(setting: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU.

    Raises:
        RuntimeError: If CUDA is asked for and absent.
    """
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("training.device is cuda, but no CUDA device is available")
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def build_transforms(config: RunConfig, harmonization: Transform | None, train: bool) -> Compose:
    """The pre-processing pipeline.

    Args:
        config: Run configuration.
        harmonization: Array transform from the harmonization artifact, or ``None``.
        train: Add random crops and flips.

    Returns:
        A MONAI ``Compose`` over ``{"image", "label"}`` dictionaries of file paths.
    """
    steps: list = [LoadImaged(KEYS, image_only=True), EnsureChannelFirstd(KEYS)]
    if harmonization is not None:
        steps.append(Applyd("image", harmonization))
    steps += [
        CanonicalOrientationd(KEYS),
        ResampleToSpacingd(KEYS, config.data.spacing, label_keys="label"),
    ]
    if train:
        roi = config.data.roi_size
        steps += [
            SpatialPadd(KEYS, roi),
            RandCropByPosNegLabeld(
                KEYS, label_key="label", spatial_size=roi, pos=1, neg=1, num_samples=1
            ),
            RandFlipd(KEYS, prob=0.5, spatial_axis=0),
        ]
    steps += [LabelsToRegionsd("label"), EnsureTyped(KEYS, dtype=torch.float32)]
    return Compose(steps)


@dataclass(frozen=True)
class TrainResult:
    """One local training round."""

    steps: int
    mean_loss: float
    seconds: float


@dataclass(frozen=True)
class CaseMetrics:
    """Validation metrics of one case: Dice and HD95 (mm) per region.

    Both empty prediction and empty reference give Dice 1 and HD95 0; exactly one empty gives
    Dice 0 and HD95 ``None`` (undefined, left out of means).
    """

    case_id: str
    dice: dict[str, float]
    hd95: dict[str, float | None]


class SegmentationEngine:
    """Trains and validates one network on one site's dataset.

    Args:
        config: Run configuration.
        dataset: The site's dataset folder (written by ``fedseg ingest``).
        harmonization: Array transform from the job's harmonization artifact, or ``None``.
        device: Where to run; default from ``config.training.device``.
    """

    def __init__(
        self,
        config: RunConfig,
        dataset: Path,
        harmonization: Transform | None = None,
        device: torch.device | None = None,
    ):
        self.config = config
        self.device = device or select_device(config.training.device)
        set_determinism(seed=config.training.seed)
        datalist = Path(dataset) / "datalist.json"
        self.train_files = load_decathlon_datalist(datalist, data_list_key="training")
        self.validation_files = load_decathlon_datalist(datalist, data_list_key="validation")
        if not self.train_files:
            raise ValueError(f"{datalist}: no labelled training case")
        self.train_data = self._cached(self.train_files, harmonization, train=True)
        self.validation_data = self._cached(self.validation_files, harmonization, train=False)
        self.model = build_network(config.model.name, **config.model.args).to(self.device)
        self.loss = DiceCELoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5)
        training = config.training
        if training.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(
                self.model.parameters(), training.learning_rate, weight_decay=training.weight_decay
            )
        else:
            self.optimizer = torch.optim.SGD(
                self.model.parameters(),
                training.learning_rate,
                momentum=0.99,
                nesterov=True,
                weight_decay=training.weight_decay,
            )
        self.amp = training.amp and self.device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if self.amp and torch.cuda.is_bf16_supported() else None
        self._batches = self._endless_batches()

    def _cached(self, files: list[dict], harmonization, train: bool) -> CacheDataset:
        """Caches the deterministic part of the pipeline (up to the first random transform)."""
        return CacheDataset(
            files,
            build_transforms(self.config, harmonization, train=train),
            cache_rate=self.config.data.cache_rate,
            num_workers=self.config.data.num_workers or None,
            progress=False,
        )

    def weights(self) -> dict[str, np.ndarray]:
        """A copy of the network's parameters and buffers as numpy arrays.

        Copies, never views: on the CPU a view would change with the next training step.
        """
        return {k: v.detach().cpu().numpy().copy() for k, v in self.model.state_dict().items()}

    def load_weights(self, weights: dict[str, np.ndarray]) -> None:
        """Loads parameters (for example the global model); keys must match exactly."""
        state = {k: torch.as_tensor(np.asarray(v)) for k, v in weights.items()}
        self.model.load_state_dict(state, strict=True)

    def train(self, steps: int) -> TrainResult:
        """Runs ``steps`` optimizer steps on random crops.

        Returns:
            Steps done, mean loss and wall time.
        """
        self.model.train()
        start, losses = time.perf_counter(), []
        for _ in range(steps):
            batch = next(self._batches)
            image = batch["image"].to(self.device)
            label = batch["label"].to(self.device)
            self.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
                loss = self.loss(self.model(image), label)
            loss.backward()
            self.optimizer.step()
            losses.append(float(loss.detach()))
        return TrainResult(steps, float(np.mean(losses)), time.perf_counter() - start)

    @torch.no_grad()
    def validate(self) -> list[CaseMetrics]:
        """Dice and HD95 per region for every validation case (whole-volume inference)."""
        self.model.eval()
        results = []
        for item, files in zip(self.validation_data, self.validation_files, strict=True):
            image = item["image"][None].to(self.device)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
                logits = sliding_window_inference(
                    image,
                    self.config.data.roi_size,
                    self.config.validation.sw_batch_size,
                    self.model,
                    overlap=self.config.validation.overlap,
                )
            prediction = (torch.sigmoid(logits.float()) > 0.5)[0].cpu()
            reference = item["label"].bool().cpu()
            results.append(
                region_metrics(_case_id(files), prediction, reference, self.config.data.spacing)
            )
        return results

    def _endless_batches(self) -> Iterator[dict]:
        loader = DataLoader(
            self.train_data,
            batch_size=self.config.training.batch_size,
            shuffle=True,
            num_workers=0,
            drop_last=False,
        )
        while True:
            yield from loader


def region_metrics(
    case_id: str, prediction: torch.Tensor, reference: torch.Tensor, spacing
) -> CaseMetrics:
    """Dice and HD95 per region of one case.

    Args:
        case_id: The case.
        prediction: ``(3, *spatial)`` boolean region masks.
        reference: ``(3, *spatial)`` boolean region masks.
        spacing: Voxel spacing in millimetres (for HD95).

    Returns:
        The case's metrics.
    """
    dice, hd95 = {}, {}
    for channel, region in enumerate(REGIONS):
        predicted, truth = prediction[channel], reference[channel]
        if not predicted.any() and not truth.any():
            dice[region], hd95[region] = 1.0, 0.0
            continue
        overlap = float((predicted & truth).sum())
        dice[region] = 2.0 * overlap / float(predicted.sum() + truth.sum())
        if predicted.any() and truth.any():
            distance = compute_hausdorff_distance(
                predicted[None, None].float(),
                truth[None, None].float(),
                percentile=95,
                spacing=list(spacing),
            )
            value = float(distance.item())
            hd95[region] = value if math.isfinite(value) else None
        else:
            hd95[region] = None
    return CaseMetrics(case_id, dice, hd95)


def _case_id(files: dict) -> str:
    return Path(str(files["image"])).name.removesuffix(".nii.gz").removesuffix(".nii")
