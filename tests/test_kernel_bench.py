"""benchmarks/kernel.py + benchmarks/humming_int4.py on the CPU: the humming-kernels baseline (int4 packing and dequantization it
feeds humming, the interval choice, the plans, the markdown table, the correctness gate). The GPU part
(humming's conversion and kernels) runs only with a CUDA GPU and the humming package."""
import importlib
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import humming_int4 as hb  # noqa: E402
import kernel  # noqa: E402


def _pack_reference(codes):
    """Straightforward packing: word w of a row = sum_j code[8w + j] << 4j, as a signed int32."""
    n, k = codes.shape
    out = torch.empty(n, k // 8, dtype=torch.int32)
    for r in range(n):
        for w in range(k // 8):
            v = sum(int(codes[r, 8 * w + j]) << (4 * j) for j in range(8))
            out[r, w] = v - (1 << 32) if v >= 1 << 31 else v
    return out


def test_pack_int4_matches_a_reference_and_humming_bit_order():
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8, generator=g)
    assert torch.equal(hb.pack_int4(codes), _pack_reference(codes))
    # code k of a row at bits 4*(k%8) of word k//8 (humming's pack_weight, GPTQ / compressed-tensors order)
    row = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 15, 15, 15, 15, 15, 15, 15, 15]], dtype=torch.uint8)
    assert hb.pack_int4(row).tolist() == [[0x76543210, -1]]
    assert hb.pack_int4(codes, rows=2).equal(hb.pack_int4(codes))  # row chunks change nothing


def test_unpack_int4_inverts_pack():
    codes = torch.randint(0, 16, (7, 128), dtype=torch.uint8)
    packed = hb.pack_int4(codes)
    assert packed.shape == (7, 16) and packed.dtype == torch.int32
    assert torch.equal(hb.unpack_int4(packed), codes)


