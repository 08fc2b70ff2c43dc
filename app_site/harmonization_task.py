"""NVFlare Client API loop of the harmonization fit: a thin shell over app_site.harmonization.

Receives the fit configuration, computes this site's declared statistics on its own dataset
and sends them. A site that must not share (too few images, wrong modality) sends no
statistics, only its reason, and the server fails the job with it.
"""

from __future__ import annotations

import nvflare.client as flare
from nvflare.app_common.abstract.fl_model import FLModel

from app_site.harmonization import dataset_modality, site_statistics
from app_site.site_config import site_dataset
from fedseg.harmonization import HarmonizationConfig, HarmonizationError

TASK_NAME = "fit_harmonization"


def run() -> None:
    """Serves fit tasks until the job ends."""
    flare.init()
    site = flare.get_site_name()
    while flare.is_running():
        task = flare.receive()
        if task is None:
            break
        try:
            config = HarmonizationConfig.from_dict(task.params["config"])
            dataset = site_dataset(site)
            modality = dataset_modality(dataset)
            if modality != task.params["modality"]:
                raise HarmonizationError(
                    f"{site} holds {modality} images, the job fits {task.params['modality']}"
                )
            statistics = site_statistics(dataset, config)
        except (HarmonizationError, FileNotFoundError) as error:
            flare.send(FLModel(params={}, meta={"refused": str(error)}))
            continue
        flare.send(FLModel(params=statistics.to_dict(), meta={}))
