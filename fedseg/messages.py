"""What sites and server exchange besides model weights: meta keys, and the update's weight."""

import math

from nvflare.apis.dxo import DXO, MetaKey

#: Meta key of the declared report (validation metrics, training summary) in a site's result.
REPORT_META_KEY = "fedseg_report"
#: Meta key of task data saying what a validation task is for.
PURPOSE_META_KEY = "fedseg_purpose"
#: Its value for the validation of the final global model.
FINAL_VALIDATION = "final_validation"
#: Meta key of a site's result that carries no update, saying why the site refused to send it.
REFUSED_META_KEY = "fedseg_refused"
#: Marks packed CKKS payloads (``MetaKey.PROCESSED_ALGORITHM``).
PACKED_ALGORITHM = "fedseg-packed-ckks"
#: The one key of a packed payload in a DXO's data.
PACKED_KEY = "fedseg_packed_ckks"
#: Meta key of the weight a site's update counts with in FedAvg (``training.aggregation_weight``).
AGGREGATION_WEIGHT_META_KEY = "fedseg_aggregation_weight"


def update_weight(dxo: DXO) -> float | None:
    """The weight an update counts with in the weighted mean of the round.

    Args:
        dxo: A site's training result.

    Returns:
        The weight the site declared (:data:`AGGREGATION_WEIGHT_META_KEY`), or else NVFlare's
        ``NUM_STEPS_CURRENT_ROUND`` (what stock NVFlare clients send); ``None`` when the update
        carries neither, or a weight that is not a finite positive number.
    """
    weight = dxo.get_meta_prop(AGGREGATION_WEIGHT_META_KEY)
    if weight is None:
        weight = dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND)
    if weight is None or not math.isfinite(weight) or weight <= 0:
        return None
    return float(weight)
