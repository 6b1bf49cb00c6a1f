"""``python -m flute_vllm autotune`` without a GPU: the threshold choice from measured times, the
config it writes and that dispatch picks that config up (the timing itself needs CUDA)."""
import json

import pytest

from flute_vllm import autotune, cuda_op
from flute_vllm.cli import main as cli_main

MS = [16, 32, 64, 128, 256, 512]


def _times(lut, dense, tc=None):
    t = {"lut": dict(zip(MS, lut)), "dense": dict(zip(MS, dense))}
    if tc is not None:
        t["tc"] = dict(zip(MS, tc))
    return t


def test_thresholds_from_times():
    # lut wins small M, tc 64..128, dense from 256 on
    t = _times(lut=[10, 14, 30, 60, 120, 240], dense=[30, 30, 31, 33, 40, 60], tc=[20, 20, 22, 30, 45, 80])
    assert autotune.choose_thresholds(t) == {"dequant_min_m": 128, "tc_min_m": 64, "tc_max_m": 128}
    # no tensor-core path; dense beats lut at 32 but not at 64: only the run reaching the top counts
    t = _times(lut=[10, 14, 30, 60, 120, 240], dense=[30, 13, 31, 33, 40, 60])
    assert autotune.choose_thresholds(t) == {"dequant_min_m": 128, "tc_min_m": autotune.NEVER, "tc_max_m": 0}
    # tc never wins
    t = _times(lut=[10, 14, 30, 60, 120, 240], dense=[30, 30, 31, 33, 40, 60], tc=[99] * 6)
    assert autotune.choose_thresholds(t)["tc_min_m"] == autotune.NEVER
    # a tc win at M <= 32 does not start the path range (the per-layer tc_small rule covers it)
    t = _times(lut=[10, 24, 30, 60, 120, 240], dense=[30, 30, 31, 33, 40, 60], tc=[20, 20, 22, 30, 45, 80])
    assert autotune.choose_thresholds(t)["tc_min_m"] == 64


def test_wide_cta_threshold_from_times():
    # (4 warps, 8 warps) µs per N*K: wide wins from 58.7M up
    t = {16777216: (9.1, 9.7), 25165824: (11.9, 12.2), 58720256: (19.5, 18.9), 117440512: (33.4, 29.0),
         234881024: (55.2, 45.5)}
    assert autotune.choose_wide_min_nk(t) == 58720256
    # a win at a small size below a loss does not count: only the run reaching the largest size
    t[16777216] = (9.7, 9.1)
    t[117440512] = (29.0, 33.4)
    assert autotune.choose_wide_min_nk(t) == 234881024
    assert autotune.choose_wide_min_nk({1: (1.0, 2.0), 2: (1.0, 1.0)}) is None  # never (a tie is no win)
    cfg = autotune.config_for("GPU X", _times(lut=[10] * 6, dense=[30] * 6), {"wide": {1 << 26: (2.0, 1.0)}})
    assert cfg["lut_wide_cta_min_nk"] == 1 << 26 and cfg["measured_wide_us"] == {str(1 << 26): [2.0, 1.0]}
    assert "lut_wide_cta_min_nk" not in autotune.config_for("GPU X", _times(lut=[10] * 6, dense=[30] * 6))
    # null written by autotune overrides a shipped value (wide CTAs measured slower on this GPU)
    merged = cuda_op.resolve_config("NVIDIA H200", [*cuda_op._all_configs(),
                                                   {**autotune.config_for("NVIDIA H200", _times(lut=[10] * 6, dense=[30] * 6),
                                                                          {"wide": {1: (1.0, 2.0)}}), "_file": "/abs/tuned.json"}])
    assert merged["lut_wide_cta_min_nk"] is None


