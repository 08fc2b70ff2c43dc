"""The run configuration: one typed, validated YAML file shared by job and site code.

Unknown keys are errors (with the closest known key suggested), so a typo never silently
falls back to a default. Site-specific paths (datasets) never appear here: sites find their
own data (:mod:`app_site.site_config`).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import yaml

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
#: Learning-rate schedules over a run's steps (see :func:`scheduled_learning_rate`).
LR_SCHEDULES = ("poly", "constant")
#: Exponent of the polynomial decay (nnU-Net's choice).
POLY_EXPONENT = 0.9
#: What a site's update counts for in FedAvg's weighted mean (see :class:`TrainingConfig`).
AGGREGATION_WEIGHTS = ("steps", "cases")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and the file."""


@dataclass(frozen=True)
class ModelConfig:
    """Which network, with which constructor arguments (see :mod:`models.networks`)."""

    name: str = "unet"
    args: dict = field(default_factory=dict)


@dataclass(frozen=True)
class DataConfig:
    """Pre-processing: target voxel spacing, training crop, caching.

    ``num_workers`` threads fill the cache. ``device_cache`` keeps the cached (deterministic)
    part of the training pipeline as plain tensors on the training device and runs the random
    crops and flips there, fed by a ``ThreadDataLoader`` (MONAI's fast-training recipe): on
    CUDA no volume crosses the bus during training. It costs device memory (about 5 bytes per
    voxel of every training case) and works on the CPU too, where only the loader changes.
    """

    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    roi_size: tuple[int, int, int] = (128, 128, 128)
    cache_rate: float = 1.0
    num_workers: int = 4
    device_cache: bool = False


@dataclass(frozen=True)
class HarmonizationSettings:
    """Intensity harmonization: ``nyul``, ``zscore``, ``ct`` or ``none``.

    Fitted federatedly before training when the job is given no artifact.
    """

    method: str = "nyul"
    mask: str = "brain"
    min_images: int = 5


@dataclass(frozen=True)
class TrainingConfig:
    """Optimization, federation schedule and how the network runs.

    ``amp`` is mixed precision on CUDA: bfloat16 autocast where the device supports it,
    float16 with gradient scaling otherwise; the CPU always runs float32. ``channels_last``
    stores the network and its inputs in the channels-last 3D memory format (any device).
    ``compile`` wraps the network in ``torch.compile`` on CUDA only (on the CPU it would need
    a C++ toolchain and minutes of compilation that small CPU runs never win back).
    ``cudnn_benchmark`` lets cuDNN pick the fastest convolution algorithms on CUDA, at the
    cost of bit-for-bit reproducibility; off, cuDNN stays deterministic.
    ``lr_schedule`` runs over the whole federation (``rounds`` x ``local_steps`` steps):
    ``poly`` decays the learning rate as ``(1 - step / total) ** 0.9``, so the last rounds
    make small steps and the sites' models stop pulling the average apart; ``constant`` keeps
    ``learning_rate`` throughout.
    ``shared_moments`` (AdamW only) has the sites share AdamW's second moments through the
    global model (:mod:`fedseg.moments`), so that every site scales its steps alike; off,
    each site keeps its own.
    ``aggregation_weight`` is what each site's update counts for in the weighted mean that
    makes the global model: ``cases``, its training cases (times the share of
    ``local_steps`` it made; FedAvg as McMahan et al., 2017 weigh it: the federation then
    follows the pooled data as centralized training samples it; the default), or ``steps``,
    its training steps of the round (NVFlare's ``NUM_STEPS_CURRENT_ROUND``; every site
    makes ``local_steps``, so the sites count alike). The case count is part of the report
    every site declares with its update.
    """

    optimizer: str = "adamw"
    learning_rate: float = 1e-4
    lr_schedule: str = "poly"
    weight_decay: float = 1e-5
    local_steps: int = 100
    batch_size: int = 2
    rounds: int = 50
    min_sites: int = 2
    amp: bool = True
    channels_last: bool = False
    compile: bool = False
    cudnn_benchmark: bool = False
    device: str = "auto"
    seed: int = 0
    shared_moments: bool = False
    aggregation_weight: str = "cases"


