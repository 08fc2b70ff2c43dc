"""FedAvg aggregation at the server: plaintext with outlier refusal, or packed ciphertext.

Both aggregators accept only the current round's first update of each site, record every
refused update (site, round, reason) in the run's site reports, and refuse to produce a global
model from fewer than ``min_sites`` updates: the round then fails, naming the sites that sent
nothing, instead of averaging too few sites silently. In a job weighted by training cases they
also refuse an update that declares no weight (from a site whose fedseg predates
``training.aggregation_weight``): it could only count by its steps, and steps and cases do not
mix in one mean.

- :class:`PlaintextAggregator` keeps the round's weight differences, refuses non-finite ones
  and those whose norm exceeds ``outlier_factor`` times the median norm of the other sites'
  (decided once the round is complete, so arrival order does not matter), and averages the
  rest weighted by what each site declares (training steps, or training cases).
- :class:`PackedHEAggregator` adds packed CKKS updates as they arrive
  (:mod:`fedseg.packed_ckks`); the server's context has no secret key, so it cannot look
  inside them: sites check their own updates before encrypting.
"""

from __future__ import annotations

import threading
from abc import abstractmethod

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.aggregator import Aggregator
from nvflare.app_common.app_constant import AppConstants

from app_server.report_collector import site_reports_for
from fedseg.he_context import SERVER_CONTEXT_FILE, load_provisioned_keys
from fedseg.messages import (
    AGGREGATION_WEIGHT_META_KEY,
    PACKED_ALGORITHM,
    PACKED_KEY,
    REFUSED_META_KEY,
    update_weight,
)
from fedseg.moments import MOMENTS_PREFIX, split_moments
from fedseg.packed_ckks import EncryptedSum, PackedCkksError


class RoundTooSmall(RuntimeError):
    """Fewer updates than the job's minimum arrived in a round."""


