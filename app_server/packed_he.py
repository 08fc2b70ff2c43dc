"""Server side of packed HE FedAvg: add encrypted updates, keep the encrypted global model.

Thin NVFlare shells over :mod:`fedseg.packed_ckks`. The server holds the provisioned server
context, which has no secret key: it adds ciphertexts and never sees a trained weight. The
aggregate carries the sum of the sites' weights; sites finish the average after decrypting.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.aggregator import Aggregator
from nvflare.app_common.abstract.model import ModelLearnable, make_model_learnable
from nvflare.app_common.abstract.model_persistor import ModelPersistor
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.model_desc import ModelDescriptor

from fedseg.he_context import SERVER_CONTEXT_FILE, load_provisioned_keys
from fedseg.messages import PACKED_ALGORITHM, PACKED_KEY
from fedseg.packed_ckks import EncryptedSum, PackedCkksError, PackedMessage

#: The persisted encrypted global model, in the server's app folder.
ENCRYPTED_MODEL_FILE = "FL_global_model.fedseg-ckks"


class PackedHEAggregator(Aggregator):
    """Adds the sites' packed, encrypted updates as they arrive (in-time aggregation).

    Refuses to run with a context that holds a secret key: the server must not be able to
    decrypt.

    Args:
        tenseal_context_file: The server's provisioned context.
    """

    def __init__(self, tenseal_context_file: str = SERVER_CONTEXT_FILE):
        super().__init__()
        self.tenseal_context_file = tenseal_context_file
        self._keys = None
        self._sum = None
        self._contributors: list[str] = []
        self._lock = threading.Lock()

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

    def reset(self, fl_ctx: FLContext) -> None:
        """Starts a new round's sum."""
        with self._lock:
            self._sum = EncryptedSum(self._keys) if self._keys else None
            self._contributors = []

    def accept(self, shareable: Shareable, fl_ctx: FLContext) -> bool:
        """Adds one site's encrypted update to this round's sum.

        Returns:
            Whether it was added; late, duplicate, unencrypted or foreign updates are not.
        """
        site = fl_ctx.get_peer_context().get_identity_name(default="?")
        current = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        contribution_round = shareable.get_cookie(AppConstants.CONTRIBUTION_ROUND)
        if contribution_round != current:
            self.log_warning(fl_ctx, f"{site}: update for round {contribution_round} in {current}")
            return False
        try:
            dxo = from_shareable(shareable)
        except ValueError:
            self.log_error(fl_ctx, f"{site}: the result holds no DXO")
            return False
        if dxo.get_meta_prop(MetaKey.PROCESSED_ALGORITHM) != PACKED_ALGORITHM:
            self.log_error(fl_ctx, f"{site}: the update is not packed CKKS; refused")
            return False
        with self._lock:
            if site in self._contributors:
                self.log_warning(fl_ctx, f"{site}: second update in round {current}; refused")
                return False
            try:
                self._sum.add(dxo.data[PACKED_KEY])
            except (PackedCkksError, KeyError) as error:
                self.log_error(fl_ctx, f"{site}: update refused: {error}")
                return False
            self._contributors.append(site)
        self.log_info(fl_ctx, f"{site}: encrypted update added (round {current})")
        return True

    def aggregate(self, fl_ctx: FLContext) -> Shareable:
        """The encrypted sum of this round's updates, with the sum of their weights.

        Raises:
            PackedCkksError: If no update was accepted.
        """
        with self._lock:
            blob = self._sum.to_bytes()
            contributors = sorted(self._contributors)
        self.log_info(fl_ctx, f"aggregated encrypted updates of {contributors}")
        meta = {MetaKey.PROCESSED_ALGORITHM: PACKED_ALGORITHM}
        return DXO(DataKind.WEIGHTS, {PACKED_KEY: blob}, meta).to_shareable()


class EncryptedModelPersistor(ModelPersistor):
    """Keeps the global model: the initial plaintext model, then only ciphertext.

    The initial model (untrained, built from the job's checkpoint) is never written; every
    model saved afterwards must be a packed encrypted aggregate, so the server's workspace
    never holds trained weights in plaintext. A saved model is loaded again after a restart.

    Args:
        initial_checkpoint: File name of the initial model (a PyTorch state dict) in the
            server app's custom folder.
    """

    def __init__(self, initial_checkpoint: str):
        super().__init__()
        self.initial_checkpoint = initial_checkpoint

    def load_model(self, fl_ctx: FLContext) -> ModelLearnable:
        """The last saved encrypted model, or else the initial model."""
        saved = self._saved_path(fl_ctx)
        if saved.is_file():
            self.log_info(fl_ctx, f"resuming from the encrypted global model {saved.name}")
            return make_model_learnable({PACKED_KEY: saved.read_bytes()}, {})
        path = Path(fl_ctx.get_prop(FLContextKey.APP_ROOT)) / "custom" / self.initial_checkpoint
        state = torch.load(path, map_location="cpu", weights_only=True)
        weights = {name: np.asarray(tensor.numpy()) for name, tensor in state.items()}
        return make_model_learnable(weights, {})

    def save_model(self, model_learnable: ModelLearnable, fl_ctx: FLContext) -> None:
        """Writes the encrypted global model atomically.

        Raises:
            ValueError: If the model is not a packed encrypted aggregate.
        """
        weights = model_learnable.get("weights") or {}
        if set(weights) != {PACKED_KEY}:
            raise ValueError("refusing to persist a model that is not encrypted")
        PackedMessage.from_bytes(weights[PACKED_KEY])  # a well-formed packed message
        path = self._saved_path(fl_ctx)
        temporary = path.with_name(f".tmp-{path.name}")
        temporary.write_bytes(weights[PACKED_KEY])
        os.replace(temporary, path)

    def get_model_inventory(self, fl_ctx: FLContext) -> dict[str, ModelDescriptor]:
        """The encrypted global model, once one was saved."""
        path = self._saved_path(fl_ctx)
        if not path.is_file():
            return {}
        return {path.name: ModelDescriptor(path.name, str(path), PACKED_ALGORITHM, {})}

    def get_model(self, model_file: str, fl_ctx: FLContext) -> ModelLearnable | None:
        """The saved encrypted model named ``model_file``, or ``None``."""
        path = self._saved_path(fl_ctx)
        if model_file != path.name or not path.is_file():
            return None
        return make_model_learnable({PACKED_KEY: path.read_bytes()}, {})

    def _saved_path(self, fl_ctx: FLContext) -> Path:
        return Path(fl_ctx.get_prop(FLContextKey.APP_ROOT)) / ENCRYPTED_MODEL_FILE
