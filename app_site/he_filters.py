"""NVFlare filters at a site: packed CKKS, an outgoing audit, a reply without a local model.

Thin shells over :mod:`fedseg.packed_ckks`. Outgoing training results become one ciphertext
payload (the update times its aggregation weight); incoming encrypted global models are
decrypted and averaged here, never at the server. The audit filter records the structure of every
outgoing message (keys, types, sizes; never values) and, in an encrypted job, refuses to send
anything but ciphertext and declared metadata. A site with no model of its own to submit to
cross-site evaluation answers with an error reply, which the evaluation skips.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.event_type import EventType
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.app_common.app_constant import AppConstants
from tenseal.tensors.ckksvector import CKKSVector

from fedseg.he_context import CLIENT_CONTEXT_FILE, load_provisioned_keys
from fedseg.messages import (
    AGGREGATION_WEIGHT_META_KEY,
    FINAL_VALIDATION,
    PACKED_ALGORITHM,
    PACKED_KEY,
    PURPOSE_META_KEY,
    REFUSED_META_KEY,
    REPORT_META_KEY,
    update_weight,
)
from fedseg.packed_ckks import WeightedOverflowError, decrypt_model, encrypt_update

#: Metadata a site declares with its results; anything else is refused in an encrypted job.
DECLARED_META_KEYS = frozenset(
    {
        MetaKey.NUM_STEPS_CURRENT_ROUND,
        AGGREGATION_WEIGHT_META_KEY,  # steps, or training cases
        MetaKey.INITIAL_METRICS,
        MetaKey.PROCESSED_ALGORITHM,
        MetaKey.PROCESSED_KEYS,
        MetaKey.FILTER_HISTORY,  # names of the filters applied
        REPORT_META_KEY,
        PURPOSE_META_KEY,
        REFUSED_META_KEY,  # why a site sent no update
    }
)
#: The site's audit log, in its run folder: one JSON line per outgoing message.
AUDIT_FILE = "fedseg_outgoing_audit.jsonl"


class _ProvisionedKeys:
    """Loads the site's keys once per run."""

    def __init__(self, context_file: str):
        self._context_file = context_file
        self._keys = None

    def get(self, fl_ctx: FLContext):
        if self._keys is None:
            self._keys = load_provisioned_keys(self._context_file, fl_ctx)
        return self._keys

    def forget(self) -> None:
        self._keys = None


class _SiteKeysFilter(DXOFilter):
    """A filter of model weights that uses the site's provisioned keys (loaded once per run).

    Args:
        tenseal_context_file: The site's provisioned context.
    """

    def __init__(self, tenseal_context_file: str = CLIENT_CONTEXT_FILE):
        super().__init__(
            supported_data_kinds=[DataKind.WEIGHTS], data_kinds_to_filter=[DataKind.WEIGHTS]
        )
        self.tenseal_context_file = tenseal_context_file
        self._keys = _ProvisionedKeys(tenseal_context_file)

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        """Forgets the keys at the end of a run."""
        if event_type == EventType.END_RUN:
            self._keys.forget()


class PackedHEEncryptor(_SiteKeysFilter):
    """Task-result filter: encrypts a site's model, times its aggregation weight.

    Args:
        tenseal_context_file: The site's provisioned context.
    """

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO:
        """Replaces the weights by their packed encryption.

        Raises:
            ValueError: If the weights are already encrypted or lack a weight, hold non-finite
                values, or times their weight could overflow the aggregate (refused before
                anything is encrypted or sent).
        """
        if PACKED_KEY in dxo.data:
            raise ValueError("the update is already encrypted")
        weight = update_weight(dxo)
        if weight is None:
            raise ValueError(
                "the update carries no positive aggregation weight or NUM_STEPS_CURRENT_ROUND "
                "to weight it by"
            )
        start = time.perf_counter()
        weights = {name: np.asarray(value) for name, value in dxo.data.items()}
        try:
            blob = encrypt_update(self._keys.get(fl_ctx), weights, weight)
        except WeightedOverflowError as error:  # a large site weighted by its training cases
            raise WeightedOverflowError(
                f"{error}, or weigh the updates by their steps (training.aggregation_weight: "
                f"steps): this site's update counts for {weight:g}"
            ) from error
        self.log_info(
            fl_ctx,
            f"encrypted {sum(w.size for w in weights.values())} values in "
            f"{time.perf_counter() - start:.2f} s: {len(blob)} bytes",
        )
        meta = {**dxo.meta, MetaKey.PROCESSED_ALGORITHM: PACKED_ALGORITHM}
        return DXO(DataKind.WEIGHTS, {PACKED_KEY: blob}, meta)