class _RoundAggregator(Aggregator):
    """Round bookkeeping shared by the aggregators (see the module docstring).

    Args:
        min_sites: Fewest updates a global model is made of.
        mode: The job's mode, for the site reports.
        aggregation_weight: What the job weighs updates by (``training.aggregation_weight``).
    """

    def __init__(self, min_sites: int, mode: str, aggregation_weight: str = "steps"):
        super().__init__()
        self.min_sites = min_sites
        self.mode = mode
        self.aggregation_weight = aggregation_weight
        self._lock = threading.Lock()
        self._contributors: list[str] = []

    def accept(self, shareable: Shareable, fl_ctx: FLContext) -> bool:
        """Takes one site's update, unless it is late, repeated, declined or refused.

        Returns:
            Whether it goes into this round's global model.
        """
        site = fl_ctx.get_peer_context().get_identity_name(default="?")
        current = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        contribution_round = shareable.get_cookie(AppConstants.CONTRIBUTION_ROUND)
        if contribution_round != current:
            reason = (
                f"arrived in round {current}, after its round was aggregated without it (a "
                "straggler: see federation.straggler_seconds)"
            )
            self._refuse(fl_ctx, site, reason, contribution_round)
            return False
        try:
            dxo = from_shareable(shareable)
        except ValueError:
            self._refuse(fl_ctx, site, "the result holds no update")
            return False
        declined = dxo.get_meta_prop(REFUSED_META_KEY)
        if declined:
            self._refuse(fl_ctx, site, f"refused at the site: {declined}")
            return False
        if (
            self.aggregation_weight != "steps"
            and dxo.get_meta_prop(AGGREGATION_WEIGHT_META_KEY) is None
        ):
            self._refuse(
                fl_ctx,
                site,
                f"the job weighs updates by training {self.aggregation_weight} and the update "
                "declares no weight (the site's fedseg predates training.aggregation_weight): "
                "upgrade fedseg at the site, or export the job with "
                "training.aggregation_weight: steps",
            )
            return False
        with self._lock:
            if site in self._contributors:
                self.log_warning(fl_ctx, f"{site}: second update in round {current}; ignored")
                return False
            reason = self._add(site, dxo, fl_ctx)
            if reason is None:
                self._contributors.append(site)
        if reason is not None:
            self._refuse(fl_ctx, site, reason)
            return False
        self.log_info(fl_ctx, f"{site}: update added (round {current})")
        return True

    def aggregate(self, fl_ctx: FLContext) -> Shareable:
        """This round's global model (or aggregate) from the accepted updates.

        Raises:
            RoundTooSmall: If fewer than ``min_sites`` updates were accepted.
        """
        with self._lock:
            for site, reason in self._finish(fl_ctx):
                self._contributors.remove(site)
                self._refuse(fl_ctx, site, reason)
            contributors = sorted(self._contributors)
            if len(contributors) < self.min_sites:
                clients = sorted(c.name for c in fl_ctx.get_engine().get_clients())
                missing = [c for c in clients if c not in contributors]
                message = (
                    f"round {fl_ctx.get_prop(AppConstants.CURRENT_ROUND)}: "
                    f"{len(contributors)} usable update(s) ({', '.join(contributors) or 'none'}), "
                    f"the job needs {self.min_sites} (training.min_sites); no usable update from "
                    f"{', '.join(missing)} within federation.round_timeout"
                )
                site_reports_for(fl_ctx, self.mode).record_failure(message)
                raise RoundTooSmall(message)
            result = self._result(fl_ctx)
        round_number = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        site_reports_for(fl_ctx, self.mode).record_contributors(round_number, contributors)
        self.log_info(fl_ctx, f"aggregated the updates of {contributors}")
        return result

    def reset(self, fl_ctx: FLContext) -> None:
        """Starts a new round."""
        with self._lock:
            self._contributors = []
            self._start_round(fl_ctx)

    def _refuse(
        self, fl_ctx: FLContext, site: str, reason: str, round_number: int | None = None
    ) -> None:
        """Logs and records a refused update (of the current round unless ``round_number``)."""
        if round_number is None:
            round_number = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        self.log_error(fl_ctx, f"{site}: update of round {round_number} refused: {reason}")
        site_reports_for(fl_ctx, self.mode).record_refusal(site, round_number, reason)

    @abstractmethod
    def _add(self, site: str, dxo: DXO, fl_ctx: FLContext) -> str | None:
        """Takes the update in; returns why it is refused, or ``None``."""

    def _finish(self, fl_ctx: FLContext) -> list[tuple[str, str]]:
        """Updates refused once the round is complete: ``(site, reason)``."""
        return []

    @abstractmethod
    def _result(self, fl_ctx: FLContext) -> Shareable:
        """The round's aggregate of the updates kept."""

    @abstractmethod
    def _start_round(self, fl_ctx: FLContext) -> None:
        """Forgets the previous round's updates."""


