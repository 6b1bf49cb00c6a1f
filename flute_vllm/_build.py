"""Build the CUDA extension from ``kernels/`` (JIT on first use, cached; the same code path is the AOT build).

- JIT: :func:`load` compiles with ``torch.utils.cpp_extension.load`` into
  ``$FLUTE_VLLM_CACHE`` (default ``~/.cache/flute_vllm``)``/build/<key>``, where ``key`` hashes the
  kernel sources, the flags, the CUDA arch list and the torch version: editing a source rebuilds,
  an unchanged tree reuses the cached module (no compiler run).
- AOT (e.g. in a Dockerfile): ``python -m flute_vllm._build --arch 80,86,89,90a`` builds the same
  module for those archs into the same cache; at run time :func:`load` reuses any cached build whose
  arch list covers the current GPU, so a serving image never compiles.
- Kernel experiments: ``FLUTE_VLLM_NVCC_FLAGS`` (e.g. ``"-DFLUTE_LUT_STAGES=8"``) is appended to the
  nvcc and host compiler flags and hashed into the cache key, so variants of the kernels build side by side
  (``benchmarks/ab_kernel.py`` A/B-times them). Unset for normal use.
- Arch selection at run time: ``FLUTE_VLLM_CUDA_ARCHS`` (``"80,90a"``) if set, else a cached build
  that covers the device, else the device's own arch (``90a`` on Hopper: the kernels use only sm_80
  instructions, but 90a is what we tune and test).

The kernels use raw ``mma.sync`` PTX and need no CUTLASS/CuTe headers; if the ``nvidia-cutlass`` wheel
is installed its include directory is added to the include path anyway (``cutlass_include_dir``), so
later kernels can use CuTe without changing the build.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
import threading
from pathlib import Path
from typing import Optional, Sequence

# $FLUTE_VLLM_KERNEL_DIR: build another copy of kernels/ (benchmarks/ab_kernel.py's `--src=DIR` variants,
# to time a restructured kernel against the shipped one in one session; the key hashes its contents).
KERNEL_DIR = Path(os.environ.get("FLUTE_VLLM_KERNEL_DIR") or Path(__file__).resolve().parent.parent / "kernels")
SOURCES = ("flute_gemm.cu", "flute_wgmma.cu", "torch_binding.cpp")
HEADERS = ("flute_kernel.h", "flute_device.cuh", "flute_dispatch.h")
MODULE_PREFIX = "flute_vllm_C"
NVCC_FLAGS = ("-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo")
CXX_FLAGS = ("-O3", "-std=c++17")

_lock = threading.Lock()
_module = None


def cache_root() -> Path:
    return Path(os.environ.get("FLUTE_VLLM_CACHE", Path.home() / ".cache" / "flute_vllm"))


def cutlass_include_dir() -> Optional[str]:
    """The CUTLASS/CuTe include dir of the ``nvidia-cutlass`` wheel, or None if it is not installed."""
    try:
        import cutlass_library  # type: ignore
    except ImportError:
        return None
    inc = Path(cutlass_library.__file__).resolve().parent / "source" / "include"
    return str(inc) if inc.is_dir() else None


def parse_archs(spec: str | Sequence[str]) -> list[str]:
    """``"80,86,9.0a"`` -> ``["80", "86", "90a"]``."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for item in items:
        a = item.strip().replace(".", "").replace("sm_", "")
        if not a:
            continue
        if not (a[:2].isdigit() and a[2:] in ("", "a")):
            raise ValueError(f"bad CUDA arch {item!r}: use e.g. 80, 86, 89, 90a")
        out.append(a)
    if not out:
        raise ValueError(f"no CUDA arch in {spec!r}")
    return sorted(set(out))


def device_arch(device=None) -> str:
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}{minor}" + ("a" if (major, minor) == (9, 0) else "")


def _covers(archs: Sequence[str], want: str) -> bool:
    return want in archs or want.rstrip("a") in archs


