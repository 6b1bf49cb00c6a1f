"""Lookup tables (codebooks) for LUT quantization.

A table maps a b-bit index to a real value; the dequantized weight is
``table[q] * group_scale``. Built-in kinds, all normalised to max |value| == 1 so that the
quantizer's ``scale = absmax(group) / max|table|`` is simply the group's absmax:

- ``nf``: NormalFloat (QLoRA): quantiles of a standard normal, asymmetric so that 0 is exact.
  The 4-bit table is bitsandbytes' NF4 code, value for value.
- ``int``: the two's-complement integer grid ``-2^(b-1) .. 2^(b-1)-1`` (uniform, zero exact),
  divided by ``2^(b-1)``.
- ``fp``: the tiny sign/exponent/mantissa float formats: E2M1 (4 bits, the OCP FP4 grid),
  E2M0 (3 bits), E1M0 (2 bits). They carry both +0 and -0, so one code is spent twice; we keep
  them exact rather than inventing a format.
- any user ("custom") table of 2^b finite values.

Tables need not be sorted: converted checkpoints (e.g. bitsandbytes FP4) keep their producer's
code order, because re-ordering the table would mean rewriting every index. Quantizing uses an
argmin over the table, which works in any order.
"""
from __future__ import annotations

from typing import Sequence

import torch

TABLE_KINDS = ("nf", "int", "fp")
SUPPORTED_BITS = (2, 3, 4)

# bitsandbytes' NF4 code (bitsandbytes/functional.py, get_4bit_type("nf4")), kept verbatim so that
# an NF4 W4G64 checkpoint of ours and bitsandbytes' quantize_4bit give identical weights.
_BNB_NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def check_bits(bits: int, what: str = "bits") -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"{what}={bits!r} is not supported: flute packs 2, 3 or 4 bit indices")
    return int(bits)


def nf_table(bits: int) -> torch.Tensor:
    """NormalFloat table (QLoRA's construction, generalised to 2 and 3 bits as FLUTE does)."""
    check_bits(bits)
    if bits == 4:
        return torch.tensor(_BNB_NF4, dtype=torch.float32)
    delta = 0.5 * (1.0 / 32 + 1.0 / 30)
    half = 2 ** (bits - 1)
    ndtri = torch.special.ndtri
    neg = -ndtri(torch.linspace(1 - delta, 0.5, half, dtype=torch.float64))
    pos = ndtri(torch.linspace(0.5, 1 - delta, half + 1, dtype=torch.float64))[1:]
    values = torch.cat([neg, pos])
    values = values / values.abs().max()
    values[half - 1] = 0.0  # ndtri(0.5) is 0 up to rounding; make the zero exact
    return values.to(torch.float32)


def int_table(bits: int) -> torch.Tensor:
    check_bits(bits)
    half = 2 ** (bits - 1)
    return torch.arange(-half, half, dtype=torch.float32) / half


def fp_table(bits: int) -> torch.Tensor:
    """Sign + exponent + mantissa minifloats (IEEE-style bias, subnormals), sorted by value."""
    check_bits(bits)
    exp_bits, man_bits = {4: (2, 1), 3: (2, 0), 2: (1, 0)}[bits]
    bias = 2 ** (exp_bits - 1) - 1 if exp_bits > 1 else 0
    magnitudes = []
    for e in range(2**exp_bits):
        for m in range(2**man_bits):
            frac = m / 2**man_bits
            if e == 0:  # subnormal
                magnitudes.append(frac * 2.0 ** (1 - bias) if man_bits else 0.0)
            else:
                magnitudes.append((1 + frac) * 2.0 ** (e - bias))
    mags = torch.tensor(magnitudes, dtype=torch.float64)
    values = torch.cat([-mags.flip(0), mags])  # -max .. -0, +0 .. +max
    return (values / mags.max()).to(torch.float32)


def make_table(kind: str, bits: int) -> torch.Tensor:
    """A built-in table as float32 ``[2^bits]``."""
    builders = {"nf": nf_table, "int": int_table, "fp": fp_table}
    if kind not in builders:
        raise ValueError(f"table={kind!r} is unknown: use one of {TABLE_KINDS} or pass custom values")
    return builders[kind](bits)


def validate_table(values: Sequence[float] | torch.Tensor, bits: int, name: str = "table") -> torch.Tensor:
    """Check a user / checkpoint table and return it as float32 ``[2^bits]``."""
    check_bits(bits)
    table = torch.as_tensor(values).detach().to(torch.float32).flatten().cpu()
    if table.numel() != 2**bits:
        raise ValueError(f"{name} has {table.numel()} entries, expected 2^{bits} = {2**bits}")
    if not torch.isfinite(table).all():
        raise ValueError(f"{name} has non-finite entries: {table.tolist()}")
    if table.abs().max() == 0:
        raise ValueError(f"{name} is all zeros")
    return table


def table_absmax(table: torch.Tensor) -> float:
    return float(table.abs().max())


def resolve_table(spec: str | Sequence[float] | torch.Tensor, bits: int) -> torch.Tensor:
    """``"nf" | "int" | "fp"`` or explicit values -> float32 table."""
    if isinstance(spec, str):
        return make_table(spec, bits)
    return validate_table(spec, bits)


__all__ = [
    "TABLE_KINDS", "SUPPORTED_BITS", "check_bits", "nf_table", "int_table", "fp_table",
    "make_table", "validate_table", "table_absmax", "resolve_table",
]