def test_x_ahead_range_and_mt4_threshold_from_times():
    # (best without x-ahead, 8 warps with it) at M = 1: the v13 H200 pattern, x-ahead wins up to
    # 70B down and loses on 70B gate_up
    t = {16777216: (8.9, 7.9), 25165824: (11.6, 9.9), 58720256: (16.5, 14.4), 117440512: (26.0, 25.5),
         234881024: (43.2, 41.5), 469762048: (85.0, 89.1)}
    assert autotune.choose_x_ahead_range(t) == (16777216, 234881024)
    # the longest run of wins counts (not an isolated one); equally long: the one reaching further
    t2 = {**t, 25165824: (9.9, 11.6)}
    assert autotune.choose_x_ahead_range(t2) == (58720256, 234881024)
    assert autotune.choose_x_ahead_range({1: (1.0, 2.0), 2: (3.0, 2.0), 3: (1.0, 2.0), 4: (3.0, 2.0)}) == (4, 4)
    assert autotune.choose_x_ahead_range({1: (1.0, 1.0)}) == (None, None)
    # (4 warps, 8 warps) at M = 32: wide wins from the smallest layer up to 70B o-sized layers
    mt4 = {16777216: (21.7, 15.9), 25165824: (20.6, 20.4), 67108864: (38.0, 37.7), 117440512: (67.6, 67.5),
           234881024: (99.9, 99.0), 469762048: (225.8, 226.0)}
    mt4[117440512] = (67.5, 67.6)
    assert autotune.choose_wide_mt4_max_nk(mt4) == 67108864
    assert autotune.choose_wide_mt4_max_nk({1: (1.0, 2.0), 2: (2.0, 1.0)}) is None
    # 2-bit (4 warps, 8 warps with the quad table) at M = 1, the v11 pattern: wide wins on large layers
    w2 = {16777216: (8.0, 9.0), 117440512: (29.3, 27.2), 234881024: (49.9, 43.1), 469762048: (91.2, 87.4)}
    cfg = autotune.config_for("GPU X", _times(lut=[10] * 6, dense=[30] * 6),
                              {"wide": {1 << 26: (2.0, 1.0)}, "x_ahead": t, "mt4": mt4, "w2_wide": w2})
    assert (cfg["lut_wide_cta_min_nk"], cfg["lut_x_ahead_min_nk"], cfg["lut_x_ahead_max_nk"],
            cfg["lut_wide_mt4_max_nk"], cfg["lut_w2_wide_min_nk"]) == (1 << 26, 16777216, 234881024, 67108864,
                                                                      117440512)
    assert cfg["measured_x_ahead_us"][str(469762048)] == [85.0, 89.1]
    # the tuned values drive dispatch: 70B gate_up stays without x-ahead, 70B down gets it
    merged = {**cuda_op.resolve_config("Some Other GPU", cuda_op._all_configs()), **cfg, "sm_count": 132}
    assert cuda_op.plan(1, 57344, 8192, merged, resident=3)["x_ahead"] == 0
    assert cuda_op.plan(1, 8192, 28672, merged, resident=2)["x_ahead"] == 1
    assert cuda_op.plan(1, 8192, 28672, merged, resident=2, bits=2)["warps"] == 8
    assert cuda_op.plan(1, 4096, 4096, merged, resident=5, bits=2)["warps"] == 4


def test_tc_small_rule_from_times(monkeypatch):
    # (LUT kernel, wgmma block_m 32) µs per N*K and M: the v14 H200 pattern (8B o, 8B gate_up, 70B down)
    t = {16777216: {17: (13.9, 13.8), 24: (14.5, 14.0), 32: (16.0, 15.3)},
         117440512: {17: (59.3, 54.9), 24: (62.6, 55.5), 32: (66.9, 56.2)},
         234881024: {17: (91.2, 96.0), 24: (94.0, 96.7), 32: (97.9, 98.5)}}
    assert autotune.choose_tc_small(t) == (17, 16777216)  # a net gain from the smallest layer up
    assert autotune.choose_tc_small({nk: {m: (a, 1.1 * a) for m, (a, _) in by_m.items()} for nk, by_m in t.items()}) \
        == (None, None)  # never wins
    t[234881024] = {17: (202.7, 202.7), 24: (212.9, 205.7), 32: (223.6, 208.9)}  # 70B gate_up instead
    assert autotune.choose_tc_small(t) == (17, 16777216)
    # the M edge: wins at 24 and 32 only (geo-mean over the layers from min_nk)
    t2 = {nk: {**by_m, 17: (by_m[17][0], 1.05 * by_m[17][0])} for nk, by_m in t.items()}
    assert autotune.choose_tc_small(t2) == (24, 16777216)
    # a small layer that loses moves min_nk up
    t3 = {**t, 16777216: {17: (13.0, 13.8), 24: (13.5, 14.0), 32: (14.0, 15.3)}}
    assert autotune.choose_tc_small(t3) == (17, 117440512)
    cfg = autotune.config_for("GPU X", _times(lut=[10] * 6, dense=[30] * 6), {"tc_small": t3})
    assert (cfg["tc_small_min_m"], cfg["tc_small_min_nk"]) == (17, 117440512)
    assert cfg["measured_tc_small_us"][str(16777216)]["24"] == [13.5, 14.0]
    # dispatch follows: large layers at M = 17-32 on the tensor-core path (block_m 32), small ones not
    monkeypatch.setattr(cuda_op, "tc_available", lambda dev: True)
    merged = {**cuda_op.resolve_config("Some Other GPU", cuda_op._all_configs()), **cfg, "sm_count": 132}
    f16 = cuda_op.torch.float16
    assert cuda_op.choose_path(24, f16, merged, 0, 28672, 4096) == "tc"
    assert cuda_op.choose_path(24, f16, merged, 0, 4096, 4096) == "lut"
    assert cuda_op.plan_tc(24, 28672, 4096, merged)["block_m"] == 32
    assert cuda_op.choose_path(24, f16, {**merged, "tc_small_min_nk": None}, 0, 28672, 4096) == "lut"


