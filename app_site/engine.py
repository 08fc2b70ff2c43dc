"""The site engine: MONAI training and validation on the site's own data. No NVFlare here.

Images are loaded, harmonized (with the job's artifact), reoriented to RAS and resampled to
the configured spacing; labels become the three BraTS region channels (TC, WT, ET). Training
uses random crops around tumour and background and, on each region's sigmoid, soft Dice plus
binary cross-entropy (:mod:`app_site.losses`).
Validation runs sliding-window inference on whole volumes, on the training device, and
reports Dice and HD95 per region and per case.

On CUDA the configuration adds mixed precision (bf16 autocast, or fp16 with gradient scaling
where bf16 is missing), cuDNN autotuning, ``torch.compile`` and a training cache that lives on
the GPU, cropped there and fed by a ``ThreadDataLoader``; channels-last 3D works on any device
(:func:`plan_acceleration` decides, :meth:`Acceleration.describe` says what was decided).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, ThreadDataLoader, load_decathlon_datalist
from monai.inferers import sliding_window_inference
from monai.metrics import compute_hausdorff_distance
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    Lambdad,
    LoadImaged,
    RandCropByPosNegLabeld,
    RandFlipd,
    SpatialPadd,
    Transform,
)
from monai.utils import convert_to_tensor, set_determinism

from app_site.losses import region_loss
from fedseg.config import RunConfig, ValidationConfig, scheduled_learning_rate
from fedseg.moments import moment_name, moments_problem
from models.networks import build_network
from transforms.base import Applyd
from transforms.regions import REGIONS, LabelsToRegionsd
from transforms.spatial import CanonicalOrientationd, ResampleToSpacingd

KEYS = ("image", "label")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Acceleration:
    """How the engine runs on its device, decided once from the configuration.

    Attributes:
        device: Where the network runs.
        amp_dtype: Autocast precision (``None``: float32 throughout).
        channels_last: Network and inputs in the channels-last 3D memory format.
        compile: Network wrapped in ``torch.compile``.
        cudnn_benchmark: cuDNN autotuning (not bit-for-bit reproducible).
        device_cache: Training cache on ``device``, cropped there, ``ThreadDataLoader``.
        not_applied: Options the configuration asks for that apply on CUDA only.
    """

    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    compile: bool
    cudnn_benchmark: bool
    device_cache: bool
    not_applied: tuple[str, ...] = ()

    @property
    def grad_scaling(self) -> bool:
        """Float16 autocast needs gradient scaling; bfloat16 has float32's range."""
        return self.amp_dtype == torch.float16

    def describe(self) -> str:
        """One line for logs: device, precision and options."""
        precision = {
            None: "float32",
            torch.bfloat16: "bf16 autocast",
            torch.float16: "fp16 autocast with gradient scaling",
        }[self.amp_dtype]
        options = [precision]
        if self.channels_last:
            options.append("channels-last 3D")
        if self.compile:
            options.append("torch.compile")
        if self.cudnn_benchmark:
            options.append("cuDNN autotuning")
        options.append(
            "training cache on the device (ThreadDataLoader)"
            if self.device_cache
            else "training cache in host memory (DataLoader)"
        )
        text = f"{self.device}: " + ", ".join(options)
        if self.not_applied:
            text += f"; not applied on {self.device.type} (CUDA only): " + ", ".join(
                self.not_applied
            )
        return text


def select_device(setting: str) -> torch.device:
    """The device ``training.device`` names; ``auto`` picks CUDA when present, else the CPU.

    Raises:
        RuntimeError: If CUDA, or a CUDA device index the machine lacks, is asked for.
    """
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda":
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if available == 0:
            raise RuntimeError(f"training.device is {setting}, but no CUDA device is available")
        if device.index is not None and device.index >= available:
            raise RuntimeError(
                f"training.device is {setting}, but this machine has {available} CUDA "
                f"device(s) (cuda:0 to cuda:{available - 1})"
            )
    return device


