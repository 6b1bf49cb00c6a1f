"""Summarise Nsight Compute's per-instruction source view: where a kernel's warps stall.

    ncu --set full --import-source yes -k regex:lut_wgmma -c 1 -o prof \\
        python3 benchmarks/profile_case.py --shapes 8B-gate_up --ms 64 --path tc
    ncu -i prof.ncu-rep --page source --csv --print-source sass > src.csv
    python3 benchmarks/ncu_source_summary.py src.csv [--top 45]

Prints the total stall samples and executed instructions, both by opcode, the stall reasons over
the whole kernel, and the SASS lines with the most samples (with their top three reasons), in
source order. The full CSV has one row per SASS instruction and is too large to keep.
"""
from __future__ import annotations

import argparse
import collections
import csv


def _num(v: str) -> float:
    try:
        return float(v.replace(",", ""))
    except ValueError:
        return 0.0


def _opcode(sass: str) -> str:
    parts = sass.split()
    if parts and parts[0].startswith("@"):  # predicate
        parts = parts[1:]
    return parts[0].split(".")[0] if parts else "?"


def summarize(path: str, top: int = 45) -> str:
    with open(path, errors="replace", newline="") as f:
        rows = list(csv.reader(f))
    head = next(i for i, r in enumerate(rows) if "Source" in (c.strip() for c in r))
    hdr = rows[head]
    data = [r for r in rows[head + 1:] if len(r) == len(hdr)]
    src = next(i for i, c in enumerate(hdr) if c.strip() == "Source")
    samples = next(i for i, c in enumerate(hdr) if c.startswith("Warp Stall Sampling (All"))
    executed = next((i for i, c in enumerate(hdr) if c.startswith("Instructions Executed")), None)
    reasons = [i for i, c in enumerate(hdr) if c.startswith("stall_") and "(Not Issued)" not in c]
    total = sum(_num(r[samples]) for r in data) or 1.0
    total_exe = sum(_num(r[executed]) for r in data) if executed is not None else 0.0
    by_op, exe_op, by_reason = collections.Counter(), collections.Counter(), collections.Counter()
    for r in data:
        op = _opcode(r[src].strip())
        by_op[op] += _num(r[samples])
        if executed is not None:
            exe_op[op] += _num(r[executed])
        for i in reasons:
            by_reason[hdr[i][len("stall_"):]] += _num(r[i])
    out = [f"{path}: {total:.0f} stall samples, {total_exe:.0f} warp instructions executed, {len(data)} SASS lines",
           "samples by opcode: " + ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in by_op.most_common(18))]
    if executed is not None:
        out.append("executed by opcode: " + ", ".join(f"{k} {100 * v / max(total_exe, 1):.1f}%"
                                                      for k, v in exe_op.most_common(18)))
    out.append("stall reasons: " + ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in by_reason.most_common(12)))
    hot = sorted(range(len(data)), key=lambda i: -_num(data[i][samples]))[:top]
    for i in sorted(hot):
        r = data[i]
        worst = sorted(((_num(r[j]), hdr[j][len("stall_"):]) for j in reasons), reverse=True)[:3]
        exe = f"{_num(r[executed]):9.0f}" if executed is not None else ""
        out.append(f"{i:5d} {100 * _num(r[samples]) / total:5.1f}% {exe}  {r[src].strip()[:70]:70s} "
                   + " ".join(f"{n}={v:.0f}" for v, n in worst if v))
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv", help="ncu --page source --csv --print-source sass output")
    ap.add_argument("--top", type=int, default=45, help="SASS lines with the most samples to list")
    args = ap.parse_args(argv)
    print(summarize(args.csv, args.top))


if __name__ == "__main__":
    main()
