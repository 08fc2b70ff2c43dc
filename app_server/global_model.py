"""The server's global model: persisted after every round, found again after a restart.

:class:`GlobalModelPersistor` starts from the job's initial model (or, in a resumed job, from
the interrupted job's last global model) and keeps the latest global model in the server's app
folder: in an encrypted job only as the packed ciphertext (it refuses anything else, so no
trained weight is ever written in plaintext), in a plaintext job as a PyTorch state dict of
the network (the shared AdamW moments of :mod:`fedseg.moments`, when the job has them, go to a
file of their own, so the model file loads into the network as it is). Next to it, a
checkpoint record names the round the model completes and the hashes of the model and of its
moments; that is what ``fedseg job resume`` starts from (:mod:`jobs.resume`).
:class:`GlobalModelLocator` hands the model to NVFlare's cross-site evaluation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnable, make_model_learnable
from nvflare.app_common.abstract.model_locator import ModelLocator
from nvflare.app_common.abstract.model_persistor import ModelPersistor
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.model_desc import ModelDescriptor

from fedseg.files import file_sha256, write_json_atomic
from fedseg.messages import PACKED_ALGORITHM, PACKED_KEY
from fedseg.moments import split_moments
from fedseg.packed_ckks import PackedMessage

#: The persisted global model, in the server's app folder.
ENCRYPTED_MODEL_FILE = "FL_global_model.fedseg-ckks"
PLAINTEXT_MODEL_FILE = "FL_global_model.pt"
#: A plaintext job's shared AdamW moments, next to the model.
PLAINTEXT_MOMENTS_FILE = "FL_global_moments.pt"
#: The checkpoint record, next to the persisted model.
CHECKPOINT_FILE = "fedseg_checkpoint.json"


class GlobalModelPersistor(ModelPersistor):
    """Keeps the global model; the initial model (untrained) is never written.

    Args:
        initial_checkpoint: File name of the model the job starts from, in the server app's
            custom folder: a PyTorch state dict, or, resuming an encrypted job, the packed
            ciphertext of the interrupted job's last global model.
        encrypted: Whether the job's models are packed ciphertext (then nothing else is saved).
        resumed_round: For a resumed job, the round whose global model ``initial_checkpoint``
            is; it becomes this job's first checkpoint at once.
    """

    def __init__(self, initial_checkpoint: str, encrypted: bool, resumed_round: int | None = None):
        super().__init__()
        self.initial_checkpoint = initial_checkpoint
        self.encrypted = encrypted
        self.resumed_round = resumed_round

    @property
    def file_name(self) -> str:
        """The persisted model's file name."""
        return ENCRYPTED_MODEL_FILE if self.encrypted else PLAINTEXT_MODEL_FILE

    def load_model(self, fl_ctx: FLContext) -> ModelLearnable:
        """The last saved global model, or else the model the job starts from."""
        saved = self.get_model(self.file_name, fl_ctx)
        if saved is not None:
            self.log_info(fl_ctx, f"going on from the saved global model {self.file_name}")
            return saved
        path = _app_root(fl_ctx) / "custom" / self.initial_checkpoint
        if self.resumed_round is None:
            return make_model_learnable(_read_state(path), {})
        if self.encrypted:
            learnable = make_model_learnable({PACKED_KEY: path.read_bytes()}, {})
        else:
            learnable = make_model_learnable(_read_state(path), {})
        self.log_info(fl_ctx, f"resuming from the global model of round {self.resumed_round}")
        self._write(learnable, self.resumed_round, fl_ctx)
        return learnable

    def save_model(self, model_learnable: ModelLearnable, fl_ctx: FLContext) -> None:
        """Writes the global model of the current round and its checkpoint record.

        Raises:
            ValueError: In an encrypted job, if the model is not a packed encrypted aggregate.
        """
        self._write(model_learnable, int(fl_ctx.get_prop(AppConstants.CURRENT_ROUND)), fl_ctx)

    def _write(self, model_learnable: ModelLearnable, round_number: int, fl_ctx: FLContext) -> None:
        """Writes the model and its record, each atomically.

        The record (round, hash of this model and of its shared moments, and the previous
        round's) is written before the model and then its moments replace the previous ones,
        so a crash in between leaves a record whose ``previous`` entry still describes the
        model on disk, or moments whose hash matches neither entry (a resumption then starts
        them again).
        """
        weights = model_learnable.get("weights") or {}
        path = _app_root(fl_ctx) / self.file_name
        temporary = path.with_name(f".tmp-{path.name}")
        moments_temporary = None
        if self.encrypted:
            if set(weights) != {PACKED_KEY}:
                raise ValueError("refusing to persist a model that is not encrypted")
            PackedMessage.from_bytes(weights[PACKED_KEY])  # a well-formed packed message
            temporary.write_bytes(weights[PACKED_KEY])
        else:
            network, moments = split_moments(weights)
            torch.save(_tensors(network), temporary)
            if moments:
                moments_temporary = path.with_name(f".tmp-{PLAINTEXT_MOMENTS_FILE}")
                torch.save(_tensors(moments), moments_temporary)
        record_path = path.with_name(CHECKPOINT_FILE)
        previous = json.loads(record_path.read_text()) if record_path.is_file() else None
        record = {
            "round": round_number,
            "model_file": path.name,
            "sha256": file_sha256(temporary),
            "moments_sha256": moments_temporary and file_sha256(moments_temporary),
            "previous": previous
            and {k: previous.get(k) for k in ("round", "sha256", "moments_sha256")},
        }
        write_json_atomic(record_path, record)
        os.replace(temporary, path)
        if moments_temporary:
            os.replace(moments_temporary, path.with_name(PLAINTEXT_MOMENTS_FILE))

    def get_model_inventory(self, fl_ctx: FLContext) -> dict[str, ModelDescriptor]:
        """The saved global model, once there is one."""
        path = _app_root(fl_ctx) / self.file_name
        if not path.is_file():
            return {}
        model_format = PACKED_ALGORITHM if self.encrypted else "pytorch"
        return {path.name: ModelDescriptor(path.name, str(path), model_format, {})}

    def get_model(self, model_file: str, fl_ctx: FLContext) -> ModelLearnable | None:
        """The saved global model named ``model_file``, or ``None``."""
        path = _app_root(fl_ctx) / self.file_name
        if model_file != path.name or not path.is_file():
            return None
        if self.encrypted:
            return make_model_learnable({PACKED_KEY: path.read_bytes()}, {})
        moments = path.with_name(PLAINTEXT_MOMENTS_FILE)
        state = _read_state(path) | (_read_state(moments) if moments.is_file() else {})
        return make_model_learnable(state, {})


