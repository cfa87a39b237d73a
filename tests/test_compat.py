import importlib

import torch


def test_torchvision_imports_next_to_this_torch():
    from lit_nas import _torchvision_compat as compat

    tv = importlib.import_module("torchvision")
    assert hasattr(tv, "datasets")
    # after lit_nas is imported the operators are defined (by torchvision itself or by the shim) ...
    assert torch._C._jit_get_schemas_for_operator("torchvision::nms")
    # ... so nothing is left to patch, and applying again is a no-op
    assert not compat.needs_patch()
    assert compat.apply() is False
