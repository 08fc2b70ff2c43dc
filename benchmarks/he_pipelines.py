"""One FedAvg round through NVFlare's stock HE components and through fedseg's packed ones.

Both pipelines run the real filter, aggregator and shareable-generator classes in this process,
with contexts read from provisioned startup kits (through NVFlare's security content service, as
in a deployment) and messages serialized with NVFlare's FOBS, as they would travel:

    site: encryptor filter -> FOBS bytes (upload)
    server: FOBS -> aggregator.accept (x sites) -> aggregate -> shareable generator -> FOBS bytes
    site: FOBS -> decryptor filter -> plaintext global model

Used by ``benchmarks/he_packing.py`` and by the tests that compare the two pipelines' accuracy.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.workspace import Workspace
from nvflare.app_common.abstract.model import ModelLearnable, make_model_learnable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.shareablegenerators.full_model_shareable_generator import (
    FullModelShareableGenerator,
)
from nvflare.app_opt.he import decomposers
from nvflare.app_opt.he.intime_accumulate_model_aggregator import (
    HEInTimeAccumulateWeightedAggregator,
)
from nvflare.app_opt.he.model_decryptor import HEModelDecryptor
from nvflare.app_opt.he.model_encryptor import HEModelEncryptor
from nvflare.app_opt.he.model_shareable_generator import HEModelShareableGenerator
from nvflare.fuel.sec.security_content_service import (
    SecurityContentManager,
    SecurityContentService,
)
from nvflare.fuel.utils import fobs

from app_server.aggregation import PackedHEAggregator
from app_site.he_filters import PackedHEDecryptor, PackedHEEncryptor
from fedseg.messages import AGGREGATION_WEIGHT_META_KEY


@dataclass
class RoundMeasurement:
    """What one round cost and gave."""

    upload_bytes: int  # one site's encrypted update, as serialized
    download_bytes: int  # the encrypted global model sent back to a site
    encrypt_seconds: float  # one site: encrypt + serialize
    aggregate_seconds: float  # server: deserialize and add every site's update, serialize
    decrypt_seconds: float  # one site: deserialize + decrypt
    average: dict[str, np.ndarray]  # the decrypted global model

    @property
    def seconds(self) -> float:
        """Encrypt at one site + aggregate all + decrypt at one site."""
        return self.encrypt_seconds + self.aggregate_seconds + self.decrypt_seconds


def stock_round(
    kits: Path, models: Sequence[Mapping[str, np.ndarray]], steps: Sequence[int]
) -> RoundMeasurement:
    """A round with NVFlare's stock HE components, as ``FedAvgRecipeWithHE`` wires them.

    ``HEModelEncryptor``, ``HEInTimeAccumulateWeightedAggregator``,
    ``HEModelShareableGenerator`` and ``HEModelDecryptor``.
    """
    decomposers.register()
    return _round(
        kits,
        models,
        steps,
        encryptor=lambda: HEModelEncryptor(weigh_by_local_iter=True),
        aggregator=lambda: HEInTimeAccumulateWeightedAggregator(
            expected_data_kind=DataKind.WEIGHTS, weigh_by_local_iter=False
        ),
        generator=HEModelShareableGenerator,
        decryptor=HEModelDecryptor,
    )


def packed_round(
    kits: Path,
    models: Sequence[Mapping[str, np.ndarray]],
    steps: Sequence[int],
    declared_weights: Sequence[float] | None = None,
) -> RoundMeasurement:
    """A round with fedseg's packed filters and aggregator (the HE job's default).

    ``declared_weights``, when given, are the sites' declared aggregation weights
    (``training.aggregation_weight``); without them each update counts for its steps.
    """
    return _round(
        kits,
        models,
        steps,
        declared_weights=declared_weights,
        encryptor=PackedHEEncryptor,
        aggregator=lambda: PackedHEAggregator(min_sites=len(models)),
        generator=FullModelShareableGenerator,
        decryptor=PackedHEDecryptor,
    )


def _round(
    kits, models, steps, encryptor, aggregator, generator, decryptor, declared_weights=None
) -> RoundMeasurement:
    kits = Path(kits)
    sites = [f"site-{n}" for n in range(1, len(models) + 1)]
    uploads = []
    for index, (site, weights, n) in enumerate(zip(sites, models, steps, strict=True)):
        with _participant(kits, site) as fl_ctx:
            component = encryptor()
            component.handle_event(EventType.START_RUN, fl_ctx)
            meta = {MetaKey.NUM_STEPS_CURRENT_ROUND: n}
            if declared_weights is not None:
                meta[AGGREGATION_WEIGHT_META_KEY] = declared_weights[index]
            shareable = DXO(
                DataKind.WEIGHTS, {k: np.array(v) for k, v in weights.items()}, meta
            ).to_shareable()
            shareable.add_cookie(AppConstants.CONTRIBUTION_ROUND, 0)
            start = time.perf_counter()
            result = component.process(shareable, fl_ctx)
            result.set_peer_props(fl_ctx.get_all_public_props())  # as the client engine does
            upload = fobs.dumps(result)
            if index == 0:
                encrypt_seconds = time.perf_counter() - start
            uploads.append(upload)
    with _participant(kits, "server") as fl_ctx:
        summing, converting = aggregator(), generator()
        for component in (summing, converting):
            component.handle_event(EventType.START_RUN, fl_ctx)
        fl_ctx.set_prop(AppConstants.CURRENT_ROUND, 0, private=True, sticky=False)
        initial = make_model_learnable({k: np.array(v) for k, v in models[0].items()}, {})
        fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, initial, private=True, sticky=False)
        start = time.perf_counter()
        for site, upload in zip(sites, uploads, strict=True):
            fl_ctx.set_peer_context(_peer(site))
            if not summing.accept(fobs.loads(upload), fl_ctx):
                raise RuntimeError(f"the aggregator refused {site}'s update")
        learnable: ModelLearnable = converting.shareable_to_learnable(
            summing.aggregate(fl_ctx), fl_ctx
        )
        download = fobs.dumps(converting.learnable_to_shareable(learnable, fl_ctx))
        aggregate_seconds = time.perf_counter() - start
    with _participant(kits, sites[0]) as fl_ctx:
        component = decryptor()
        component.handle_event(EventType.START_RUN, fl_ctx)
        start = time.perf_counter()
        task = fobs.loads(download)
        task.set_header(AppConstants.CURRENT_ROUND, 1)
        average = from_shareable(component.process(task, fl_ctx)).data
        decrypt_seconds = time.perf_counter() - start
    shapes = {k: np.shape(v) for k, v in models[0].items()}
    average = {k: np.asarray(v).reshape(shapes[k]) for k, v in average.items()}
    return RoundMeasurement(
        upload_bytes=len(uploads[0]),
        download_bytes=len(download),
        encrypt_seconds=encrypt_seconds,
        aggregate_seconds=aggregate_seconds,
        decrypt_seconds=decrypt_seconds,
        average=average,
    )


@contextmanager
def _participant(kits: Path, name: str):
    """An FL context of ``name``, reading its startup kit's signed content as NVFlare does."""
    previous = SecurityContentService.security_content_manager
    SecurityContentService.security_content_manager = SecurityContentManager(
        str(kits / name / "startup")
    )
    fl_ctx = FLContext()
    fl_ctx.set_prop(ReservedKey.ENGINE, LocalEngine(kits / name), private=True, sticky=False)
    fl_ctx.set_prop(ReservedKey.RUN_NUM, "benchmark", private=False, sticky=False)
    fl_ctx.set_prop(FLContextKey.SECURE_MODE, True, private=True, sticky=False)
    fl_ctx.set_prop(ReservedKey.IDENTITY_NAME, name, private=False, sticky=False)
    fl_ctx.set_peer_context(_peer("server" if name != "server" else "site-1"))
    try:
        yield fl_ctx
    finally:
        SecurityContentService.security_content_manager = previous


class LocalEngine:
    """What components ask of a participant's engine outside NVFlare: workspace, sites, events.

    Args:
        root: The participant's workspace (a startup kit, or an empty folder).
        clients: Names of the federation's sites.
    """

    def __init__(self, root: Path, clients: Sequence[str] = ()):
        for folder in ("startup", "local"):
            (Path(root) / folder).mkdir(parents=True, exist_ok=True)
        self.workspace = Workspace(str(root))
        self.clients = [type("Client", (), {"name": name})() for name in clients]

    def get_workspace(self) -> Workspace:
        """The participant's workspace."""
        return self.workspace

    def get_clients(self) -> list:
        """The federation's sites."""
        return self.clients

    def fire_event(self, event_type: str, fl_ctx: FLContext) -> None:
        """Events have no listeners in a single-round measurement."""


def _peer(name: str) -> FLContext:
    peer = FLContext()
    peer.set_prop(ReservedKey.IDENTITY_NAME, name, private=False, sticky=False)
    return peer