@dataclass(frozen=True)
class FederationConfig:
    """How a round copes with slow, lost and broken sites.

    A round goes on once ``training.min_sites`` updates arrived and the others had
    ``straggler_seconds`` more; it fails, naming the missing sites, when fewer than
    ``training.min_sites`` arrived within ``round_timeout`` seconds (0: wait forever). A site
    refuses to send an update whose distance to the global model exceeds ``max_update_ratio``
    times the global model's norm; in a plaintext job the server also refuses an update whose
    norm exceeds ``outlier_factor`` times the median of the other sites' updates (with
    ``training.shared_moments`` the sites' update norms follow their gradients' scale: sites
    whose intensities differ by orders of magnitude need harmonization or a larger factor).

    A site that sent its result waits ``task_request_interval`` seconds before asking the
    server for its next task, and as long again after each "nothing yet" answer: NVFlare's
    default, 2 s, is negligible against rounds of minutes but dominates rounds of a second
    (short CPU runs), where a fraction of a second keeps sites from idling between rounds.
    """

    straggler_seconds: int = 60
    round_timeout: int = 3600
    max_update_ratio: float = 10.0
    outlier_factor: float = 10.0
    task_request_interval: float = 2.0


@dataclass(frozen=True)
class ValidationConfig:
    """When sites validate the global model, and sliding-window inference on the training device.

    Each site validates the global model it received every ``every_rounds`` rounds (round 0
    included; 1: every round) and always the final global model: with many or large
    validation cases, validating costs more than a round's training. ``sw_batch_size`` windows
    run through the network at once; neighbouring windows share ``overlap`` of their size;
    ``mode`` blends overlapping outputs with equal weights (``constant``) or with weights
    falling off from each window's centre (``gaussian``).
    """

    every_rounds: int = 1
    sw_batch_size: int = 4
    overlap: float = 0.5
    mode: str = "constant"


