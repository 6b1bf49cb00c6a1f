import pytest
import torch

from flute_vllm.quantize import dequantize, pack, quantize_weight, unpack
from flute_vllm.tables import make_table


def _pack_reference(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Independent packer: Python big integers, one little-endian bit stream per row."""
    n, k = q.shape
    out = torch.empty(n, k * bits // 32, dtype=torch.int32)
    for r in range(n):
        stream = 0
        for i, v in enumerate(q[r].tolist()):
            stream |= int(v) << (bits * i)
        for w in range(out.shape[1]):
            word = (stream >> (32 * w)) & 0xFFFFFFFF
            out[r, w] = word - (1 << 32) if word >= (1 << 31) else word
    return out


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("k", [32, 96, 576, 4096])
def test_pack_unpack_roundtrip(bits, k):
    q = torch.randint(0, 2**bits, (9, k))
    packed = pack(q, bits)
    assert packed.dtype == torch.int32 and packed.shape == (9, k * bits // 32)
    assert torch.equal(unpack(packed, bits), q)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pack_matches_bitstream_definition(bits):
    q = torch.randint(0, 2**bits, (3, 96))
    assert torch.equal(pack(q, bits), _pack_reference(q, bits))


def test_three_bit_run_layout():
    # Index 10 of a 3-bit run straddles words 0 and 1 (bits 30..32).
    q = torch.zeros(1, 32, dtype=torch.int64)
    q[0, 10] = 0b111
    words = pack(q, 3)[0].tolist()
    assert words == [-(1 << 31) | (1 << 30), 1, 0]


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="K=40 must be a multiple of 32"):
        pack(torch.zeros(2, 40, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="out of range for 2 bits"):
        pack(torch.full((2, 32), 4), 2)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256, -1])
@pytest.mark.parametrize("kind", ["nf", "int", "fp"])
def test_quantize_is_round_to_nearest(bits, group_size, kind):
    k = 576 if group_size in (32, 64, -1) else 512  # SmolLM2's K=576 is not a multiple of 128
    w = torch.randn(16, k)
    table = make_table(kind, bits)
    q, scales = quantize_weight(w, bits, group_size, table)
    g = k if group_size == -1 else group_size
    assert scales.shape == (16, k // g)
    # scale = absmax of each group / max|table|
    assert torch.allclose(scales, w.view(16, k // g, g).abs().amax(-1) / table.abs().max())
    # every code is the nearest table value (no other code is strictly closer)
    normed = w.view(16, k // g, g) / scales.unsqueeze(-1)
    err = (normed.reshape(16, k).unsqueeze(-1) - table).abs()
    chosen = err.gather(-1, q.unsqueeze(-1)).squeeze(-1)
    assert (chosen <= err.min(-1).values + 1e-6).all()
    # dequantized weight = table[q] * scale, and its error is bounded by half the largest table gap
    w_hat = dequantize(pack(q, bits), scales, table, bits, group_size)
    expected = table[q] * scales.repeat_interleave(g, dim=1)
    assert torch.equal(w_hat, expected)
    # |w/scale| <= 1: the error is at most half the largest gap, or the clipping at either end
    gap = max((table.sort().values.diff().max() / 2).item(), 1 - table.max().item(), 1 + table.min().item())
    assert ((w - w_hat).abs() <= gap * scales.repeat_interleave(g, 1) + 1e-5).all()


def test_group_size_must_divide_k():
    with pytest.raises(ValueError, match="group_size=256 does not divide the input size K=576"):
        quantize_weight(torch.randn(4, 576), 4, 256, make_table("nf", 4))


def test_zero_group_is_exact():
    w = torch.zeros(2, 64)
    w[1] = torch.randn(64)
    q, s = quantize_weight(w, 4, 32, make_table("nf", 4))
    w_hat = dequantize(pack(q, 4), s, make_table("nf", 4), 4, 32)
    assert torch.equal(w_hat[0], torch.zeros(64))
    assert torch.isfinite(w_hat).all()


def test_modules_to_not_convert_match_whole_components():
    from flute_vllm.format import is_listed

    assert is_listed("lm_head", ["lm_head"])
    assert is_listed("model.layers.1.self_attn.o_proj", ["layers.1.self_attn"])
    assert is_listed("model.layers.1.mlp.down_proj", ["mlp"])
    assert not is_listed("model.layers.10.self_attn.o_proj", ["layers.1"])
    assert not is_listed("model.layers.0.mlp.down_proj", ["down"])
