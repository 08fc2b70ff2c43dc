"""Loading a participant's provisioned HE context inside NVFlare (sites and server alike)."""

from __future__ import annotations

from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.fuel.sec.security_content_service import LoadResult, SecurityContentService

from fedseg.packed_ckks import CkksKeys, PackedCkksError

#: Where provisioning (NVFlare's HEBuilder) puts the contexts in the startup kits.
CLIENT_CONTEXT_FILE = "client_context.tenseal"
SERVER_CONTEXT_FILE = "server_context.tenseal"


def load_provisioned_keys(file_name: str, fl_ctx: FLContext) -> CkksKeys:
    """Reads this participant's TenSEAL context from its startup kit.

    In secure mode (provisioned kits) the file must carry a valid signature, so a context
    swapped after provisioning is refused.

    Args:
        file_name: ``client_context.tenseal`` or ``server_context.tenseal``.
        fl_ctx: The FL context.

    Returns:
        The keys.

    Raises:
        PackedCkksError: If the file is missing, unsigned or its signature is invalid.
    """
    secure = fl_ctx.get_prop(FLContextKey.SECURE_MODE, True)
    data, result = SecurityContentService.load_content(file_name)
    refused = [LoadResult.INVALID_CONTENT, LoadResult.NO_SUCH_CONTENT]
    if secure:
        refused += [LoadResult.INVALID_SIGNATURE, LoadResult.NOT_SIGNED]
    if result in refused:
        raise PackedCkksError(
            f"cannot load {file_name} from the startup kit ({result}): provision the "
            "federation with NVFlare's HEBuilder (fedseg poc prepare does)"
        )
    return CkksKeys(data)
