"""The run configuration: one typed, validated YAML file shared by job and site code.

Unknown keys are errors (with the closest known key suggested), so a typo never silently
falls back to a default. Site-specific paths (datasets) never appear here: sites find their
own data (:mod:`app_site.site_config`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
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
#: Training losses over the region channels (see :mod:`app_site.losses`).
LOSSES = ("dice_bce", "dice")
#: The tag of YAML's merge key (``<<``), whose keys a mapping may override.
_MERGE_TAG = "tag:yaml.org,2002:merge"


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

    ``num_workers`` threads fill the cache (0: one). ``device_cache`` keeps the cached
    (deterministic) part of the training pipeline as plain tensors on the training device and
    runs the random crops and flips there, fed by a ``ThreadDataLoader`` (MONAI's
    fast-training recipe): on CUDA no volume crosses the bus during training. It costs device
    memory (about 5 bytes per voxel of every training case) and works on the CPU too, where
    only the loader changes.
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
    ``lr_schedule`` runs over the whole federation (``rounds`` x a round's steps):
    ``poly`` decays the learning rate as ``(1 - step / total) ** 0.9``, so the last rounds
    make small steps and the sites' models stop pulling the average apart; ``constant`` keeps
    ``learning_rate`` throughout.
    ``shared_moments`` (AdamW only) has the sites share AdamW's second moments through the
    global model (:mod:`fedseg.moments`), so that every site scales its steps alike; off,
    each site keeps its own.
    ``loss`` is what each region channel is trained with, on a sigmoid of its own (the regions
    nest, so a voxel may be in all three): ``dice_bce``, soft Dice plus binary cross-entropy
    (nnU-Net's region-based training; the default), or ``dice``, soft Dice alone.
    ``device`` is ``auto`` (CUDA when present, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``
    (one GPU of several).
    A round's local work is ``local_steps`` optimizer steps at every site, or, when
    ``local_epochs`` is set (at least 1; 0 is off), that many passes over each site's own
    training cases: ``local_epochs x ceil(cases / batch_size)`` steps, so that a site with
    more cases makes more steps (McMahan et al.'s E local epochs); ``local_steps`` is then
    not read.
    ``aggregation_weight`` is what each site's update counts for in the weighted mean that
    makes the global model: ``cases``, its training cases (times the share of its full
    round it made; FedAvg as McMahan et al., 2017 weigh it: the federation then follows the
    pooled data as centralized training samples it; the default), or ``steps``, its
    training steps of the round (NVFlare's ``NUM_STEPS_CURRENT_ROUND``; with
    ``local_steps`` every site makes as many, so the sites count alike). The case count is
    part of the report every site declares with its update.
    """

    optimizer: str = "adamw"
    loss: str = "dice_bce"
    learning_rate: float = 1e-4
    lr_schedule: str = "poly"
    weight_decay: float = 1e-5
    local_steps: int = 100
    local_epochs: int = 0
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

    def steps_per_round(self, training_cases: int) -> int:
        """The optimizer steps a site with ``training_cases`` makes in one full round.

        Raises:
            ValueError: If ``training_cases`` is below 1.
        """
        if training_cases < 1:
            raise ValueError(f"training_cases must be at least 1, got {training_cases}")
        if self.local_epochs:
            return self.local_epochs * math.ceil(training_cases / self.batch_size)
        return self.local_steps


