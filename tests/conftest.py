import os

import pytest
import torch

# Keep CPU tests deterministic and light on the 2-core CI box.
torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cache_dir():
    from flute_vllm.demo import cache_dir

    return cache_dir()