def plan_acceleration(
    config: RunConfig, device: torch.device, bf16_supported: bool
) -> Acceleration:
    """What of the configuration's performance options applies on ``device``.

    Args:
        config: Run configuration.
        device: Where the engine runs.
        bf16_supported: Whether ``device`` computes in bfloat16 (on CUDA,
            ``torch.cuda.is_bf16_supported()``).

    Returns:
        The decisions; CUDA-only options asked for on another device are named in
        ``not_applied``.
    """
    training = config.training
    cuda = device.type == "cuda"
    amp_dtype = None
    if training.amp and cuda:
        amp_dtype = torch.bfloat16 if bf16_supported else torch.float16
    requested = {
        "training.amp": training.amp,
        "training.compile": training.compile,
        "training.cudnn_benchmark": training.cudnn_benchmark,
    }
    return Acceleration(
        device=device,
        amp_dtype=amp_dtype,
        channels_last=training.channels_last,
        compile=training.compile and cuda,
        cudnn_benchmark=training.cudnn_benchmark and cuda,
        device_cache=config.data.device_cache,
        not_applied=() if cuda else tuple(name for name, on in requested.items() if on),
    )


def build_transforms(config: RunConfig, harmonization: Transform | None, train: bool) -> Compose:
    """The pre-processing pipeline, cached in host memory.

    Args:
        config: Run configuration.
        harmonization: Array transform from the harmonization artifact, or ``None``.
        train: Add random crops and flips.

    Returns:
        A MONAI ``Compose`` over ``{"image", "label"}`` dictionaries of file paths.
    """
    steps = _preprocessing(config, harmonization)
    if train:
        steps += [SpatialPadd(KEYS, config.data.roi_size), *_random_crops(config)]
    steps += [LabelsToRegionsd("label"), EnsureTyped(KEYS, dtype=torch.float32)]
    return Compose(steps)


def build_device_training_transforms(
    config: RunConfig, harmonization: Transform | None, device: torch.device
) -> Compose:
    """The training pipeline with its cache on ``device`` (MONAI's fast-training recipe).

    The same steps and random draws as ``build_transforms(config, harmonization, train=True)``,
    but the pre-processed (and padded) volumes become plain tensors on ``device`` (image
    float32, label uint8: about 5 bytes per voxel) before the cache, and the crops, flips and
    region channels are computed there. Samples come out as plain float32 tensors, without
    MONAI metadata.

    Args:
        config: Run configuration.
        harmonization: Array transform from the harmonization artifact, or ``None``.
        device: Where the cache lives.

    Returns:
        A MONAI ``Compose`` over ``{"image", "label"}`` dictionaries of file paths.
    """
    to_device = EnsureTyped(
        KEYS, dtype=(torch.float32, torch.uint8), device=device, track_meta=False
    )
    return Compose(
        [
            *_preprocessing(config, harmonization),
            SpatialPadd(KEYS, config.data.roi_size),
            to_device,
            *_random_crops(config),
            Lambdad("label", label_regions),
            EnsureTyped(KEYS, track_meta=False),  # the crops gained metadata again
        ]
    )


def label_regions(label: torch.Tensor) -> torch.Tensor:
    """Region channels (TC, WT, ET) of a ``(1, *spatial)`` label map, on the label's device.

    The device-side twin of :class:`transforms.regions.LabelsToRegions` (which goes through
    numpy): float32 ``(3, *spatial)``.

    Raises:
        ValueError: If ``label`` has more than one channel.
    """
    if label.shape[0] != 1:
        raise ValueError(f"expected a one-channel label map, got shape {tuple(label.shape)}")
    channels = [
        torch.isin(label, torch.tensor(values, dtype=label.dtype, device=label.device))
        for values in REGIONS.values()
    ]
    return torch.cat(channels).float()