@dataclass(frozen=True)
class FederationConfig:
    """How a round copes with slow, lost and broken sites.

    A round goes on once ``training.min_sites`` updates arrived and the others had
    ``straggler_seconds`` more; it fails, naming the missing sites, when fewer than
    ``training.min_sites`` arrived within ``round_timeout`` seconds (0: wait forever). A site
    refuses to send an update whose distance to the global model exceeds ``max_update_ratio``
    times the global model's norm; in a plaintext job the server also refuses an update whose
    network weights moved by more than ``outlier_factor`` times the median of the other sites'
    (with ``training.shared_moments`` the sites' steps follow their gradients' scale: sites
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

    An empty file, like an empty section, stands for the defaults.

    Args:
        source: Path to a YAML file, or a profile name.

    Returns:
        The validated configuration.

    Raises:
        ConfigError: If the file is missing or malformed, a key is unknown or repeated, or a
            value invalid.
    """
    path = Path(source)
    if not path.is_file():
        profile = PROFILES_DIR / f"{source}.yaml"
        if not profile.is_file():
            names = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
            raise ConfigError(f"{source}: no such file or built-in profile (profiles: {names})")
        path = profile
    loader = _UniqueKeyLoader(path.read_text(), str(path))
    try:
        document = loader.get_single_data()
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from error
    finally:
        loader.dispose()
    return config_from_dict(document, str(path))


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses a key given twice in one mapping.

    Plain YAML keeps the last one, so a second ``training:`` block would silently drop the
    first block's settings. Keys a merge (``<<``) brings in may still be overridden.
    """

    def __init__(self, text: str, where: str):
        super().__init__(text)
        self.name = where  # marks in YAML errors name the file
        self.duplicates: list[tuple[int, str]] = []  # (line, problem)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        """Notes each key seen before in the same mapping, then builds the mapping."""
        first_lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
                continue
            key, line = self.construct_object(key_node), key_node.start_mark.line + 1
            if key in first_lines:
                self.duplicates.append(
                    (
                        line,
                        f"duplicate key {key} on line {line} (first on line {first_lines[key]};"
                        " YAML would keep only the last)",
                    )
                )
            else:
                first_lines[key] = line
        return super().construct_mapping(node, deep=deep)

    def construct_document(self, node: yaml.Node) -> Any:
        """Builds the document, then reports every duplicate key together, in file order.

        Raises:
            ConfigError: If a mapping repeats a key.
        """
        document = super().construct_document(node)
        if self.duplicates:
            problems = [problem for _, problem in sorted(self.duplicates)]
            raise ConfigError(f"{self.name}: " + "; ".join(problems))
        return document


def config_from_dict(document: dict | None, where: str = "configuration") -> RunConfig:
    """Validates a plain dict into a :class:`RunConfig`.

    Args:
        document: Parsed YAML; ``None`` (an empty file), like a section that is ``None`` (one
            whose keys are all commented out), stands for the defaults.
        where: Name of the source, for error messages.

    Returns:
        The configuration.

    Raises:
        ConfigError: On unknown keys or invalid values.
    """
    config = _build(RunConfig, document, where, "")
    _check_values(config, where)
    return config


def _build(cls: type, values: Any, where: str, name: str) -> Any:
    """The dataclass ``cls`` from the mapping ``values`` found at ``name`` ("" at the top)."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: {name or 'top level'} must be a mapping, got {values!r}")
    prefix = f"{name}." if name else ""
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
            arguments[key] = _build(hint, value, where, f"{prefix}{key}")
        else:
            arguments[key] = _coerce(value, hint, where, f"{prefix}{key}")
    return cls(**arguments)


#: What a value of each field type must be, for error messages.
_EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
#: The same for the items of a tuple field.
_EXPECTED_ITEMS = {int: "integers", float: "numbers"}


def _coerce(value: Any, hint: Any, where: str, key: str) -> Any:
    """``value`` as a ``hint`` (a scalar type, ``dict`` or a tuple of one scalar type)."""
    if getattr(hint, "__origin__", None) is tuple:
        item_type, length = hint.__args__[0], len(hint.__args__)
        expected = f"a list of {length} {_EXPECTED_ITEMS[item_type]}"
        if isinstance(value, list | tuple) and len(value) == length:
            try:
                return tuple(_scalar(v, item_type) for v in value)
            except (TypeError, ValueError):
                pass
    elif hint is dict:
        expected = "a mapping"
        if isinstance(value, dict):
            return dict(value)
    else:
        expected = _EXPECTED[hint]
        try:
            return _scalar(value, hint)
        except (TypeError, ValueError):
            pass
    shown = list(value) if isinstance(value, tuple) else value
    raise ConfigError(f"{where}: {key} must be {expected}, got {shown!r}")


def _scalar(value: Any, hint: type) -> Any:
    """``value`` as a ``hint`` scalar: a bool only from a bool, never an int from a float.

    Strings convert as Python converts them (PyYAML reads ``1e-4``, without a dot, as one).

    Raises:
        TypeError: If ``value`` has a type ``hint`` refuses.
        ValueError: If a string does not convert.
    """
    if hint is bool:
        if not isinstance(value, bool):
            raise TypeError(value)
        return value
    if isinstance(value, bool) or (hint is int and isinstance(value, float)):
        raise TypeError(value)
    return hint(value)


