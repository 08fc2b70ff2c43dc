"""Server shells that gather the sites' declared reports and validate the final global model.

:class:`SiteReportFilter` is a server-side task-result filter: it copies the declared report
of each training and final-validation result into the run's ``fedseg_site_reports.json``
(:mod:`app_server.site_reports`) and passes the result on unchanged; it writes a round's
reports once the round is aggregated, and what is left when the run ends.
:class:`FinalValidation` is the last workflow of a job: it sends the final global model
(encrypted in an HE job: the sites decrypt it, the server never does) to every site that
reported the last round (with an update or with its refusal) and fails the job when any of
them does not send its metrics back.
"""

from __future__ import annotations

import json
from pathlib import Path

from nvflare.apis.dxo import from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.abstract.model import ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.workflows.model_controller import ModelController

from app_server.site_reports import (
    RESUMED_REPORTS_FILE,
    SITE_REPORTS_FILE,
    SiteReportError,
    SiteReports,
    last_reported_round,
    sites_of_round,
)
from fedseg.messages import FINAL_VALIDATION, PURPOSE_META_KEY, REPORT_META_KEY

_STORES: dict[str, SiteReports] = {}


def site_reports_for(fl_ctx: FLContext, mode: str) -> SiteReports:
    """The run's report store (one per run folder, shared by the filter and the workflow).

    A resumed job's store starts from the interrupted job's reports, which the job carries
    in the server app's custom folder (:data:`RESUMED_REPORTS_FILE`).
    """
    workspace = fl_ctx.get_engine().get_workspace()
    path = Path(workspace.get_run_dir(fl_ctx.get_job_id())) / SITE_REPORTS_FILE
    if str(path) not in _STORES:
        seed = Path(workspace.get_app_custom_dir(fl_ctx.get_job_id())) / RESUMED_REPORTS_FILE
        resumed = json.loads(seed.read_text()) if seed.is_file() else None
        _STORES[str(path)] = SiteReports.open(path, mode, resumed)
    return _STORES[str(path)]


class SiteReportFilter(Filter):
    """Server-side task-result filter recording each site's declared report.

    Args:
        mode: How updates travel in this job (``plaintext``, ``he-packed``, ``he-stock``).
    """

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        """Writes the reports held in memory once a round is aggregated and when the run ends.

        fedseg's aggregators write each round as they record its contributors; this covers
        NVFlare's stock HE aggregator and reports that arrive after their round was aggregated
        (a straggler's, the last round's). After aggregation, before the global model is
        persisted, so a resumed job finds the reports of every round it resumes after.
        """
        if event_type in (AppEventType.AFTER_AGGREGATION, EventType.END_RUN):
            site_reports_for(fl_ctx, self.mode).flush()

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        """Records the report; the result passes on unchanged."""
        if shareable.get_return_code() not in (None, ReturnCode.OK):
            return shareable
        site = fl_ctx.get_peer_context().get_identity_name(default="?")
        try:
            dxo = from_shareable(shareable)
        except ValueError:
            return shareable
        report = dxo.get_meta_prop(REPORT_META_KEY)
        if report is None:
            return shareable
        store = site_reports_for(fl_ctx, self.mode)
        try:
            if dxo.get_meta_prop(PURPOSE_META_KEY) == FINAL_VALIDATION:
                store.record_final(site, report)
            else:
                round_number = shareable.get_header(AppConstants.CURRENT_ROUND)
                if round_number is None:
                    round_number = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
                store.record_round(site, round_number, report)
        except SiteReportError as error:
            self.log_error(fl_ctx, f"report of {site} not recorded: {error}")
        return shareable


class FinalValidation(ModelController):
    """Sends the final global model to the sites for validation and checks every one answered.

    Args:
        persistor_id: The component that persisted the global model.
        model_name: Its name in the persistor's inventory.
        mode: How updates travelled (for the report store).
        task_name: The validation task the sites serve.
        timeout: Seconds to wait for the sites (0: no limit).
    """

    def __init__(
        self,
        persistor_id: str,
        model_name: str,
        mode: str,
        task_name: str = AppConstants.TASK_VALIDATION,
        timeout: int = 0,
    ):
        super().__init__(persistor_id=persistor_id)
        self.model_name = model_name
        self.mode = mode
        self.task_name = task_name
        self.timeout = timeout

    def run(self) -> None:
        """Validates the final model at the sites of the last round; panics on a missing site."""
        learnable = (
            self.persistor.get_model(self.model_name, self.fl_ctx) if self.persistor else None
        )
        if not learnable:
            self.panic(f"final validation: no global model {self.model_name} was persisted")
            return
        store = site_reports_for(self.fl_ctx, self.mode)
        content = store.to_dict()
        sites = sites_of_round(content, last_reported_round(content))
        if not sites:
            self.panic("final validation: no site reported any round")
            return
        model = FLModel(
            params=learnable[ModelLearnableKey.WEIGHTS],
            params_type=ParamsType.FULL,
            meta={PURPOSE_META_KEY: FINAL_VALIDATION},
        )
        self.info(f"final validation of {self.model_name} at {sites}")
        self.send_model_and_wait(
            task_name=self.task_name,
            data=model,
            targets=sites,
            min_responses=len(sites),
            timeout=self.timeout,
        )
        missing = [s for s in sites if (store.sites.get(s) or {}).get("final") is None]
        if missing:
            self.panic(f"final validation: no metrics from {', '.join(missing)}; see their logs")