def _preprocessing(config: RunConfig, harmonization: Transform | None) -> list[Transform]:
    """Load, harmonize, reorient, resample: the deterministic steps."""
    steps: list[Transform] = [LoadImaged(KEYS, image_only=True), EnsureChannelFirstd(KEYS)]
    if harmonization is not None:
        steps.append(Applyd("image", harmonization))
    return [
        *steps,
        CanonicalOrientationd(KEYS),
        ResampleToSpacingd(KEYS, config.data.spacing, label_keys="label"),
    ]


def _random_crops(config: RunConfig) -> list[Transform]:
    """Crop around tumour or background (volumes padded to the crop size), flip left-right."""
    roi = config.data.roi_size
    return [
        RandCropByPosNegLabeld(
            KEYS, label_key="label", spatial_size=roi, pos=1, neg=1, num_samples=1
        ),
        RandFlipd(KEYS, prob=0.5, spatial_axis=0),
    ]


@dataclass(frozen=True)
class TrainResult:
    """One local training round.

    Attributes:
        steps: Optimizer steps done.
        mean_loss: Mean training loss over the steps.
        seconds: Wall time, until the device finished the last step.
    """

    steps: int
    mean_loss: float
    seconds: float


@dataclass(frozen=True)
class CaseMetrics:
    """Validation metrics of one case: Dice and HD95 (mm) per region.

    Both empty prediction and empty reference give Dice 1 and HD95 0. Exactly one empty gives
    Dice 0 and, as HD95, the diagonal of the case's grid in millimetres (:func:`region_metrics`).
    """

    case_id: str
    dice: dict[str, float]
    hd95: dict[str, float]


@dataclass(frozen=True)
class ValidationResult:
    """One validation pass.

    Attributes:
        cases: Metrics per validation case.
        seconds: Wall time of the whole pass (inference and metrics).
        inference_seconds: Sliding-window inference alone, transfers to and from the device
            included, summed over cases.
    """

    cases: list[CaseMetrics]
    seconds: float
    inference_seconds: float


