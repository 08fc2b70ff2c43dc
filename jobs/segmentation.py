"""The federated segmentation job: FedAvg over MONAI training at each site (recipe builder)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import yaml
from nvflare.apis.job_def import ALL_SITES
from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
from nvflare.client.config import TransferType
from nvflare.recipe.utils import add_cross_site_evaluation

from app_site.training_task import ARTIFACT_FILE, JOB_MANIFEST_FILE, RUN_CONFIG_FILE
from fedseg.config import RunConfig
from models.networks import NETWORKS

CLIENT_SCRIPT = Path(__file__).resolve().parent / "scripts" / "segmentation_client.py"


def segmentation_recipe(
    config: RunConfig,
    harmonization_artifact: Path | None = None,
    name: str = "fedseg-segmentation",
    sites: int | None = None,
) -> FedAvgRecipe:
    """A FedAvg recipe that trains ``config``'s network at every site.

    The run configuration, the harmonization artifact and a manifest with the artifact's hash
    travel inside the job (each client app's custom folder); sites refuse to train when their
    copy of the artifact does not match that hash.

    Args:
        config: The run configuration.
        harmonization_artifact: Fitted artifact, or ``None`` when the configuration asks for
            no harmonization.
        name: Job name.
        sites: Sites that train in every round; default ``training.min_sites`` (NVFlare's
            FedAvg samples that many sites per round).

    Returns:
        The recipe (execute it in an NVFlare environment, or export it).

    Raises:
        ValueError: If the configuration asks for harmonization and no artifact is given.
    """
    if config.harmonization.method != "none" and harmonization_artifact is None:
        raise ValueError(
            "the configuration asks for harmonization: fit an artifact first "
            "(fedseg harmonize fit, or let fedseg job run fit it)"
        )
    network = NETWORKS[config.model.name]
    recipe = FedAvgRecipe(
        name=name,
        model={"class_path": f"{network.__module__}.{network.__name__}", "args": config.model.args},
        min_clients=sites or config.training.min_sites,
        num_rounds=config.training.rounds,
        train_script=str(CLIENT_SCRIPT),
        key_metric="dice_mean",
        key_metric_mode="max",
        params_transfer_type=TransferType.DIFF,
    )
    staging = Path(tempfile.mkdtemp(prefix="fedseg-job-"))
    (staging / RUN_CONFIG_FILE).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    manifest = {"harmonization_hash": None}
    if harmonization_artifact is not None:
        artifact = json.loads(Path(harmonization_artifact).read_text())
        manifest["harmonization_hash"] = artifact["hash"]
        (staging / ARTIFACT_FILE).write_bytes(Path(harmonization_artifact).read_bytes())
    (staging / JOB_MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    for path in sorted(staging.iterdir()):
        recipe._job.add_file_to(str(path), ALL_SITES)  # Recipe keeps its FedJob private
    # Every site validates the final global model and the other sites' local models.
    add_cross_site_evaluation(recipe)
    return recipe