@pytest.mark.parametrize("g", [64, 128])
def test_dequant_int4_is_symmetric_code_minus_8_times_group_scale(g):
    n, k = 3, 256
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scales = (torch.rand(n, k // g) * 0.02 + 0.005).to(torch.bfloat16)
    w = hb.dequant_int4(codes, scales, g)
    assert w.dtype == torch.float32
    for r in range(n):
        for c in (0, g - 1, g, k - 1):
            assert w[r, c].item() == pytest.approx((int(codes[r, c]) - 8) * scales[r, c // g].float().item())
    assert hb.dequant_int4(torch.full((1, g), 8, dtype=torch.uint8), scales[:1, :1], g).abs().max() == 0


def test_quant_config_is_vllms_symmetric_int4():
    assert hb.humming_quant_config(64) == {"quant_method": "humming", "dtype": "int4", "group_size": 64,
                                               "has_zero_point": False}


def test_select_intervals_keeps_the_entries_holding_each_m():
    iv = [[0, 8, "a"], [8, 16, "b"], [16, 64, "c"], [64, 256, "d"], [256, 1 << 30, "e"]]
    # the launcher runs entry (lo, hi] for lo < M <= hi
    assert [e[2] for e in hb.select_intervals(iv, (1, 8))] == ["a"]
    assert [e[2] for e in hb.select_intervals(iv, (1, 16, 64, 8192))] == ["a", "b", "c", "e"]
    assert [e[2] for e in hb.select_intervals(iv, (9, 65))] == ["b", "d"]
    with pytest.raises(ValueError, match="M=\\[0\\]"):
        hb.select_intervals(iv, (0, 1))


def test_humming_ms_adds_the_check_m_and_m1():
    assert hb.humming_ms((64, 4096)) == (1, hb.HUMMING_CHECK_M, 64, 4096)
    assert hb.humming_ms(kernel.MS) == kernel.MS


@pytest.mark.parametrize("plan", ["core", "full"])
def test_humming_runs_in_every_fp16_bf16_w4_job_and_nowhere_else(plan):
    jobs = kernel.plan_jobs(plan)
    w4 = {(dt, g): ks for dt, b, g, ms, ks in jobs if b == 4}
    assert set(w4) >= {(torch.float16, 128), (torch.bfloat16, 128), (torch.float16, 64)}
    for dt, b, g, ms, ks in jobs:
        assert ("humming" in ks) == (b == 4 and dt in (torch.float16, torch.bfloat16)), (dt, b, g, ks)
    # same M values as the other kernels of the job (nothing extra)
    cases = kernel.humming_cases(jobs, ["8B-qkv", "70B-down/tp2"])
    assert set(cases) == {(n, k, g, dt) for n, k in (kernel.SHAPES["8B-qkv"], kernel.SHAPES["70B-down/tp2"])
                          for dt, g in ((torch.float16, 128), (torch.bfloat16, 128), (torch.float16, 64))}
    assert cases[(6144, 4096, 128, torch.bfloat16)] == kernel.MS
    assert cases[(6144, 4096, 64, torch.float16)] == (1, 16, 64)


def test_quick_plan_has_no_humming():
    assert all("humming" not in ks for *_, ks in kernel.plan_jobs("quick"))
    assert kernel.humming_cases(kernel.plan_jobs("quick"), list(kernel.SHAPES)) == {}


def _rec(kern, m, us, base):
    return dict(gpu="GPU", dtype="bfloat16", bits=4, group_size=128, shape="8B-qkv", N=6144, K=4096, M=m, kernel=kern,
                us=us, speedup_vs_cublas=None if kern == "cublas" else round(base / us, 3), roofline_frac=None,
                floor_frac=None)


def test_markdown_shows_a_humming_row_next_to_tinygemm(tmp_path):
    recs = []
    for m, base in ((1, 20.0), (16, 22.0)):
        recs += [_rec("cublas", m, base, base), _rec("tinygemm", m, 15.0, base), _rec("humming", m, 8.0, base),
                 _rec("flute", m, 7.0, base)]
    kernel.write_markdown(recs, tmp_path / "t.md", "GPU")
    lines = (tmp_path / "t.md").read_text().splitlines()
    rows = [ln for ln in lines if ln.startswith("| 8B-qkv |")]
    kerns = [ln.split("|")[4].strip() for ln in rows]
    assert kerns == ["cublas", "tinygemm", "humming", "flute"]
    hum = rows[kerns.index("humming")]
    assert "8.0 (2.50x)" in hum and "8.0 (2.75x)" in hum
    assert any("`humming`" in ln for ln in lines)  # the kernel is described in the header
    assert not any("No humming-kernels rows" in ln for ln in lines)
    # the summary has humming's geo-mean next to ours: 8B-qkv M=1 20/8 = 2.50x, ours 20/7
    summary = {ln.split("|")[5].strip(): ln for ln in lines if ln.startswith("| bfloat16 | 4 | 128 | all |")}
    assert "| 2.86x |" in summary["flute"] and "| 2.50x |" in summary["humming"]


def test_markdown_reports_the_8b_layer_sum(tmp_path):
    recs = []
    for i, shape in enumerate(("8B-qkv", "8B-o", "8B-gate_up", "8B-down")):
        for kern, us in (("cublas", 20.0 + i), ("flute", 10.0 + i), ("flute_tc", 5.0 + i), ("humming", 8.0)):
            recs.append({**_rec(kern, 1, us, 20.0 + i), "shape": shape})
    kernel.write_markdown(recs, tmp_path / "t.md", "GPU")
    line = next(ln for ln in (tmp_path / "t.md").read_text().splitlines() if ln.startswith("8B layer sum"))
    # ours: the best of our paths per layer (5+6+7+8); cuBLAS 20+21+22+23; humming 4 x 8
    assert "flute 26.0" in line and "cublas 86.0" in line and "humming 32.0" in line


def test_markdown_has_no_humming_row_without_records(tmp_path):
    recs = [_rec("cublas", 1, 20.0, 20.0), _rec("flute", 1, 7.0, 20.0)]
    kernel.write_markdown(recs, tmp_path / "t.md", "GPU")
    text = (tmp_path / "t.md").read_text()
    assert not [ln for ln in text.splitlines() if "| humming |" in ln]
    assert "No humming-kernels rows in this run" in text  # says so instead of leaving the reader to notice


class _FakeLayer:
    made = []

    def __init__(self, n, k, g, dtype, ms):
        self.nbytes = n * k // 2
        self.copies = [None]
        _FakeLayer.made.append(self)

    def rel_error(self):
        return self.err

    def make_copies(self, r):
        self.copies = [None] * r


@pytest.fixture
def fake_humming(monkeypatch):
    monkeypatch.setattr(hb, "humming_state", {"error": None})
    monkeypatch.setattr(hb, "copies_for", lambda nbytes: 3)
    monkeypatch.setattr(hb, "HummingLayer", _FakeLayer)
    _FakeLayer.made = []
    return _FakeLayer


@pytest.mark.parametrize("err, timed", [(1e-3, True), (0.05, False), (float("nan"), False)])
def test_setup_times_only_a_layer_that_matches_the_float32_reference(fake_humming, monkeypatch, capsys, err, timed):
    monkeypatch.setattr(fake_humming, "err", err, raising=False)
    hl = hb.humming_setup("8B-o", 4096, 4096, 128, torch.float16, (1, 16))
    out = capsys.readouterr().out
    if timed:
        assert hl is fake_humming.made[0] and len(hl.copies) == 3 and out == ""
    else:
        assert hl is None and "humming skipped for 8B-o float16 g128" in out and "limit 0.02" in out


def test_setup_reports_a_failure_and_goes_on(fake_humming, monkeypatch, capsys):
    def boom(self):
        raise RuntimeError("no kernel")
    monkeypatch.setattr(fake_humming, "rel_error", boom)
    assert hb.humming_setup("8B-o", 4096, 4096, 128, torch.float16, (1,)) is None
    assert capsys.readouterr().out.strip() == "humming unavailable: RuntimeError: no kernel"


def test_missing_package_is_reported_once(monkeypatch, capsys):
    monkeypatch.setattr(hb, "humming_state", {"error": "ModuleNotFoundError: No module named 'humming'"})
    assert hb.humming_setup("8B-o", 4096, 4096, 128, torch.float16, (1,)) is None
    assert hb.humming_setup("8B-qkv", 6144, 4096, 128, torch.float16, (1,)) is None
    assert capsys.readouterr().out.strip() == "humming unavailable: ModuleNotFoundError: No module named 'humming'"


def test_run_without_the_package_reports_once_and_compiles_nothing(monkeypatch, capsys):
    monkeypatch.setattr(hb, "humming_state", {"error": "ModuleNotFoundError: No module named 'humming'"})
    monkeypatch.setattr(hb, "humming_precompile", lambda cases: pytest.fail("must not compile without the package"))
    hb.humming_prepare_run({(4096, 4096, 128, torch.float16): (1, 16)})
    assert hb.humming_setup("8B-o", 4096, 4096, 128, torch.float16, (1,)) is None
    assert capsys.readouterr().out.strip() == "humming unavailable: ModuleNotFoundError: No module named 'humming'"
    hb.humming_prepare_run({})  # nothing to time: not even an import attempt
    assert capsys.readouterr().out == ""


def test_import_error_names_the_reason(monkeypatch):
    monkeypatch.setattr(hb, "humming_state", {})
    monkeypatch.setitem(sys.modules, "humming", None)  # import of humming raises ImportError
    assert hb.humming_import_error().startswith(("ModuleNotFoundError", "ImportError"))


def _humming_importable():
    try:
        importlib.import_module("humming.forward")
        return True
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
@pytest.mark.skipif(not _humming_importable(), reason="needs the humming package (pip humming-kernels)")
@pytest.mark.parametrize("dtype, g", [(torch.float16, 128), (torch.bfloat16, 128), (torch.float16, 64)])
def test_humming_layer_matches_float32_reference_on_gpu(dtype, g):
    hl = hb.HummingLayer(1024, 2048, g, dtype, (1, 16, 64))
    assert hl.rel_error() < hb.HUMMING_MAX_REL_ERR
    hl.make_copies(2)
    x = torch.randn(64, 2048, device="cuda").to(dtype)
    y0, y1 = hl.forward(x, 0), hl.forward(x, 1)
    assert y0.shape == (64, 1024) and y0.dtype == dtype
    torch.testing.assert_close(y0, y1, rtol=1e-2, atol=1e-2)  # the copies hold the same layer
    assert kernel.time_graph([lambda i=i: hl.forward(x, i) for i in range(2)], 20) > 0


def test_resume_runs_only_the_missing_shape_jobs_and_writes_after_each(tmp_path, monkeypatch):
    """--resume keeps the records already in <out>/<gpu>.json and benchmarks only the (job, shape)
    pairs they lack; records are on disk after every shape (a time-limited run keeps its work)."""
    import json

    calls = []

    def fake_bench(name, n, k, dtype, bits, g, ms, kernels, records, gpu):
        calls.append((name, bits))
        # the previous shapes' records are already written when the next shape starts
        on_disk = json.loads((tmp_path / "GPU_X.json").read_text()) if (tmp_path / "GPU_X.json").exists() else []
        assert len(on_disk) == len(records)
        records.append(dict(gpu=gpu, dtype=str(dtype).split(".")[-1], bits=bits, group_size=g, shape=name, N=n, K=k,
                            M=1, kernel="cublas", us=1.0, speedup_vs_cublas=None, roofline_frac=None, floor_frac=None))

    monkeypatch.setattr(kernel, "bench_shape", fake_bench)
    monkeypatch.setattr(kernel, "gpu_name", lambda: "GPU X")
    monkeypatch.setattr(kernel, "measure_read_bw", lambda: 1e12)
    monkeypatch.setattr(kernel, "humming_prepare_run", lambda cases: None)
    args = ["--plan", "quick", "--shapes", "8B-qkv,8B-o", "--out", str(tmp_path)]
    kernel.main(args)
    assert calls == [("8B-qkv", 4), ("8B-o", 4)]
    data = json.loads((tmp_path / "GPU_X.json").read_text())
    (tmp_path / "GPU_X.json").write_text(json.dumps([r for r in data if r["shape"] == "8B-qkv"]))
    calls.clear()
    kernel.main(args + ["--resume"])
    assert calls == [("8B-o", 4)]
    assert sorted(r["shape"] for r in json.loads((tmp_path / "GPU_X.json").read_text())) == ["8B-o", "8B-qkv"]
    calls.clear()
    kernel.main(args)  # without --resume: everything again, from an empty record list
    assert len(calls) == 2 and len(json.loads((tmp_path / "GPU_X.json").read_text())) == 2


def _stub_tune_gpu(monkeypatch, cfg: dict) -> list:
    """The --tune* sweeps without a GPU: weight copies, gemm calls (recorded: the returned list gets
    each call's options) and the graph timer (a stand-in time) replaced."""
    calls = []

    class FakeLayer:
        def __init__(self, n, k, bits, g, dtype):
            self.copies = [("q", "s", "t")]

    def fake_time_graph(fns, iters):
        for f in fns:
            f()
        return 10.0 + len(calls)

    monkeypatch.setattr(kernel, "Layer", FakeLayer)
    monkeypatch.setattr(kernel, "time_graph", fake_time_graph)
    monkeypatch.setattr(kernel.cuda_op, "gemm", lambda x, q, s, t, bits, g, **kw: calls.append(kw))
    monkeypatch.setattr(kernel.cuda_op, "device_config", lambda dev: cfg)
    monkeypatch.setattr(kernel.torch, "randn", lambda *a, device=None, **kw: torch.zeros(a))
    return calls


def test_tune_sweeps_time_each_option_and_print_the_plan(monkeypatch, capsys):
    """--tune / --tune-tc on the CPU: every (path, block_m, split) cell is one timed gemm call with
    those options, and the row names the heuristic's plan (GPU timing replaced by a stand-in)."""
    cfg = {"sm_count": 132, "cta_overhead_chunks": 2.0, "tc_overhead_chunks": [[128, 2.0], [256, 16.0]],
           "min_chunks_per_split": 4, "max_splits": 32, "tc_block_m": [[64, 64], [128, 128], [1 << 30, 256]]}
    calls = _stub_tune_gpu(monkeypatch, cfg)
    kernel.tune_tc(["8B-gate_up"], ms=(256,), block_ms=(128, 256), splits=(1, 2))
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("tune_tc 8B-gate_up") and "M=256" in out[0]
    assert "plan=bm256/s1" in out[0]  # 224 CTAs at 1 per SM: no split with the per-block_m overhead
    assert [(c["block_m"], c["splits"]) for c in calls] == [(128, 1), (128, 2), (128, None), (256, 1), (256, 2),
                                                           (256, None)]
    assert all(c["force_path"] == "tc" for c in calls)
    assert "bm256/auto=1:" in out[0] and "bm128/2:" in out[0]
    calls.clear()
    monkeypatch.setattr(kernel.cuda_op, "tc_available", lambda dev: True)
    monkeypatch.setattr(kernel.cuda_op, "device_plan", lambda m, n, k, bits, dtype, dev, c: {"splits": 3})
    kernel.tune(["8B-o"], ms=(64,), splits=(1, 2))
    line = capsys.readouterr().out.strip()
    assert line.startswith("tune 8B-o") and "auto=3:" in line and "dense:" in line and "mt8:" in line
    paths = [c.get("force_path") for c in calls]
    assert paths == ["lut"] * 3 + ["tc"] * len(kernel.cuda_op.TC_BLOCK_MS) + ["lut", "lut", "dense"]


def test_tune_ks_times_each_k_slice_and_split(monkeypatch, capsys):
    """--tune-ks on the CPU: the plan's own time first, then one timed gemm call per (K slices,
    split) cell that the plan's kernel has (GPU timing replaced by a stand-in)."""
    calls = _stub_tune_gpu(monkeypatch, {"sm_count": 132})
    monkeypatch.setattr(kernel.cuda_op, "device_plan", lambda m, n, k, bits, dtype, dev, c: {
        "k_slices": 8, "splits": 1, "m_tiles": 1, "warps": 8, "x_ahead": 1})
    kernel.tune_ks(["8B-o"], ms=(1,), k_slices=(1, 8), splits=(1, 2))
    line = capsys.readouterr().out.strip()
    assert line.startswith("tune_ks 8B-o") and "plan=ks8/s1:" in line and "ks8/2:" in line
    assert [(c.get("k_slices"), c.get("splits")) for c in calls] == [(None, None), (1, 1), (1, 2), (8, 1), (8, 2)]
    assert all(c["force_path"] == "lut" for c in calls)
    calls.clear()
    kernel.tune_ks(["8B-o"], ms=(1,), k_slices=(1, 8), splits=(1,), bits=3)  # 3-bit 8-warp m_tiles 1: slices too
    assert [(c.get("k_slices"), c.get("splits")) for c in calls] == [(None, None), (1, 1), (8, 1)]