def test_tc_large_rule_from_times(monkeypatch):
    # (dequantize + cuBLAS, wgmma) µs per N*K and M: the v16 H200 full-plan pattern (8B o / qkv /
    # down / gate_up, 70B down / gate_up): wgmma wins from 8B down at M = 256, from 8B gate_up at 1024
    t = {16777216: {256: (27.7, 44.6), 1024: (58.7, 68.2)}, 25165824: {256: (39.6, 46.2), 1024: (87.5, 142.1)},
         58720256: {256: (88.7, 82.1), 1024: (205.9, 231.4)}, 117440512: {256: (173.3, 112.5), 1024: (433.8, 429.1)},
         234881024: {256: (335.3, 222.9), 1024: (951.6, 843.7)}, 469762048: {256: (648.6, 485.0), 1024: (1836.6, 1714.9)}}
    assert autotune.choose_tc_large(t) == [[58720256, 256], [117440512, 1024]]
    # a win on a small layer below a loss does not count; no win at an M: no entry for it
    t[16777216] = {256: (44.6, 27.7), 1024: (142.1, 87.5)}
    t[117440512] = {256: (173.3, 112.5), 1024: (429.1, 433.8)}
    assert autotune.choose_tc_large(t) == [[58720256, 256], [234881024, 1024]]
    assert autotune.choose_tc_large({1: {256: (1.0, 2.0)}}) == []
    mid = _times(lut=[10, 14, 30, 60, 120, 240], dense=[30, 30, 31, 33, 40, 60], tc=[20, 20, 22, 30, 45, 80])
    cfg = autotune.config_for("GPU X", mid, {"tc_large": t})  # tc path M = 64-128
    assert cfg["tc_large"] == [[58720256, 256], [234881024, 1024]]
    assert cfg["measured_tc_large_us"][str(58720256)]["1024"] == [205.9, 231.4]
    # dispatch follows (an empty list written by autotune overrides the shipped rule)
    monkeypatch.setattr(cuda_op, "tc_available", lambda dev: True)
    merged = {**cuda_op.resolve_config("NVIDIA H200", cuda_op._all_configs()), **cfg}
    f16 = cuda_op.torch.float16
    assert cuda_op.choose_path(256, f16, merged, 0, 4096, 14336) == "tc"
    assert cuda_op.choose_path(256, f16, merged, 0, 6144, 4096) == "dense"
    assert cuda_op.choose_path(1024, f16, merged, 0, 28672, 4096) == "dense"
    assert cuda_op.choose_path(1024, f16, merged, 0, 8192, 28672) == "tc"
    assert cuda_op.choose_path(256, f16, {**merged, "tc_large": []}, 0, 4096, 14336) == "dense"


def test_written_config_is_preferred_for_its_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("FLUTE_VLLM_CACHE", str(tmp_path))
    t = _times(lut=[10, 14, 30, 60, 120, 240], dense=[30, 30, 31, 33, 40, 60], tc=[20, 20, 22, 30, 45, 80])
    path = autotune.write_config(autotune.config_for("NVIDIA H100 80GB HBM3", t))
    assert path.parent == tmp_path / "configs" and json.loads(path.read_text())["tc_max_m"] == 128
    cuda_op._all_configs.cache_clear()
    try:
        cfgs = cuda_op._all_configs()
        chosen = cuda_op.match_config("NVIDIA H100 80GB HBM3", cfgs)
        assert chosen["_file"] == str(path) and chosen["tc_min_m"] == 64
        assert cuda_op.match_config("NVIDIA H200", cfgs)["_file"] == "h200.json"
        assert cuda_op.match_config("Some Other GPU", cfgs)["_file"] == "default.json"
        # the tuned thresholds overlay the shipped H100 file; knobs autotune does not measure stay
        shipped = json.loads((cuda_op.CONFIG_DIR / "h100.json").read_text())
        merged = cuda_op.resolve_config("NVIDIA H100 80GB HBM3", cfgs)
        assert merged["tc_min_m"] == 64 and merged["tc_max_m"] == 128 and merged["dequant_min_m"] == 128
        assert merged["tc_dense_max_nk"] == shipped["tc_dense_max_nk"] > 0
        assert merged["config_file"] == f"default.json+h100.json+{path}"
        assert cuda_op.resolve_config("Some Other GPU", cfgs)["config_file"] == "default.json"
    finally:
        cuda_op._all_configs.cache_clear()