def _check_values(config: RunConfig, where: str) -> None:
    """Checks every value against its allowed values or range, reporting all problems at once.

    Every float must be finite first (``nan`` fails no comparison, so no range check would
    catch it); each key reports its first problem only.

    Raises:
        ConfigError: Naming each key whose value cannot be used, and why.
    """
    import torch

    from models.networks import INPUT_CHANNELS, NETWORKS, REGION_CHANNELS, build_network
    from transforms.masks import MASK_METHODS

    problems: dict[str, str] = {}

    def require(key: str, ok: bool, requirement: str) -> None:
        """Notes a problem with ``key`` (``section.name[.argument]``) unless ``ok``."""
        if not ok:
            value: Any = config
            for part in key.split("."):
                value = value[part] if isinstance(value, dict) else getattr(value, part)
            shown = list(value) if isinstance(value, tuple) else value
            problems.setdefault(key, f"{key} must be {requirement}, got {shown!r}")

    for section in fields(config):
        settings = getattr(config, section.name)
        for name, hint in get_type_hints(type(settings)).items():
            if float in (hint, *getattr(hint, "__args__", ())):
                value = getattr(settings, name)
                items = value if isinstance(value, tuple) else (value,)
                require(f"{section.name}.{name}", all(map(math.isfinite, items)), "finite")

    model, network = config.model, None
    require("model.name", model.name in NETWORKS, f"one of {', '.join(sorted(NETWORKS))}")
    if model.name in NETWORKS:
        for argument, channels, what in (
            ("in_channels", INPUT_CHANNELS, "the data pipeline feeds one image channel"),
            ("out_channels", REGION_CHANNELS, "the pipeline predicts the three BraTS regions"),
        ):
            if argument in model.args:
                value = model.args[argument]
                ok = type(value) is int and value == channels
                require(f"model.args.{argument}", ok, f"{channels} ({what})")
        try:
            with torch.device("meta"):  # parameters without storage: no memory, no time
                network = build_network(model.name, **model.args)
        except Exception as error:  # whatever MONAI or PyTorch refuse the arguments with
            problems.setdefault("model.args", f"model.args: {error}")
    data = config.data
    require("data.spacing", min(data.spacing) > 0, "positive")
    divisor = getattr(network, "size_divisor", 1)
    require(
        "data.roi_size",
        all(s > 0 and s % divisor == 0 for s in data.roi_size),
        "positive"
        if network is None
        else f"positive multiples of {divisor} "
        f"(the total downsampling of model {model.name} with these model.args)",
    )
    require("data.cache_rate", 0.0 <= data.cache_rate <= 1.0, "in [0, 1]")
    require("data.num_workers", data.num_workers >= 0, "at least 0")
    harmonization = config.harmonization
    require(
        "harmonization.method",
        harmonization.method in ("nyul", "zscore", "ct", "none"),
        "nyul, zscore, ct or none",
    )
    require(
        "harmonization.mask",
        harmonization.mask in MASK_METHODS,
        f"one of {', '.join(MASK_METHODS)}",
    )
    require("harmonization.min_images", harmonization.min_images >= 1, "at least 1")
    training = config.training
    require("training.optimizer", training.optimizer in ("adamw", "sgd"), "adamw or sgd")
    require("training.loss", training.loss in LOSSES, f"one of {', '.join(LOSSES)}")
    if training.shared_moments and training.optimizer != "adamw":
        problems.setdefault(
            "training.shared_moments", "training.shared_moments needs training.optimizer adamw"
        )
    require("training.learning_rate", training.learning_rate > 0, "positive")
    require("training.weight_decay", training.weight_decay >= 0, "at least 0")
    require(
        "training.lr_schedule",
        training.lr_schedule in LR_SCHEDULES,
        f"one of {', '.join(LR_SCHEDULES)}",
    )
    require(
        "training.aggregation_weight",
        training.aggregation_weight in AGGREGATION_WEIGHTS,
        f"one of {', '.join(AGGREGATION_WEIGHTS)}",
    )
    for name in ("local_steps", "batch_size", "rounds", "min_sites"):
        require(f"training.{name}", getattr(training, name) >= 1, "at least 1")
    require("training.local_epochs", training.local_epochs >= 0, "at least 0 (0: off)")
    require(
        "training.device",
        re.fullmatch(r"auto|cpu|cuda(:\d+)?", training.device) is not None,
        "auto, cpu, cuda or cuda:N",
    )
    federation = config.federation
    for name in ("straggler_seconds", "round_timeout"):
        require(f"federation.{name}", getattr(federation, name) >= 0, "at least 0")
    for name in ("max_update_ratio", "outlier_factor"):
        require(f"federation.{name}", getattr(federation, name) > 1.0, "above 1")
    require("federation.task_request_interval", federation.task_request_interval > 0, "positive")
    validation = config.validation
    for name in ("every_rounds", "sw_batch_size"):
        require(f"validation.{name}", getattr(validation, name) >= 1, "at least 1")
    require("validation.overlap", 0.0 <= validation.overlap < 1.0, "in [0, 1)")
    require(
        "validation.mode",
        validation.mode in ("constant", "gaussian"),
        "constant or gaussian",
    )
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems.values()))


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
        total_steps: Steps in the whole run (a site of a federated run: ``rounds`` times its
            :meth:`TrainingConfig.steps_per_round`).

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
