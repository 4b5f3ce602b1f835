import pytest
import torch


def pytest_collection_modifyitems(config, items):
    # CUDA tests run only where there is a device and miras_ext was built with its CUDA backend.
    import miras_ext

    reason = None
    if not torch.cuda.is_available():
        reason = "no CUDA device"
    elif "cuda" not in miras_ext.build_info()["backends"]:
        reason = "miras_ext was built without CUDA"
    if reason:
        skip = pytest.mark.skip(reason=reason)
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)
