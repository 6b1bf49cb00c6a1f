"""benchmarks/ncu_source_summary.py on a small hand-written source-view CSV (no GPU, no ncu)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import ncu_source_summary  # noqa: E402

CSV = '''"Kernel Name","lut_wgmma"
"# Address","Source","Warp Stall Sampling (All Samples)","Warp Stall Sampling (Not-issued Samples)","Instructions Executed","stall_wait","stall_long_sb","stall_wait (Not Issued)"
"0","LDS R1, [R2]","10","5","1,000","7","3","4"
"1","@!P1 BRA 0x10","30","20","500","0","30","0"
"2","HMUL2 R3, R1, R4","60","10","1,000","60","0","9"
'''


def test_summary_totals_by_opcode_reason_and_hot_lines(tmp_path):
    path = tmp_path / "src.csv"
    path.write_text(CSV)
    out = ncu_source_summary.summarize(str(path), top=2).splitlines()
    assert out[0].endswith("100 stall samples, 2500 warp instructions executed, 3 SASS lines")
    assert out[1] == "samples by opcode: HMUL2 60.0%, BRA 30.0%, LDS 10.0%"  # the predicate is skipped
    assert out[2] == "executed by opcode: LDS 40.0%, HMUL2 40.0%, BRA 20.0%"
    assert out[3] == "stall reasons: wait 67.0%, long_sb 33.0%"  # "(Not Issued)" columns not double-counted
    hot = out[4:]
    assert len(hot) == 2 and "BRA" in hot[0] and "long_sb=30" in hot[0] and "HMUL2" in hot[1]  # source order
