"""Server side of the federated harmonization fit: a one-task NVFlare workflow.

Sends the fit configuration to the sites, combines their declared statistics exactly
(``fedseg.harmonization.combine_statistics``) and writes the artifact into the job's run
folder. Any refusal or missing site fails the job with the sites' reasons.
"""

from __future__ import annotations

import os

from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.workflows.model_controller import ModelController

from fedseg.artifacts import write_artifact
from fedseg.harmonization import (
    HarmonizationConfig,
    HarmonizationError,
    SiteStatistics,
    combine_statistics,
)

ARTIFACT_FILE = "harmonization.json"


class HarmonizationController(ModelController):
    """Fits the harmonization artifact from the sites' aggregates.

    Args:
        config: ``HarmonizationConfig.to_dict()`` of the fit.
        modality: Modality of the images (``MR`` or ``CT``).
        min_sites: Fewest sites whose statistics make a fit.
        task_name: Name of the task the sites serve.
        timeout: Seconds to wait for the sites (0: no limit).
    """

    def __init__(
        self,
        config: dict,
        modality: str,
        min_sites: int,
        task_name: str = "fit_harmonization",
        timeout: int = 0,
    ):
        super().__init__(persistor_id="")
        # NVFlare records components by their constructor arguments, read back from attributes
        # of the same names: keep them as given.
        self.config = config
        self.fit_config = HarmonizationConfig.from_dict(config)
        self.modality = modality
        self.min_sites = min_sites
        self.task_name = task_name
        self.timeout = timeout

    def run(self) -> None:
        """Sends the task, combines the answers, writes the artifact."""
        task = FLModel(params={"config": self.fit_config.to_dict(), "modality": self.modality})
        results = self.send_model_and_wait(
            task_name=self.task_name, data=task, min_responses=self.min_sites, timeout=self.timeout
        )
        statistics, refusals = {}, []
        for result in results:
            site = result.meta.get("client_name", "unknown site")
            if "refused" in result.meta:
                refusals.append(f"{site}: {result.meta['refused']}")
                continue
            statistics[site] = SiteStatistics.from_dict(result.params)
        if refusals or len(statistics) < self.min_sites:
            reasons = "; ".join(refusals) or "no answer"
            self.panic(
                f"harmonization fit failed: {len(statistics)} site(s) sent statistics, "
                f"{self.min_sites} needed ({reasons})"
            )
            return
        try:
            payload = combine_statistics(self.fit_config, statistics, self.modality)
        except HarmonizationError as error:
            self.panic(f"harmonization fit failed: {error}")
            return
        path = os.path.join(self._run_dir(), ARTIFACT_FILE)
        digest = write_artifact(payload, path)
        self.info(f"harmonization artifact {digest[:12]} from {sorted(statistics)}: {path}")

    def _run_dir(self) -> str:
        workspace = self.fl_ctx.get_engine().get_workspace()
        return workspace.get_run_dir(self.fl_ctx.get_job_id())
