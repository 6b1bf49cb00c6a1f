"""FLUTE model-zoo checkpoints -> flute format v1.

The layout reference here is a slow per-element transcription of FLUTE's packing formulas
(shared/flute-format.md §3), independent of the vectorised pack_flute / unpack_flute.
"""
import json
import os

import pytest

from flute_vllm.checkpoint import load_state_dict_dir
import torch

from flute_vllm.convert import flute_zoo as fz
from flute_vllm.convert.flute_zoo import (
    convert_dir, flute_weight_to_qweight, is_flute_zoo_config, make_zoo_checkpoint, pack_flute,
    read_flute_config, tables2_from_tables, unpack_flute,
)
from flute_vllm.format import read_quant_config
from flute_vllm.quantize import dequantize, pack, quantize_weight, unpack
from flute_vllm.tables import nf_table

J3 = [0, 3, 6, 9, 12, 1, 4, 7, 10, 13, 2, 5, 8, 11, 14, 15]


def _s16(x: int) -> int:
    return x - (1 << 16) if x >= (1 << 15) else x


def _slow_pack_24(q: torch.Tensor, b: int) -> torch.Tensor:
    """weight[32c+t, 2k2+r], field s (bits b*s..) = Q[32Vc + 32(rV/2 + s//2) + t, 2k2 + 1 - s%2]."""
    n, k = q.shape
    v = 16 // b
    ql = q.tolist()
    out = torch.empty(n // v, k, dtype=torch.int16)
    for p in range(n // v):
        c, t = divmod(p, 32)
        for kc in range(k):
            k2, r = divmod(kc, 2)
            word = 0
            for s in range(v):
                word |= ql[32 * v * c + 32 * (r * v // 2 + s // 2) + t][2 * k2 + 1 - s % 2] << (b * s)
            out[p, kc] = _s16(word)
    return out


def _slow_pack_3(q: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    ql = q.tolist()
    out = torch.empty(3 * n // 16, k, dtype=torch.int16)
    for k2 in range(k // 2):
        for c in range(n // 512):
            for t in range(32):
                stream = 0  # 96-bit stream S as a Python int: bit 3*idx+i = bit i of code idx
                for idx in range(32):
                    stream |= ql[512 * c + 32 * J3[idx // 2] + t][2 * k2 + 1 - idx % 2] << (3 * idx)
                bits = lambda lo, hi: (stream >> lo) & ((1 << (hi - lo)) - 1)  # noqa: E731  S[lo:hi]
                for q in range(3):
                    w0 = bits(30 * q, 30 * q + 16)
                    w1 = bits(30 * q + 16, 30 * q + 30) | bits(90 + 2 * q, 92 + 2 * q) << 14
                    row = 32 * c + t if q == 0 else n // 16 + 64 * c + 32 * (q - 1) + t
                    out[row, 2 * k2] = _s16(w0)
                    out[row, 2 * k2 + 1] = _s16(w1)
    return out


@pytest.mark.parametrize("bits,n,k", [(4, 128, 6), (4, 256, 4), (2, 256, 4), (3, 512, 4)])
def test_pack_matches_slow_formula(bits, n, k):
    torch.manual_seed(bits)
    q = torch.randint(0, 2**bits, (n, k))
    ref = _slow_pack_3(q) if bits == 3 else _slow_pack_24(q, bits)
    assert torch.equal(pack_flute(q, bits), ref)
    assert torch.equal(unpack_flute(ref, bits).long(), q)


def test_b4_chunk_is_tables2_index():
    """FLUTE's kernel reads (Q[n, 2k2] << b) | Q[n, 2k2+1] from each byte of a b=4 word."""
    q = torch.zeros(128, 2, dtype=torch.long)
    q[0, 0], q[0, 1], q[32, 0], q[32, 1] = 0xA, 0x3, 0x5, 0xC
    w = pack_flute(q, 4)[0, 0].item() & 0xFFFF
    assert w & 0xFF == 0xA3 and w >> 8 == 0x5C


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("mult,k", [(1, 32), (2, 96), (4, 256)])
def test_pack_unpack_roundtrip(bits, mult, k):
    n = fz.ROW_MULTIPLE[bits] * mult
    q = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8)
    w = pack_flute(q, bits)
    assert w.dtype == torch.int16 and w.shape == (n * bits // 16, k)
    got = unpack_flute(w, bits, n=n, k=k)
    assert got.dtype == torch.uint8 and torch.equal(got, q)
    assert torch.equal(flute_weight_to_qweight(w, bits, k), pack(q, bits))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_unpack_in_row_chunks(bits, monkeypatch):
    """Several chunks, including a ragged last one, give the same result as one."""
    n = fz.ROW_MULTIPLE[bits] * 5
    q = torch.randint(0, 2**bits, (n, 64), dtype=torch.uint8)
    w = pack_flute(q, bits)
    monkeypatch.setattr(fz, "_CHUNK_ELEMS", fz.ROW_MULTIPLE[bits] * 64 * 2)
    assert torch.equal(unpack_flute(w, bits), q)


def test_shape_errors():
    with pytest.raises(ValueError, match="N=384 is not a multiple of 512"):
        pack_flute(torch.zeros(384, 32, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="N=64 is not a multiple of 128"):
        unpack_flute(torch.zeros(16, 32, dtype=torch.int16), 4)
    with pytest.raises(ValueError, match="must be int16"):
        unpack_flute(torch.zeros(32, 32, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="expected N=256"):
        unpack_flute(torch.zeros(32, 32, dtype=torch.int16), 4, n=256)


def test_tables2_layout():
    t = nf_table(4).to(torch.bfloat16)
    t2 = tables2_from_tables(t)
    assert t2.dtype == torch.float32 and t2.shape == (16, 16, 1)
    halves = t2.view(torch.bfloat16).view(16, 16, 2)
    assert torch.equal(halves[3, 7], torch.stack([t[3], t[7]]))  # tables[i] in the low half


def test_flute_config_detection(tmp_path):
    assert is_flute_zoo_config({"num_sms": 108, "num_bits": 4, "group_size": 64})
    assert is_flute_zoo_config({"num_bits": 3, "group_size": 128, "version": "0.2.0"})
    assert not is_flute_zoo_config({"quant_method": "flute", "bits": 4, "group_size": 64})
    with pytest.raises(FileNotFoundError, match="flute_config.json"):
        read_flute_config(str(tmp_path))


# ----------------------------------------------------------------------------- whole checkpoints


LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _dense_llama(path, kv_heads):
    from transformers import LlamaConfig, LlamaForCausalLM

    # hidden 512 / intermediate 1024 / head_dim 64: every N is a multiple of 256; with 8 KV heads
    # k/v_proj have N = 512 too, which 3-bit FLUTE needs.
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=kv_heads, vocab_size=256, max_position_embeddings=64)
    torch.manual_seed(kv_heads)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 64}, f)
    return model


@pytest.mark.parametrize("bits,group_size,kv_heads", [(4, 64, 4), (2, 128, 4), (3, 64, 8)])
def test_zoo_checkpoint_converts_exactly(tmp_path, bits, group_size, kv_heads):
    dense_dir = str(tmp_path / "dense")
    model = _dense_llama(dense_dir, kv_heads)
    zoo = make_zoo_checkpoint(dense_dir, str(tmp_path / "zoo"), bits, group_size)

    # What FLUTE would have written.
    assert read_flute_config(zoo) == {"num_sms": 108, "num_bits": bits, "group_size": group_size}
    with open(os.path.join(zoo, "config.json")) as f:
        assert "quantization_config" not in json.load(f)
    zsd = load_state_dict_dir(zoo)
    p0 = "model.layers.0.mlp.gate_proj"
    assert zsd[f"{p0}.weight"].dtype == torch.int16 and zsd[f"{p0}.weight"].shape == (1024 * bits // 16, 512)
    assert zsd[f"{p0}.tables"].dtype == torch.bfloat16 and zsd[f"{p0}.tables2"].shape == (2**bits, 2**bits, 1)

    out = convert_dir(zoo, str(tmp_path / "flute"))
    cfg = read_quant_config(out)
    assert (cfg.bits, cfg.group_size, cfg.table, cfg.modules_to_not_convert) == (bits, group_size, "custom", ["lm_head"])
    sd = load_state_dict_dir(out)
    table = nf_table(bits).to(torch.bfloat16).float()  # FLUTE stores tables in the model dtype
    for i in range(2):
        for lin in LINEARS:
            p = f"model.layers.{i}.{lin}"
            w = model.get_submodule(p).weight.detach()
            q, scales = quantize_weight(w, bits, group_size, nf_table(bits))  # independent of the zoo files
            assert not any(f"{p}.{s}" in sd for s in ("weight", "tables", "tables2"))
            assert torch.equal(unpack(sd[f"{p}.qweight"], bits), q), p
            assert torch.equal(sd[f"{p}.scales"], scales.to(torch.bfloat16)), p
            assert torch.equal(sd[f"{p}.table"], table), p
            got = dequantize(sd[f"{p}.qweight"], sd[f"{p}.scales"], sd[f"{p}.table"], bits, group_size)
            ref = table[q] * scales.to(torch.bfloat16).float().repeat_interleave(group_size, 1)
            assert torch.equal(got, ref), p
    for k in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.1.input_layernorm.weight"):
        assert torch.equal(sd[k], zsd[k]), k
    assert os.path.exists(os.path.join(out, "tokenizer_config.json"))


def test_make_zoo_rejects_unpackable_layer(tmp_path):
    dense_dir = str(tmp_path / "dense")
    _dense_llama(dense_dir, kv_heads=4)  # k/v_proj N = 256
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight: .* N=256 is not a multiple of 512"):
        make_zoo_checkpoint(dense_dir, str(tmp_path / "zoo"), 3, 64)


def _cli(argv):
    """The CLI in-process: (exit code or message, stdout)."""
    from flute_vllm.cli import main

    try:
        main(argv)
    except SystemExit as e:
        return e.code
    return 0


def test_cli_flute_zoo(tmp_path, capsys):
    assert _cli(["convert", "flute-zoo", "--help"]) == 0
    assert "flute_config.json" in capsys.readouterr().out
    assert _cli(["convert", "--help"]) == 0
    out = capsys.readouterr().out
    assert "bnb" in out and "flute-zoo" in out
    missing = str(tmp_path / "missing")
    assert _cli(["convert", "flute-zoo", missing, str(tmp_path / "o")]) == f"error: SRC {missing!r} does not exist"
    assert _cli(["convert", "gptq", "a", "b"]) == 2
    assert "invalid choice: 'gptq'" in capsys.readouterr().err

    dense_dir = str(tmp_path / "dense")
    _dense_llama(dense_dir, kv_heads=4)
    # A directory without flute_config.json is refused by name.
    code = _cli(["convert", "flute-zoo", dense_dir, str(tmp_path / "o")])
    assert "flute_config.json" in code and "does not exist" in code
    zoo = make_zoo_checkpoint(dense_dir, str(tmp_path / "zoo"), 4, 128)
    assert _cli(["convert", "flute-zoo", zoo, str(tmp_path / "flute")]) == 0  # (python -m: see test_convert_bnb)
    assert read_quant_config(str(tmp_path / "flute")).group_size == 128
