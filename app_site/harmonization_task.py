"""NVFlare Client API loop of the harmonization fit: a thin shell over app_site.harmonization.

Receives the fit configuration, computes this site's declared statistics on its own dataset
and sends them. A site that must not share (fewer images than the job's minimum or its own,
:func:`app_site.site_config.site_min_images`; wrong modality) sends no statistics, only its
reason, and the server fails the job with it. The reason the server
reads names no file or folder of the site and no case (:func:`shareable_reason`); the
site's log keeps the whole of it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import replace
from pathlib import Path

import nvflare.client as flare
from nvflare.app_common.abstract.fl_model import FLModel

from app_site.harmonization import dataset_modality, site_statistics
from app_site.site_config import site_dataset, site_min_images
from fedseg.harmonization import HarmonizationConfig, HarmonizationError

TASK_NAME = "fit_harmonization"
#: An absolute path, up to the punctuation that ends it in a message.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.])/[^\s:;,'\"()]+")
#: A case id of ``fedseg ingest`` (a hash of a series UID or of a file's path), or its file.
_CASE_ID = re.compile(r"\bcase-[0-9a-f]{12}(\.nii(\.gz)?)?\b")

logger = logging.getLogger(__name__)


def shareable_reason(error: Exception, dataset: Path | None) -> str:
    """A site's refusal as the server may read it: what went wrong, not where.

    Args:
        error: Why the site cannot send statistics.
        dataset: The site's dataset folder, when it was found.

    Returns:
        The error's message with the dataset folder named as such, every other absolute
        path and every case id replaced by a mention of it, and a pointer to the site's log.
    """
    text = str(error)
    if dataset is not None:
        inside = re.compile(re.escape(f"{dataset}/") + r"[^\s:;,'\"()]+")
        text = inside.sub("a file of the site's dataset", text)
        text = text.replace(str(dataset), "the site's dataset")
    text = _ABSOLUTE_PATH.sub("a folder or file at the site", text)
    text = _CASE_ID.sub("a case", text)
    return f"{text} (the site's log names the files)"


def run() -> None:
    """Serves fit tasks until the job ends."""
    flare.init()
    site = flare.get_site_name()
    while flare.is_running():
        task = flare.receive()
        if task is None:
            break
        dataset = None
        try:
            config = HarmonizationConfig.from_dict(task.params["config"])
            own_minimum = site_min_images(site)
            if own_minimum is not None and own_minimum > config.min_images:
                config = replace(config, min_images=own_minimum)
            dataset = site_dataset(site)
            modality = dataset_modality(dataset)
            if modality != task.params["modality"]:
                raise HarmonizationError(
                    f"{site} holds {modality} images, the job fits {task.params['modality']}"
                )
            statistics = site_statistics(dataset, config)
        except (HarmonizationError, OSError, ValueError) as error:
            logger.error("%s sends no harmonization statistics: %s", site, error)
            flare.send(FLModel(params={}, meta={"refused": shareable_reason(error, dataset)}))
            continue
        flare.send(FLModel(params=statistics.to_dict(), meta={}))