class PackedHEDecryptor(_SiteKeysFilter):
    """Task-data filter: decrypts an encrypted global model and divides by its weight.

    Only the initial model of the first round may arrive in plaintext (it was never trained).

    Args:
        tenseal_context_file: The site's provisioned context.
    """

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        """Decrypts the global model.

        Raises:
            ValueError: If a trained model arrives unencrypted, or was encrypted under another
                context (this site's kit is from another provisioning).
        """
        keys = self._keys.get(fl_ctx)  # also proves the kit's context loads, before training
        if PACKED_KEY not in dxo.data:
            round_number = shareable.get_header(AppConstants.CURRENT_ROUND, 0)
            if round_number or dxo.get_meta_prop(PURPOSE_META_KEY) == FINAL_VALIDATION:
                raise ValueError(f"an unencrypted model arrived in round {round_number}: refused")
            return None
        weights = decrypt_model(keys, dxo.data[PACKED_KEY])
        meta = {k: v for k, v in dxo.meta.items() if k != MetaKey.PROCESSED_ALGORITHM}
        return DXO(DataKind.WEIGHTS, weights, meta)


class NoLocalModelReply(Filter):
    """Task-result filter of ``submit_model``: a site without a local model answers so.

    A site whose every update was refused (non-finite after training, say), or that trained
    no round of the job, has no model of its own for cross-site evaluation. Its reply
    (metrics only, saying why under :data:`~fedseg.messages.REFUSED_META_KEY`) leaves as an
    execution-result error, which NVFlare's cross-site evaluation skips instead of sending it
    to the sites as a model to validate.
    """

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        """Turns a declared "no local model" into an error reply; passes anything else on."""
        try:
            dxo = from_shareable(shareable)
        except ValueError:
            return shareable
        if dxo.data_kind != DataKind.METRICS or not dxo.get_meta_prop(REFUSED_META_KEY):
            return shareable
        self.log_warning(fl_ctx, f"no local model to submit: {dxo.get_meta_prop(REFUSED_META_KEY)}")
        return make_reply(ReturnCode.EXECUTION_RESULT_ERROR)


class OutgoingAudit(Filter):
    """Task-result filter, last in the chain: records what leaves the site, and enforces it.

    Every outgoing result is described (task, data kind, per key: type and size in bytes or
    elements; meta keys and their types) in ``fedseg_outgoing_audit.jsonl`` in the site's run
    folder. With ``require_encrypted``, a result whose data holds anything but packed ciphertext,
    or whose meta holds an undeclared key, is refused.

    Args:
        require_encrypted: Refuse plaintext model data (the HE job).
    """

    def __init__(self, require_encrypted: bool = False):
        super().__init__()
        self.require_encrypted = require_encrypted

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        """Records the message and passes it on unchanged.

        Raises:
            ValueError: If ``require_encrypted`` and the message is not ciphertext plus
                declared metadata.
        """
        record = {
            "task": fl_ctx.get_prop(FLContextKey.TASK_NAME, "?"),
            "round": shareable.get_header(AppConstants.CURRENT_ROUND),
        }
        try:
            dxo = from_shareable(shareable)
        except ValueError:
            record["dxo"] = None
        else:
            record.update(describe_dxo(dxo))
            if self.require_encrypted:
                problems = undeclared_content(dxo)
                if problems:
                    raise ValueError("refusing to send " + "; ".join(problems))
        run_dir = Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id()))
        with open(run_dir / AUDIT_FILE, "a") as log:
            log.write(json.dumps(record) + "\n")
            log.flush()
            os.fsync(log.fileno())
        return shareable


def describe_dxo(dxo: DXO) -> dict:
    """The structure of a DXO: data kind, each data key's type and size, meta keys' types."""
    return {
        "kind": dxo.data_kind,
        "data": {key: _describe(value) for key, value in (dxo.data or {}).items()},
        "meta": {key: type(value).__name__ for key, value in dxo.meta.items()},
    }


def undeclared_content(dxo: DXO) -> list[str]:
    """What an encrypted job must not send: plaintext model data, undeclared metadata."""
    problems = []
    if dxo.data_kind in (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF):
        if set(dxo.data) != {PACKED_KEY} or not isinstance(dxo.data[PACKED_KEY], bytes):
            problems.append(f"plaintext model data ({len(dxo.data)} keys)")
    elif dxo.data_kind != DataKind.METRICS:
        problems.append(f"data of kind {dxo.data_kind}")
    undeclared = sorted(set(dxo.meta) - DECLARED_META_KEYS)
    if undeclared:
        problems.append(f"undeclared metadata {undeclared}")
    return problems


def _describe(value) -> dict:
    if isinstance(value, bytes | bytearray):
        return {"type": "bytes", "bytes": len(value)}
    if isinstance(value, CKKSVector):  # NVFlare's stock filters; it sends the context with each
        return {
            "type": "CKKSVector",
            "bytes": len(value.serialize()),
            "context_bytes": len(value.context().serialize()),
        }
    if isinstance(value, np.ndarray) or hasattr(value, "numel"):
        array = np.asarray(value)
        return {
            "type": type(value).__name__,
            "elements": int(array.size),
            "dtype": str(array.dtype),
            "bytes": int(array.nbytes),
        }
    return {"type": type(value).__name__}