class SegmentationEngine:
    """Trains and validates one network on one site's dataset.

    Args:
        config: Run configuration.
        dataset: The site's dataset folder (written by ``fedseg ingest``).
        harmonization: Array transform from the job's harmonization artifact, or ``None``.
        device: Where to run; default from ``config.training.device``.

    Attributes:
        steps_per_round: Optimizer steps of one full federated round on this site's training
            split (``training.local_steps``, or ``training.local_epochs`` passes over it).
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
        cuda = self.device.type == "cuda"
        self.acceleration = plan_acceleration(
            config, self.device, bf16_supported=cuda and torch.cuda.is_bf16_supported()
        )
        logger.info("site engine on %s", self.acceleration.describe())
        set_determinism(seed=config.training.seed)
        if self.acceleration.cudnn_benchmark:  # set_determinism just made cuDNN deterministic
            torch.backends.cudnn.deterministic = False
            torch.backends.cudnn.benchmark = True
        datalist = Path(dataset) / "datalist.json"
        self.train_files = load_decathlon_datalist(datalist, data_list_key="training")
        self.validation_files = load_decathlon_datalist(datalist, data_list_key="validation")
        if not self.train_files:
            raise ValueError(f"{datalist}: no labelled training case")
        self.steps_per_round = config.training.steps_per_round(len(self.train_files))
        if self.acceleration.device_cache:
            train_transforms = build_device_training_transforms(config, harmonization, self.device)
        else:
            train_transforms = build_transforms(config, harmonization, train=True)
        self.train_data = self._cached(self.train_files, train_transforms)
        self.validation_data = self._cached(
            self.validation_files, build_transforms(config, harmonization, train=False)
        )
        self.model = build_network(config.model.name, **config.model.args).to(
            self.device, memory_format=self._memory_format
        )
        # The compiled wrapper shares the parameters; weights travel through the plain module.
        self._network = torch.compile(self.model) if self.acceleration.compile else self.model
        self.loss = region_loss(config.training.loss)
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
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.acceleration.grad_scaling)
        self._batches = self._endless_batches()

    @property
    def _memory_format(self) -> torch.memory_format:
        if self.acceleration.channels_last:
            return torch.channels_last_3d
        return torch.contiguous_format

    def _cached(self, files: list[dict], transforms: Compose) -> CacheDataset:
        """Caches the deterministic part of the pipeline (up to the first random transform).

        A device cache is not copied per sample: its random steps never write into it.
        """
        return CacheDataset(
            files,
            transforms,
            cache_rate=self.config.data.cache_rate,
            num_workers=self.config.data.num_workers,  # MONAI fills with one thread at 0
            progress=False,
            copy_cache=not self.acceleration.device_cache,
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

    def gradient_rms(self) -> dict[str, np.ndarray]:
        """AdamW's gradient RMS per parameter (root of its second moment), to share.

        Keyed by the shared names of :mod:`fedseg.moments`; zeros for a parameter not yet
        stepped.
        """
        shared = {}
        for name, parameter in self.model.named_parameters():
            moment = self.optimizer.state.get(parameter, {}).get("exp_avg_sq")
            rms = moment.sqrt() if moment is not None else torch.zeros_like(parameter)
            shared[moment_name(name)] = rms.detach().cpu().numpy().copy()
        return shared

    def load_gradient_rms(self, shared: dict[str, np.ndarray], steps_done: int) -> None:
        """Starts AdamW from the federation's gradient RMS (see :meth:`gradient_rms`).

        All-zero values (the job's initial model) mean "none yet": the optimizer keeps its own.
        A parameter without optimizer state yet (a site that joined late) gets a fresh one at
        step ``steps_done``, with the shared second moment and no momentum.

        Raises:
            ValueError: If they do not fit the network or hold non-finite values.
        """
        problem = moments_problem(self.model, shared)
        if problem:
            raise ValueError(f"{problem}; refusing to train")
        if not any(np.any(np.asarray(values) != 0) for values in shared.values()):
            return
        for name, parameter in self.model.named_parameters():
            # CKKS noise may leave a zero slightly negative.
            rms = torch.as_tensor(np.asarray(shared[moment_name(name)])).clamp(min=0)
            moment = rms.to(parameter.device, parameter.dtype).square()
            state = self.optimizer.state[parameter]
            if "exp_avg_sq" in state:
                state["exp_avg_sq"].copy_(moment)
            else:
                state["step"] = torch.tensor(float(max(steps_done, 1)))
                state["exp_avg"] = torch.zeros_like(parameter)
                state["exp_avg_sq"] = moment

    def train(self, steps: int, first_step: int = 0, total_steps: int | None = None) -> TrainResult:
        """Runs ``steps`` optimizer steps on random crops.

        The losses stay on the device until the end, so the host never waits for a step.

        Args:
            steps: Optimizer steps to make now.
            first_step: Steps the run made before these (a site in round r of a federation:
                ``r * steps_per_round``); places them on the learning-rate schedule.
            total_steps: Steps in the whole run; default ``rounds * steps_per_round``.

        Returns:
            Steps done, mean loss and wall time.

        Raises:
            ValueError: If ``steps`` is below 1.
        """
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        training = self.config.training
        total_steps = total_steps or training.rounds * self.steps_per_round
        start = time.perf_counter()
        total = torch.zeros((), device=self.device)
        for index in range(first_step, first_step + steps):
            rate = scheduled_learning_rate(training, index, total_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = rate
            batch = next(self._batches)
            total += self.step(batch["image"], batch["label"])
        mean_loss = float(total) / steps
        return TrainResult(steps, mean_loss, time.perf_counter() - start)

    def step(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """One optimizer step on a batch, in the planned precision and memory format.

        Args:
            image: ``(batch, channels, *spatial)`` images.
            label: ``(batch, 3, *spatial)`` region channels.

        Returns:
            The batch's loss, detached and still on the device.
        """
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(self._forward(self._on_device(image)).float(), self._on_device(label))
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()

    @torch.no_grad()
    def validate(self) -> ValidationResult:
        """Dice and HD95 per region for every validation case (whole-volume inference)."""
        start, inference, cases = time.perf_counter(), 0.0, []
        for item, files in zip(self.validation_data, self.validation_files, strict=True):
            began = time.perf_counter()
            prediction = self.predict(item["image"])
            inference += time.perf_counter() - began
            reference = item["label"].bool().cpu()
            cases.append(
                region_metrics(_case_id(files), prediction, reference, self.config.data.spacing)
            )
        return ValidationResult(cases, time.perf_counter() - start, inference)

    @torch.no_grad()
    def predict(
        self, image: torch.Tensor, validation: ValidationConfig | None = None
    ) -> torch.Tensor:
        """Region masks of one pre-processed image, by sliding-window inference on the device.

        Args:
            image: ``(channels, *spatial)`` image, pre-processed like the validation data.
            validation: Sliding-window settings to use instead of the configuration's (for
                tuning them).

        Returns:
            ``(3, *spatial)`` boolean region masks on the CPU.
        """
        settings = validation or self.config.validation
        self.model.eval()
        logits = sliding_window_inference(
            self._on_device(image)[None],
            self.config.data.roi_size,
            settings.sw_batch_size,
            self._forward,
            overlap=settings.overlap,
            mode=settings.mode,
        )
        return (torch.sigmoid(logits.float()) > 0.5)[0].cpu()

    def _on_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A plain tensor (no MONAI metadata, which every network operation would carry)."""
        return convert_to_tensor(tensor, device=self.device, track_meta=False)

    def _forward(self, image: torch.Tensor) -> torch.Tensor:
        """The network on a batch, in the planned memory format and precision."""
        acceleration = self.acceleration
        with torch.autocast(
            self.device.type,
            dtype=acceleration.amp_dtype,
            enabled=acceleration.amp_dtype is not None,
        ):
            return self._network(image.contiguous(memory_format=self._memory_format))

    def _endless_batches(self) -> Iterator[dict]:
        # With a device cache, a thread prepares the next batch while the device trains.
        loader_type = ThreadDataLoader if self.acceleration.device_cache else DataLoader
        # The engine's own generator: sites training as threads of one process (NVFlare's
        # simulator) would otherwise draw their shuffles from one global generator, in
        # whatever order the threads run.
        loader = loader_type(
            self.train_data,
            batch_size=self.config.training.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(self.config.training.seed),
            num_workers=0,
            drop_last=False,
        )
        while True:
            yield from loader


def region_metrics(
    case_id: str, prediction: torch.Tensor, reference: torch.Tensor, spacing
) -> CaseMetrics:
    """Dice and HD95 per region of one case.

    A region missed entirely, or predicted where the reference has none, has no surface to
    measure from: its HD95 is the largest distance the grid holds, its diagonal in millimetres,
    so such a case counts as the worst in the mean instead of dropping out of it (BraTS scores
    it the same way: 373.13 mm is the diagonal of its 240 x 240 x 155 grid of 1 mm voxels).

    Args:
        case_id: The case.
        prediction: ``(3, *spatial)`` boolean region masks.
        reference: ``(3, *spatial)`` boolean region masks.
        spacing: Voxel spacing in millimetres (for HD95).

    Returns:
        The case's metrics.
    """
    diagonal = math.hypot(*(n * s for n, s in zip(reference.shape[1:], spacing, strict=True)))
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
            hd95[region] = float(distance.item())
        else:
            hd95[region] = diagonal
    return CaseMetrics(case_id, dice, hd95)


def _case_id(files: dict) -> str:
    return Path(str(files["image"])).name.removesuffix(".nii.gz").removesuffix(".nii")
