import pytest
import torch

from flute_vllm import tables


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("kind", ["nf", "int", "fp"])
def test_builtin_tables_shape_and_range(kind, bits):
    t = tables.make_table(kind, bits)
    assert t.dtype == torch.float32 and t.shape == (2**bits,)
    assert torch.isfinite(t).all()
    assert t.abs().max().item() == pytest.approx(1.0)
    assert (t[1:] >= t[:-1]).all()  # built-ins are sorted
    assert (t == 0).any()  # zero is exactly representable in every built-in table


def test_nf4_is_bitsandbytes_code():
    # The NF4 values from the QLoRA paper / bitsandbytes (rounded to 4 decimals).
    expected = [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
                0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0]
    assert torch.allclose(tables.nf_table(4), torch.tensor(expected), atol=1e-4)


def test_nf_construction_matches_flute_for_2_and_3_bits():
    # FLUTE's nf_utils values (see shared/flute-format.md section 5).
    assert torch.allclose(tables.nf_table(2), torch.tensor([-1.0, 0.0, 0.337915, 1.0]), atol=1e-5)
    nf3 = [-1.0, -0.478629, -0.217142, 0.0, 0.160930, 0.337915, 0.562617, 1.0]
    assert torch.allclose(tables.nf_table(3), torch.tensor(nf3), atol=1e-5)


def test_nf_formula_reproduces_nf4():
    # The generic quantile construction gives bitsandbytes' hard-coded NF4 values.
    delta = 0.5 * (1 / 32 + 1 / 30)
    nd = torch.special.ndtri
    neg = -nd(torch.linspace(1 - delta, 0.5, 8, dtype=torch.float64))
    pos = nd(torch.linspace(0.5, 1 - delta, 9, dtype=torch.float64))[1:]
    v = torch.cat([neg, pos])
    v = v / v.abs().max()
    assert torch.allclose(v.float(), tables.nf_table(4), atol=1e-6)


def test_int_and_fp_grids():
    assert tables.int_table(2).tolist() == [-1.0, -0.5, 0.0, 0.5]
    # E2M1 (OCP FP4) magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6, normalised by 6.
    fp4 = tables.fp_table(4) * 6
    assert fp4[8:].tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert fp4[:8].tolist() == [-6.0, -4.0, -3.0, -2.0, -1.5, -1.0, -0.5, -0.0]


def test_custom_table_validation():
    t = tables.validate_table([3, 1, 2, 0], 2)  # any order is allowed (bnb FP4 codes are unsorted)
    assert t.tolist() == [3.0, 1.0, 2.0, 0.0]
    with pytest.raises(ValueError, match="has 3 entries, expected 2\\^2"):
        tables.validate_table([0, 1, 2], 2)
    with pytest.raises(ValueError, match="non-finite"):
        tables.validate_table([0, 1, float("nan"), 2], 2)
    with pytest.raises(ValueError, match="bits=5"):
        tables.make_table("nf", 5)
    with pytest.raises(ValueError, match="table='zz' is unknown"):
        tables.make_table("zz", 4)