def _torch_arch_list(archs: Sequence[str]) -> str:
    return ";".join(f"{a[0]}.{a[1:]}" for a in archs)


def nvcc_flags() -> tuple[str, ...]:
    """The nvcc flags of a build: ``NVCC_FLAGS`` + ``$FLUTE_VLLM_NVCC_FLAGS`` (kernel experiments)."""
    return NVCC_FLAGS + tuple(shlex.split(os.environ.get("FLUTE_VLLM_NVCC_FLAGS", "")))


def source_digest() -> str:
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode())
        h.update((KERNEL_DIR / name).read_bytes())
    h.update(repr((nvcc_flags(), CXX_FLAGS)).encode())
    return h.hexdigest()[:12]


def _key(archs: Sequence[str]) -> str:
    import torch

    h = hashlib.sha256(f"{source_digest()}|{','.join(archs)}|{torch.__version__}|{torch.version.cuda}".encode())
    return f"{source_digest()}-{h.hexdigest()[:8]}"


def _cached_archs_for(want: str) -> Optional[list[str]]:
    """Arch list of an existing cached build of these sources that covers ``want``."""
    root = cache_root() / "build"
    if not root.is_dir():
        return None
    digest = source_digest()
    for d in sorted(root.glob(f"{digest}-*")):
        manifest = d / "manifest.json"
        try:
            info = json.loads(manifest.read_text())
        except (OSError, ValueError):
            continue
        if info.get("complete") and _covers(info.get("archs", []), want) and d.name == _key(info["archs"]):
            return list(info["archs"])
    return None


def build(archs: Sequence[str], verbose: bool = False):
    """Compile (or reuse) the extension for ``archs``; returns the loaded Python module."""
    import torch
    from torch.utils import cpp_extension

    archs = parse_archs(archs)
    for name in SOURCES + HEADERS:
        if not (KERNEL_DIR / name).is_file():
            raise FileNotFoundError(f"flute_vllm: kernel source {KERNEL_DIR / name} is missing")
    key = _key(archs)
    build_dir = cache_root() / "build" / key
    build_dir.mkdir(parents=True, exist_ok=True)
    include = [str(KERNEL_DIR)]
    cutlass = cutlass_include_dir()
    if cutlass:
        include.append(cutlass)
    old = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = _torch_arch_list(archs)
    try:
        module = cpp_extension.load(
            name=f"{MODULE_PREFIX}_{key.replace('-', '_')}",
            sources=[str(KERNEL_DIR / s) for s in SOURCES],
            extra_cflags=list(CXX_FLAGS) + list(nvcc_flags()[len(NVCC_FLAGS):]),  # the knobs reach the binding too
            extra_cuda_cflags=list(nvcc_flags()),
            extra_include_paths=include,
            build_directory=str(build_dir),
            verbose=verbose,
        )
    finally:
        if old is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = old
    (build_dir / "manifest.json").write_text(
        json.dumps({"archs": archs, "torch": torch.__version__, "cuda": torch.version.cuda, "complete": True})
    )
    return module


def load(verbose: bool = False):
    """The compiled extension for the current device (built on first use, then cached)."""
    global _module
    if _module is not None:
        return _module
    with _lock:
        if _module is None:
            env = os.environ.get("FLUTE_VLLM_CUDA_ARCHS")
            if env:
                archs = parse_archs(env)
            else:
                want = device_arch()
                archs = _cached_archs_for(want) or [want]
            _module = build(archs, verbose=verbose)
    return _module


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="Build flute_vllm's CUDA kernels ahead of time.")
    ap.add_argument("--arch", default=os.environ.get("FLUTE_VLLM_CUDA_ARCHS", "80,86,89,90a"),
                    help="comma-separated CUDA archs, e.g. 80,86,89,90a")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    archs = parse_archs(args.arch)
    build(archs, verbose=args.verbose)
    print(f"flute_vllm: built kernels for {','.join(archs)} in {cache_root() / 'build' / _key(archs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
