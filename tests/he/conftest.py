import pytest

from app_server.federation import prepare
from fedseg.packed_ckks import CkksKeys


@pytest.fixture(scope="session")
def provisioned(tmp_path_factory):
    """Real HE contexts from provisioning (NVFlare's HEBuilder), one federation per mode."""
    kits = {}
    for mode in ("packed", "stock"):
        federation = prepare(tmp_path_factory.mktemp(f"federation-{mode}"), 3, mode)
        kits[mode] = {
            "kits": federation.kits,
            "client": federation.kit("site-1") / "startup" / "client_context.tenseal",
            "client-2": federation.kit("site-2") / "startup" / "client_context.tenseal",
            "server": federation.kit("server") / "startup" / "server_context.tenseal",
        }
    return kits


@pytest.fixture(scope="session")
def packed_keys(provisioned):
    files = provisioned["packed"]
    return CkksKeys.from_file(files["client"]), CkksKeys.from_file(files["server"])
