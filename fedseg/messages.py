"""Keys of what sites and server exchange besides model weights (shared by both sides)."""

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