@dataclass(frozen=True)
class RunConfig:
    """Everything a federated segmentation run needs, except where each site's data is."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    harmonization: HarmonizationSettings = field(default_factory=HarmonizationSettings)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def to_dict(self) -> dict:
        """Plain YAML/JSON form."""
        return _plain(dataclasses.asdict(self))


def load_config(source: str | Path) -> RunConfig:
    """Loads a configuration from a YAML file or a built-in profile (``tiny``, ``demo``, ``gpu``).

    Args:
        source: Path to a YAML file, or a profile name.

    Returns:
        The validated configuration.

    Raises:
        ConfigError: If the file is missing or malformed, a key is unknown or a value invalid.
    """
    path = Path(source)
    if not path.is_file():
        profile = PROFILES_DIR / f"{source}.yaml"
        if not profile.is_file():
            names = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
            raise ConfigError(f"{source}: no such file or built-in profile (profiles: {names})")
        path = profile
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from error
    return config_from_dict(document, str(path))


def config_from_dict(document: dict, where: str = "configuration") -> RunConfig:
    """Validates a plain dict into a :class:`RunConfig`.

    Args:
        document: Parsed YAML.
        where: Name of the source, for error messages.

    Returns:
        The configuration.

    Raises:
        ConfigError: On unknown keys or invalid values.
    """
    config = _build(RunConfig, document, where, "")
    _check_values(config, where)
    return config


def _build(cls: type, values: Any, where: str, prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: {prefix or 'top level'} must be a mapping")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(f"{where}: unknown key {prefix}{key}{hint}")
    arguments = {}
    for key, value in values.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            arguments[key] = _build(hint, value, where, f"{prefix}{key}.")
        else:
            arguments[key] = _coerce(value, hint, where, f"{prefix}{key}")
    return cls(**arguments)


def _coerce(value: Any, hint: Any, where: str, key: str) -> Any:
    origin = getattr(hint, "__origin__", None)
    try:
        if origin is tuple:
            item_type = hint.__args__[0]
            if not isinstance(value, list | tuple) or len(value) != len(hint.__args__):
                raise TypeError(f"a list of {len(hint.__args__)} numbers")
            return tuple(item_type(v) for v in value)
        if hint is bool:
            if not isinstance(value, bool):
                raise TypeError("true or false")
            return value
        if hint in (int, float, str):
            if isinstance(value, bool) or (hint is int and isinstance(value, float)):
                raise TypeError(hint.__name__)
            return hint(value)
        if hint is dict:
            if not isinstance(value, dict):
                raise TypeError("a mapping")
            return dict(value)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where}: {key} must be {error}, got {value!r}") from error
    return value


def _check_values(config: RunConfig, where: str) -> None:
    from models.networks import NETWORKS

    problems = []
    if config.model.name not in NETWORKS:
        problems.append(f"model.name must be one of {sorted(NETWORKS)}")
    if min(config.data.spacing) <= 0:
        problems.append("data.spacing must be positive")
    if min(config.data.roi_size) < 16 or any(s % 16 for s in config.data.roi_size):
        problems.append("data.roi_size must be multiples of 16, at least 16")
    if not 0.0 <= config.data.cache_rate <= 1.0:
        problems.append("data.cache_rate must be in [0, 1]")
    if config.data.num_workers < 0:
        problems.append("data.num_workers must be at least 0")
    if config.harmonization.method not in ("nyul", "zscore", "ct", "none"):
        problems.append("harmonization.method must be nyul, zscore, ct or none")
    training = config.training
    if training.optimizer not in ("adamw", "sgd"):
        problems.append("training.optimizer must be adamw or sgd")
    if training.shared_moments and training.optimizer != "adamw":
        problems.append("training.shared_moments needs training.optimizer adamw")
    if training.learning_rate <= 0:
        problems.append("training.learning_rate must be positive")
    if training.lr_schedule not in LR_SCHEDULES:
        problems.append(f"training.lr_schedule must be one of {', '.join(LR_SCHEDULES)}")
    if training.aggregation_weight not in AGGREGATION_WEIGHTS:
        problems.append(
            f"training.aggregation_weight must be one of {', '.join(AGGREGATION_WEIGHTS)}"
        )
    for name in ("local_steps", "batch_size", "rounds", "min_sites"):
        if getattr(training, name) < 1:
            problems.append(f"training.{name} must be at least 1")
    if training.device not in ("auto", "cpu", "cuda"):
        problems.append("training.device must be auto, cpu or cuda")
    federation = config.federation
    for name in ("straggler_seconds", "round_timeout"):
        if getattr(federation, name) < 0:
            problems.append(f"federation.{name} must be at least 0")
    for name in ("max_update_ratio", "outlier_factor"):
        if getattr(federation, name) <= 1.0:
            problems.append(f"federation.{name} must be above 1")
    if federation.task_request_interval <= 0:
        problems.append("federation.task_request_interval must be positive")
    validation = config.validation
    for name in ("every_rounds", "sw_batch_size"):
        if getattr(validation, name) < 1:
            problems.append(f"validation.{name} must be at least 1")
    if not 0.0 <= validation.overlap < 1.0:
        problems.append("validation.overlap must be in [0, 1)")
    if validation.mode not in ("constant", "gaussian"):
        problems.append("validation.mode must be constant or gaussian")
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def scheduled_learning_rate(training: TrainingConfig, step: int, total_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of a run of ``total_steps``.

    Args:
        training: The run's training settings (``learning_rate``, ``lr_schedule``).
        step: Steps the run made before this one; clamped to ``[0, total_steps]``.
        total_steps: Steps in the whole run (a federated run: ``rounds * local_steps``).

    Returns:
        The learning rate for that step.

    Raises:
        ValueError: If ``total_steps`` is below 1.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be at least 1, got {total_steps}")
    if training.lr_schedule == "constant":
        return training.learning_rate
    progress = min(max(step, 0), total_steps) / total_steps
    return training.learning_rate * (1.0 - progress) ** POLY_EXPONENT
