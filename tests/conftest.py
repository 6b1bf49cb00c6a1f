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


@pytest.fixture(scope="session")
def smollm2_dense(cache_dir):
    from flute_vllm.demo import smollm2

    return smollm2(os.path.join(cache_dir, "smollm2-dense"))


@pytest.fixture(scope="session")
def smollm2_w4g64(smollm2_dense, tmp_path_factory):
    """SmolLM2 quantized NF4 W4G64 by the CLI (fresh for each test session)."""
    import subprocess
    import sys

    quant = str(tmp_path_factory.mktemp("smollm2-nf4-g64"))
    subprocess.run([sys.executable, "-m", "flute_vllm", "quantize", smollm2_dense, quant, "--num-bits", "4",
                    "--group-size", "64", "--table", "nf"], check=True)
    return quant