def test_cli_autotune_without_a_gpu_fails_clearly(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(SystemExit, match="autotune needs a CUDA GPU"):
        cli_main(["autotune"])


def test_choose_path_by_m_dtype_and_layer_size(monkeypatch):
    cfg = {"tc_min_m": 33, "tc_max_m": 192, "dequant_min_m": 65, "tc_dense_max_nk": 4096 * 4096}
    monkeypatch.setattr(cuda_op, "tc_available", lambda dev: True)
    f16 = cuda_op.torch.float16
    assert cuda_op.choose_path(16, f16, cfg, 0, 28672, 4096) == "lut"
    assert cuda_op.choose_path(64, f16, cfg, 0, 28672, 4096) == "tc"
    assert cuda_op.choose_path(64, f16, cfg, 0, 4096, 2048) == "dense"  # small layer: cuBLAS wins
    assert cuda_op.choose_path(256, f16, cfg, 0, 28672, 4096) == "dense"
    assert cuda_op.choose_path(4, cuda_op.torch.float32, cfg, 0, 64, 64) == "dense"
    # large layers keep the wgmma path up to the max_m of their tc_large entries (when the config has the key)
    assert cuda_op.choose_path(256, f16, cfg, 0, 28672, 8192) == "dense"
    large = {**cfg, "tc_large": [[4096 * 14336, 256], [4096 * 28672, 1024]]}
    assert cuda_op.choose_path(256, f16, large, 0, 4096, 14336) == "tc"  # exactly the first threshold
    assert cuda_op.choose_path(257, f16, large, 0, 4096, 14336) == "dense"
    assert cuda_op.choose_path(1024, f16, large, 0, 28672, 4096) == "tc"  # exactly the second
    assert cuda_op.choose_path(1024, f16, large, 0, 28672, 8192) == "tc"
    assert cuda_op.choose_path(1025, f16, large, 0, 28672, 8192) == "dense"
    assert cuda_op.choose_path(512, f16, large, 0, 10240, 8192) == "dense"  # 80 Mi: the first entry only
    assert cuda_op.choose_path(256, f16, large, 0, 6144, 4096) == "dense"  # smaller layer
    assert cuda_op.choose_path(256, f16, large, 0, None, None) == "dense"  # shape unknown
    assert cuda_op.choose_path(16, f16, large, 0, 28672, 8192) == "lut"
    assert cuda_op.choose_path(256, f16, {**large, "tc_large": None}, 0, 28672, 8192) == "dense"
    # decode sizes below tc_min_m: the wgmma kernel from tc_small_min_m for layers >= tc_small_min_nk
    small = {**cfg, "tc_small_min_m": 17, "tc_small_min_nk": 4096 * 4096}
    assert cuda_op.choose_path(17, f16, small, 0, 4096, 4096) == "tc"  # the dense rule starts at tc_min_m
    assert cuda_op.choose_path(32, f16, small, 0, 28672, 4096) == "tc"
    assert cuda_op.choose_path(16, f16, small, 0, 28672, 4096) == "lut"
    assert cuda_op.choose_path(32, f16, small, 0, 4096, 2048) == "lut"  # smaller layer
    assert cuda_op.choose_path(32, f16, small, 0, None, None) == "lut"  # shape unknown
    assert cuda_op.choose_path(32, f16, cfg, 0, 28672, 4096) == "lut"  # keys absent
    monkeypatch.setattr(cuda_op, "tc_available", lambda dev: False)  # not Hopper
    assert cuda_op.choose_path(32, f16, small, 0, 28672, 4096) == "lut"
    assert cuda_op.choose_path(64, f16, cfg, 0, 28672, 4096) == "lut"
    assert cuda_op.choose_path(65, f16, cfg, 0, 28672, 4096) == "dense"