class PlaintextAggregator(_RoundAggregator):
    """Weighted mean of the sites' weight differences, without non-finite or outlier updates.

    Args:
        min_sites: Fewest updates a global model is made of.
        outlier_factor: Refuse an update whose network weights moved by more than this times
            the median of the other updates of the round (with at least two others; shared
            moments are not judged by it).
        mode: The job's mode, for the site reports.
        aggregation_weight: What the job weighs updates by (``training.aggregation_weight``).
    """

    def __init__(
        self,
        min_sites: int,
        outlier_factor: float,
        mode: str = "plaintext",
        aggregation_weight: str = "steps",
    ):
        super().__init__(min_sites, mode, aggregation_weight)
        self.outlier_factor = outlier_factor
        self._updates: dict[str, tuple[dict[str, np.ndarray], float]] = {}
        self._dtypes: dict[str, dict[str, np.dtype]] = {}  # each update's precision

    def _start_round(self, fl_ctx: FLContext) -> None:
        self._updates, self._dtypes = {}, {}

    def _add(self, site: str, dxo: DXO, fl_ctx: FLContext) -> str | None:
        if dxo.data_kind != DataKind.WEIGHT_DIFF:
            return f"expected a weight difference, got {dxo.data_kind}"
        weight = update_weight(dxo)
        if weight is None:
            return "no positive aggregation weight or NUM_STEPS_CURRENT_ROUND to weight it by"
        update = {k: np.asarray(v, dtype=np.float64) for k, v in dxo.data.items()}
        bad = sorted(k for k, v in update.items() if not np.all(np.isfinite(v)))
        if bad:
            return f"non-finite values in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}"
        self._updates[site] = (update, weight)
        self._dtypes[site] = {k: np.asarray(v).dtype for k, v in dxo.data.items()}
        return None

    def _finish(self, fl_ctx: FLContext) -> list[tuple[str, str]]:
        # The network's weights only. Shared moments' differences do not shrink with the
        # learning rate: near the end of a poly schedule they were the whole norm, and one
        # site's batch of unusual gradients read as an outlier (round 1796 of 1800).
        norms = {
            site: float(
                np.sqrt(sum(float(np.sum(v * v)) for v in split_moments(update)[0].values()))
            )
            for site, (update, _) in self._updates.items()
        }
        refused = []
        for site, norm in norms.items():
            others = [n for s, n in norms.items() if s != site]
            if len(others) >= 2 and norm > self.outlier_factor * float(np.median(others)):
                reason = (
                    f"weight update norm {norm:.3g} is over {self.outlier_factor:g} times the "
                    f"median of the other sites' ({float(np.median(others)):.3g})"
                )
                if any(name.startswith(MOMENTS_PREFIX) for name in self._updates[site][0]):
                    reason += (
                        "; with shared moments updates scale with each site's gradients: "
                        "harmonize the sites' intensities, or raise federation.outlier_factor"
                    )
                refused.append((site, reason))
        for site, _ in refused:
            self._updates.pop(site)
        return refused

    def _result(self, fl_ctx: FLContext) -> Shareable:
        # Summed in site order, not arrival order: the same updates give the same global model.
        updates = [self._updates[site] for site in sorted(self._updates)]
        total = sum(weight for _, weight in updates)
        mean = {
            name: (sum(update[name] * weight for update, weight in updates) / total).astype(
                np.result_type(*(self._dtypes[site][name] for site in self._updates))
            )  # summed in float64, kept in the sites' precision
            for name in updates[0][0]
        }
        return DXO(DataKind.WEIGHT_DIFF, mean).to_shareable()


class PackedHEAggregator(_RoundAggregator):
    """Adds the sites' packed, encrypted updates as they arrive (in-time aggregation).

    Refuses to run with a context that holds a secret key: the server must not be able to
    decrypt.

    Args:
        min_sites: Fewest updates a global model is made of.
        tenseal_context_file: The server's provisioned context.
        mode: The job's mode, for the site reports.
        aggregation_weight: What the job weighs updates by (``training.aggregation_weight``).
    """

    def __init__(
        self,
        min_sites: int,
        tenseal_context_file: str = SERVER_CONTEXT_FILE,
        mode: str = "he-packed",
        aggregation_weight: str = "steps",
    ):
        super().__init__(min_sites, mode, aggregation_weight)
        self.tenseal_context_file = tenseal_context_file
        self._keys = None
        self._sum = None

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        """Loads the server's context at the start of the run."""
        if event_type == EventType.START_RUN:
            self._keys = load_provisioned_keys(self.tenseal_context_file, fl_ctx)
            if self._keys.can_decrypt:
                self.system_panic(
                    f"{self.tenseal_context_file} holds a secret key: the server must not be able "
                    "to decrypt; re-provision with NVFlare's HEBuilder",
                    fl_ctx,
                )
            self.reset(fl_ctx)

    def _start_round(self, fl_ctx: FLContext) -> None:
        self._sum = EncryptedSum(self._keys) if self._keys else None

    def _add(self, site: str, dxo: DXO, fl_ctx: FLContext) -> str | None:
        if dxo.get_meta_prop(MetaKey.PROCESSED_ALGORITHM) != PACKED_ALGORITHM:
            return "the update is not packed CKKS"
        try:
            self._sum.add(dxo.data[PACKED_KEY])
        except (PackedCkksError, KeyError) as error:
            return str(error)
        return None

    def _result(self, fl_ctx: FLContext) -> Shareable:
        meta = {MetaKey.PROCESSED_ALGORITHM: PACKED_ALGORITHM}
        return DXO(DataKind.WEIGHTS, {PACKED_KEY: self._sum.to_bytes()}, meta).to_shareable()
