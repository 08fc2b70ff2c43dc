"""The federated harmonization fit as an NVFlare job (recipe builder)."""

from __future__ import annotations

from pathlib import Path

from nvflare.client.config import ExchangeFormat
from nvflare.fuel.utils.constants import FrameworkType
from nvflare.job_config.api import FedJob
from nvflare.job_config.script_runner import ScriptRunner
from nvflare.recipe.spec import Recipe

from app_server.harmonization import ARTIFACT_FILE, HarmonizationController
from app_site.harmonization_task import TASK_NAME
from fedseg.config import RunConfig
from fedseg.harmonization import HarmonizationConfig, check_method_fits_modality

CLIENT_SCRIPT = Path(__file__).resolve().parent / "scripts" / "harmonization_client.py"
#: Seconds the server of a federation waits for the sites' statistics.
FEDERATION_FIT_TIMEOUT = 1800


class HarmonizationRecipe(Recipe):
    """One task: every site sends its declared statistics, the server writes the artifact.

    The artifact lands in the server's run folder as ``harmonization.json``
    (:func:`find_artifact` locates it in a job result).

    Args:
        config: How to fit.
        modality: ``MR`` or ``CT``.
        min_sites: Fewest sites whose statistics make a fit.
        name: Job name.
        timeout: Seconds to wait for the sites (0: no limit).
    """

    def __init__(
        self,
        config: HarmonizationConfig,
        modality: str,
        min_sites: int,
        name: str = "fedseg-harmonization",
        timeout: int = 0,
    ):
        job = FedJob(name=name, min_clients=min_sites)
        job.to_server(
            HarmonizationController(
                config.to_dict(), modality, min_sites, task_name=TASK_NAME, timeout=timeout
            )
        )
        # Plain numbers travel, not tensors: RAW exchange on both sides.
        runner = ScriptRunner(
            script=str(CLIENT_SCRIPT),
            framework=FrameworkType.RAW,
            server_expected_format=ExchangeFormat.RAW,
        )
        job.to_clients(runner, tasks=[TASK_NAME])
        super().__init__(job)


def harmonization_recipe(
    config: RunConfig, modality: str, min_sites: int, timeout: int = FEDERATION_FIT_TIMEOUT
) -> HarmonizationRecipe:
    """The federated fit of the harmonization a run configuration asks for.

    Args:
        config: The run configuration (its ``harmonization`` section).
        modality: The sites' modality, ``MR`` or ``CT``.
        min_sites: Fewest sites whose statistics make a fit.
        timeout: Seconds the server waits for the sites (0: no limit).

    Returns:
        The recipe.

    Raises:
        ValueError: If the configuration asks for no harmonization, or for a method that does
            not fit ``modality``.
    """
    settings = config.harmonization
    if settings.method == "none":
        raise ValueError(
            "the configuration's harmonization.method is none: there is nothing to fit"
        )
    fit = HarmonizationConfig(
        method=settings.method, mask_method=settings.mask, min_images=settings.min_images
    )
    check_method_fits_modality(fit.method, modality)
    return HarmonizationRecipe(fit, modality, min_sites, timeout=timeout)


def find_artifact(result_dir: Path) -> Path:
    """Locates the artifact in a job's result folder.

    Raises:
        FileNotFoundError: If the job wrote none (it failed; its log says why).
    """
    found = sorted(Path(result_dir).rglob(ARTIFACT_FILE))
    if not found:
        raise FileNotFoundError(
            f"{result_dir}: the harmonization job wrote no {ARTIFACT_FILE}; see the server log"
        )
    return found[0]