class GlobalModelLocator(ModelLocator):
    """Finds the saved plaintext global model for NVFlare's cross-site evaluation.

    Args:
        persistor_id: The job's :class:`GlobalModelPersistor`.
    """

    def __init__(self, persistor_id: str):
        super().__init__()
        self.persistor_id = persistor_id

    def get_model_names(self, fl_ctx: FLContext) -> list[str]:
        """The global model's name, once it was saved."""
        return list(self._persistor(fl_ctx).get_model_inventory(fl_ctx))

    def locate_model(self, model_name: str, fl_ctx: FLContext) -> DXO | None:
        """The model's weights, or ``None`` when there is no such model."""
        learnable = self._persistor(fl_ctx).get_model(model_name, fl_ctx)
        return DXO(DataKind.WEIGHTS, learnable["weights"]) if learnable else None

    def _persistor(self, fl_ctx: FLContext) -> GlobalModelPersistor:
        return fl_ctx.get_engine().get_component(self.persistor_id)


def _app_root(fl_ctx: FLContext) -> Path:
    return Path(fl_ctx.get_prop(FLContextKey.APP_ROOT))


def _tensors(state: dict) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(np.asarray(v)) for k, v in state.items()}


def _read_state(path: Path) -> dict[str, np.ndarray]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {name: tensor.numpy() for name, tensor in state.items()}
