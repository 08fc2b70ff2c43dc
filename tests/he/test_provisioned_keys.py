"""A site's HE context is read from its signed startup kit; a swapped context is refused."""

import shutil

import pytest
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.fuel.sec.security_content_service import (
    SecurityContentManager,
    SecurityContentService,
)

from fedseg.he_context import CLIENT_CONTEXT_FILE, load_provisioned_keys
from fedseg.packed_ckks import PackedCkksError


@pytest.fixture
def kit_reader():
    saved = SecurityContentService.security_content_manager

    def read(startup):
        SecurityContentService.security_content_manager = SecurityContentManager(str(startup))
        fl_ctx = FLContext()
        fl_ctx.set_prop(FLContextKey.SECURE_MODE, True, private=True, sticky=False)
        return load_provisioned_keys(CLIENT_CONTEXT_FILE, fl_ctx)

    yield read
    SecurityContentService.security_content_manager = saved


def test_a_context_from_another_provisioning_is_refused(provisioned, tmp_path, kit_reader):
    genuine = provisioned["packed"]["client"].parent
    assert kit_reader(genuine).can_decrypt
    swapped = tmp_path / "startup"
    shutil.copytree(genuine, swapped)
    shutil.copyfile(provisioned["stock"]["client"], swapped / CLIENT_CONTEXT_FILE)
    with pytest.raises(PackedCkksError, match=r"cannot load client_context.tenseal .*SIGNATURE"):
        kit_reader(swapped)
    (swapped / CLIENT_CONTEXT_FILE).unlink()
    with pytest.raises(PackedCkksError, match="provision the federation with NVFlare's HEBuilder"):
        kit_reader(swapped)
