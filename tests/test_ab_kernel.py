"""benchmarks/ab_kernel.py without a GPU: variant parsing, the summary table, and that the
experiment flags reach the build key (so variants build side by side, never reuse each other)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import ab_kernel  # noqa: E402

from flute_vllm import _build  # noqa: E402


def test_parse_variant():
    assert ab_kernel.parse_variant("base=") == ("base", "")
    assert ab_kernel.parse_variant("s8=-DFLUTE_LUT_STAGES=8 -DX=1") == ("s8", "-DFLUTE_LUT_STAGES=8 -DX=1")
    assert ab_kernel.parse_variant("w4@8=-DX=1") == ("w4@8", "-DX=1")
    assert ab_kernel.parse_variant("xa@8,xa1=") == ("xa@8,xa1", "")
    for bad in ("noequals", "=-DX", "a b=-DX", "w@6=-DX", "@8=-DX", "w@=-DX", "w@8,xa2=", "w@8,=-DX"):
        with pytest.raises(ValueError, match="NAME=FLAGS"):
            ab_kernel.parse_variant(bad)


def test_variant_launch_options():
    """The @ suffix overrides --warps / --x-ahead / --path / --block-m / --k-slices / --stream-k for that
    variant only."""
    import argparse
    args = argparse.Namespace(warps=4, x_ahead=-1, path="lut", block_m=0, k_slices=0, stream_k=-1)
    base = ["--warps", "4", "--x-ahead", "-1", "--path", "lut", "--block-m", "0", "--k-slices", "0", "--stream-k", "-1"]
    assert ab_kernel.variant_args("base", args) == base
    assert ab_kernel.variant_args("w@8", args) == ["--warps", "8", *base[2:]]
    assert ab_kernel.variant_args("w@xa1,8", args) == ["--warps", "8", "--x-ahead", "1", *base[4:]]
    assert ab_kernel.variant_args("w@xa0", args) == ["--warps", "4", "--x-ahead", "0", *base[4:]]
    assert ab_kernel.variant_args("t@tc,bm32", args) == [*base[:4], "--path", "tc", "--block-m", "32", *base[8:]]
    assert ab_kernel.variant_args("k@ks8,8", args) == ["--warps", "8", *base[2:8], "--k-slices", "8", *base[10:]]
    assert ab_kernel.variant_args("s@tc,sk1", args) == [*base[:4], "--path", "tc", *base[6:10], "--stream-k", "1"]
    assert ab_kernel.parse_variant("t@tc,bm16=") == ("t@tc,bm16", "")
    with pytest.raises(ValueError, match="NAME=FLAGS"):
        ab_kernel.parse_variant("t@tc,bm24=")


def _rec(shape, m, us, cublas, flags="", err=1e-3):
    return dict(shape=shape, M=m, us=us, cublas_us=cublas, flags=flags, rel_err=err)


def test_summary_ratios_and_wrong_variants():
    res = {
        "base": [_rec("8B-o", 1, 10.0, 20.0), _rec("8B-o", 16, 20.0, 20.0)],
        "fast": [_rec("8B-o", 1, 5.0, 20.0, "-DA=1"), _rec("8B-o", 16, 20.0, 20.0, "-DA=1")],
        "bad": [_rec("8B-o", 1, 1.0, 20.0, "-DB=1", err=0.5)],
    }
    md = ab_kernel.summarize(res)
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    # fast: times 0.5 and 1.0 of base -> geo-mean 0.707; vs cuBLAS 4x and 1x -> 2x
    assert "| 0.707 | 2.00x |" in rows["fast"] and "WRONG" not in rows["fast"]
    assert "| 1.000 |" in rows["base"]
    assert "WRONG" in rows["bad"]
    assert "| 8B-o | 1 | 20.0 | 10.0 | 5.0 | 1.0 |" in md


def test_experiment_flags_change_the_build_key(monkeypatch):
    monkeypatch.delenv("FLUTE_VLLM_NVCC_FLAGS", raising=False)
    shipped = _build.source_digest()
    assert _build.nvcc_flags() == _build.NVCC_FLAGS
    monkeypatch.setenv("FLUTE_VLLM_NVCC_FLAGS", "-DFLUTE_LUT_STAGES=8")
    assert _build.nvcc_flags()[-1] == "-DFLUTE_LUT_STAGES=8"
    assert _build.source_digest() != shipped


def test_variant_kernel_sources(tmp_path):
    """``--src=DIR`` in a variant's flags: stripped from the nvcc flags, resolved against the repo; the
    build reads $FLUTE_VLLM_KERNEL_DIR, so another tree's kernels get their own build key."""
    import subprocess

    assert ab_kernel.split_src("-DX=1") == ("-DX=1", "")
    flags, src = ab_kernel.split_src("--src=out/v17 -DX=1")
    assert flags == "-DX=1" and src == str(ab_kernel.ROOT / "out" / "v17")
    for bad in ("--src= -DX=1", "--src=a --src=b"):
        with pytest.raises(ValueError, match="--src"):
            ab_kernel.split_src(bad)
    for name in (*_build.SOURCES, *_build.HEADERS):
        (tmp_path / name).write_bytes((_build.KERNEL_DIR / name).read_bytes())
    (tmp_path / "flute_gemm.cu").write_bytes((_build.KERNEL_DIR / "flute_gemm.cu").read_bytes() + b"// changed\n")
    code = "from flute_vllm import _build; print(_build.KERNEL_DIR); print(_build.source_digest())"
    env = {k: v for k, v in os.environ.items() if k not in ("FLUTE_VLLM_KERNEL_DIR", "FLUTE_VLLM_NVCC_FLAGS")}
    here = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    there = subprocess.run([sys.executable, "-c", code], env={**env, "FLUTE_VLLM_KERNEL_DIR": str(tmp_path)},
                           capture_output=True, text=True, check=True)
    assert there.stdout.split()[0] == str(tmp_path) and here.stdout.split()[0] == str(_build.KERNEL_DIR)
    assert there.stdout.split()[1] != here.stdout.split()[1]
