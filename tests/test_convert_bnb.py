"""bitsandbytes 4-bit -> flute: indices, tables and scales carried over without re-rounding.

Every case runs against bitsandbytes itself when it imports (its CPU backend quantizes and
dequantizes 4-bit), and always against an independent reference quantizer written here from
bnb's documented algorithm (blockwise absmax over the flattened weight, nearest code, two codes
per byte with element 2i in the high nibble, nested absmax = 8-bit code * absmax2 + offset).
"""
import json
import os
import subprocess
import sys

import pytest

from flute_vllm.checkpoint import load_state_dict_dir
import torch

from flute_vllm.convert.bnb import Bnb4bitState, bnb_code, convert_4bit_weight, convert_dir, convert_model
from flute_vllm.format import read_quant_config
from flute_vllm.quantize import dequantize, unpack
from flute_vllm.tables import nf_table

try:
    import bitsandbytes.functional as bnbF
except Exception:  # not installed, or no backend for this machine
    bnbF = None

BACKENDS = ["reference", pytest.param("bitsandbytes", marks=pytest.mark.skipif(bnbF is None, reason="bitsandbytes not importable"))]


# ----------------------------------------------------------------------------- reference bnb


def _ref_quantize_4bit(w: torch.Tensor, blocksize: int, quant_type: str, nested: bool):
    """Independent bnb-style 4-bit quantizer -> (packed uint8 [numel/2, 1], Bnb4bitState)."""
    n, k = w.shape
    code = bnb_code(quant_type)
    flat = w.to(torch.float32).reshape(-1, blocksize)
    absmax = flat.abs().amax(1)
    q = (flat / absmax[:, None]).unsqueeze(-1).sub(code).abs().argmin(-1).flatten().to(torch.uint8)
    packed = (q[0::2] * 16 + q[1::2]).view(-1, 1)  # element 2i in the high nibble
    state = Bnb4bitState(absmax=absmax, code=code, blocksize=blocksize, dtype=w.dtype, shape=(n, k), quant_type=quant_type)
    if nested:
        offset = absmax.mean()
        centred = absmax - offset
        code2 = torch.linspace(-1, 1, 256)  # any 8-bit map works: the converter must use the stored one
        blocks2 = -(-centred.numel() // 256)
        padded = torch.nn.functional.pad(centred, (0, blocks2 * 256 - centred.numel())).view(blocks2, 256)
        absmax2 = padded.abs().amax(1)
        q2 = (padded / absmax2[:, None]).unsqueeze(-1).sub(code2).abs().argmin(-1).flatten()[: centred.numel()]
        state.absmax, state.nested_absmax, state.nested_code = q2.to(torch.uint8), absmax2, code2
        state.nested_blocksize, state.offset = 256, float(offset)
    return packed, state


def _ref_dequantize_4bit(packed: torch.Tensor, st: Bnb4bitState) -> torch.Tensor:
    """Independent dequantizer: dtype(code[q] * absmax) with the product in float32, as bnb."""
    b = packed.flatten().to(torch.int64)
    q = torch.stack([b // 16, b % 16], 1).flatten()
    if st.nested:
        a = st.nested_code[st.absmax.long()]
        a = torch.cat([a[i : i + 256] * st.nested_absmax[i // 256] for i in range(0, a.numel(), 256)])
        absmax = a + torch.tensor(st.offset, dtype=torch.float32)
    else:
        absmax = st.absmax
    vals = st.code[q].view(-1, st.blocksize) * absmax[:, None]
    return vals.view(st.shape).to(st.dtype)


def _quantize(backend, w, blocksize, quant_type, nested):
    """-> (packed, state for the converter, bnb-exact dequantized weight in w.dtype)."""
    if backend == "bitsandbytes":
        packed, qs = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
        return packed, qs, bnbF.dequantize_4bit(packed, qs)
    packed, st = _ref_quantize_4bit(w, blocksize, quant_type, nested)
    return packed, st, _ref_dequantize_4bit(packed, st)


def _ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of x's dtype at |x| (as float32)."""
    a = x.abs()
    return (torch.nextafter(a, torch.full_like(a, float("inf"))) - a).float()


# ----------------------------------------------------------------------------- per-tensor exactness


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_convert_matches_bnb_dequantize(backend, quant_type, nested, blocksize, dtype):
    torch.manual_seed(blocksize + nested)
    w = (torch.randn(128, 256) * 0.02).to(dtype)
    w[3, :7] = 0.0  # zero code / signed zero for fp4
    packed, state, ref = _quantize(backend, w, blocksize, quant_type, nested)

    # float32 scales: the same float32 product as bnb, then the same rounding -> bit-identical.
    exact = convert_4bit_weight(packed, state, scales_dtype=torch.float32)
    d32 = dequantize(exact["qweight"], exact["scales"], exact["table"], 4, blocksize)
    assert torch.equal(d32.to(dtype), ref)
    assert torch.equal(exact["table"], bnb_code(quant_type))

    # Indices: our packed layout holds exactly bnb's codes (high nibble = element 2i).
    b = packed.flatten().to(torch.int64)
    assert torch.equal(unpack(exact["qweight"], 4), torch.stack([b // 16, b % 16], 1).view(128, 256))

    # Format v1 default: scales in the model dtype.
    conv = convert_4bit_weight(packed, state)
    assert conv["scales"].dtype == dtype and conv["scales"].shape == (128, 256 // blocksize)
    assert conv["qweight"].dtype == torch.int32 and conv["qweight"].shape == (128, 256 * 4 // 32)
    d = dequantize(conv["qweight"], conv["scales"], conv["table"], 4, blocksize)
    if not nested or dtype == torch.float32:
        # A plain absmax is the absmax of dtype values, so casting it to the dtype is exact.
        assert torch.equal(conv["scales"].float(), exact["scales"])
        assert torch.equal(d.to(dtype), ref)
    else:
        # Nested absmax (8-bit code * absmax2 + offset) is not a dtype value: rounding the scale
        # once more moves a weight by at most one ulp of the dtype.
        assert ((d.to(dtype).float() - ref.float()).abs() <= _ulp(ref)).all()


@pytest.mark.skipif(bnbF is None, reason="bitsandbytes not importable")
def test_bnb_byte_order_high_nibble_first():
    """Checked on bnb itself: element 0 -> code 15 (max), element 1 -> code 0 (min) gives 0xF0."""
    w = torch.zeros(1, 64)
    w[0, 0], w[0, 1] = 1.0, -1.0
    packed, qs = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert packed.flatten()[0].item() == 0xF0
    conv = convert_4bit_weight(packed, qs)
    assert unpack(conv["qweight"], 4)[0, :2].tolist() == [15, 0]


@pytest.mark.skipif(bnbF is None, reason="bitsandbytes not importable")
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_builtin_codes_equal_bnb(quant_type):
    assert torch.equal(bnb_code(quant_type), bnbF.get_4bit_type(quant_type, device="cpu"))


def test_convert_errors():
    w = torch.randn(64, 512, dtype=torch.bfloat16)
    packed, st = _ref_quantize_4bit(w, 512, "nf4", False)
    with pytest.raises(ValueError, match=r"layer\.weight: bnb blocksize=512 has no flute group size"):
        convert_4bit_weight(packed, st, name="layer.weight")
    w = torch.randn(64, 96, dtype=torch.bfloat16)
    packed, st = _ref_quantize_4bit(w, 64, "nf4", False)
    with pytest.raises(ValueError, match="K=96 is not a multiple of bnb blocksize=64"):
        convert_4bit_weight(packed, st)
    w = torch.randn(64, 128, dtype=torch.bfloat16)
    packed, st = _ref_quantize_4bit(w, 64, "nf4", False)
    st.code = st.code.flip(0)
    with pytest.raises(ValueError, match=r"x\.quant_map differs from bitsandbytes' built-in nf4 code"):
        convert_4bit_weight(packed, st, name="x")


# ----------------------------------------------------------------------------- whole models


def _tiny_llama(path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=128)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 128}, f)  # an aux file that must travel
    return model


LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _check_converted(out, expected: dict, table_kind, blocksize, dense: dict):
    cfg = read_quant_config(out)
    assert (cfg.bits, cfg.group_size, cfg.table) == (4, blocksize, table_kind)
    assert cfg.modules_to_not_convert == ["lm_head"]
    sd = load_state_dict_dir(out)
    for prefix, (ref, dtype) in expected.items():
        assert f"{prefix}.weight" not in sd
        d = dequantize(sd[f"{prefix}.qweight"], sd[f"{prefix}.scales"], sd[f"{prefix}.table"], 4, cfg.group_size)
        assert sd[f"{prefix}.scales"].dtype == dtype
        assert ((d.to(dtype).float() - ref.float()).abs() <= _ulp(ref)).all(), prefix
    for k, v in dense.items():
        assert torch.equal(sd[k], v), k
    assert os.path.exists(os.path.join(out, "tokenizer_config.json"))


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("dense"))
    _tiny_llama(path)
    return path


@pytest.mark.skipif(bnbF is None, reason="bitsandbytes not importable")
@pytest.mark.parametrize("quant_type,nested", [("nf4", True), ("fp4", False)])
def test_convert_transformers_bnb_model(dense_dir, tmp_path, quant_type, nested):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=nested,
                            bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=bc, device_map="cpu", dtype=torch.bfloat16)
    src = str(tmp_path / "bnb")
    model.save_pretrained(src)
    with open(os.path.join(dense_dir, "tokenizer_config.json")) as f:
        open(os.path.join(src, "tokenizer_config.json"), "w").write(f.read())

    # bnb's own dequantization of every 4-bit layer of the loaded model.
    expected = {}
    for i in range(2):
        for lin in LINEARS:
            prefix = f"model.layers.{i}.{lin}"
            mod = model.get_submodule(prefix)
            expected[prefix] = (bnbF.dequantize_4bit(mod.weight.data, mod.weight.quant_state), torch.bfloat16)
    dense = {k: v for k, v in model.state_dict().items() if "proj" not in k}
    assert set(dense) >= {"lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"}

    out = convert_dir(src, str(tmp_path / "flute"))
    _check_converted(out, expected, "nf" if quant_type == "nf4" else "custom", 64, dense)
    if not nested:  # plain absmax: bit-exact in bf16 too
        sd = load_state_dict_dir(out)
        p = "model.layers.1.mlp.down_proj"
        assert torch.equal(dequantize(sd[f"{p}.qweight"], sd[f"{p}.scales"], sd[f"{p}.table"], 4, 64).bfloat16(), expected[p][0])

    # The loaded model converts to the same tensors as its saved directory.
    out2 = convert_model(model, str(tmp_path / "flute-from-model"))
    a, b = load_state_dict_dir(out), load_state_dict_dir(out2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_quant_config(out2) == read_quant_config(out)


def _write_reference_bnb_dir(dense_dir, dst, quant_type, nested, blocksize):
    """A bnb-4bit directory laid out as transformers + bnb serialise it, built without bnb."""
    from huggingface_hub import save_torch_state_dict
    from safetensors.torch import load_file

    sd = load_file(os.path.join(dense_dir, "model.safetensors"))
    expected = {}
    for i in range(2):
        for lin in LINEARS:
            prefix = f"model.layers.{i}.{lin}"
            packed, st = _ref_quantize_4bit(sd.pop(f"{prefix}.weight"), blocksize, quant_type, nested)
            expected[prefix] = (_ref_dequantize_4bit(packed, st), torch.bfloat16)
            base = f"{prefix}.weight"
            sd[base], sd[f"{base}.absmax"], sd[f"{base}.quant_map"] = packed, st.absmax, st.code
            meta = {"quant_type": quant_type, "blocksize": blocksize, "dtype": "bfloat16", "shape": list(st.shape)}
            if nested:
                sd[f"{base}.nested_absmax"], sd[f"{base}.nested_quant_map"] = st.nested_absmax, st.nested_code
                meta.update(nested_blocksize=256, nested_dtype="float32", nested_offset=st.offset)
            sd[f"{base}.quant_state.bitsandbytes__{quant_type}"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    os.makedirs(dst)
    save_torch_state_dict(sd, dst)
    with open(os.path.join(dense_dir, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": quant_type,
                                     "bnb_4bit_use_double_quant": nested}
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    for fname in ("tokenizer_config.json", "generation_config.json"):
        with open(os.path.join(dense_dir, fname)) as f:
            open(os.path.join(dst, fname), "w").write(f.read())
    dense = {k: v for k, v in sd.items() if "proj" not in k}
    return expected, dense


@pytest.mark.parametrize("quant_type,nested,blocksize", [("nf4", False, 128), ("fp4", True, 64)])
def test_convert_reference_serialized_dir(dense_dir, tmp_path, quant_type, nested, blocksize):
    src = str(tmp_path / "bnb-ref")
    expected, dense = _write_reference_bnb_dir(dense_dir, src, quant_type, nested, blocksize)
    out = convert_dir(src, str(tmp_path / "flute"))
    _check_converted(out, expected, "nf" if quant_type == "nf4" else "custom", blocksize, dense)
    sd = load_state_dict_dir(out)
    assert torch.equal(sd["model.layers.0.mlp.up_proj.table"], bnb_code(quant_type))
    if quant_type == "nf4":
        assert torch.equal(sd["model.layers.0.mlp.up_proj.table"], nf_table(4))


def test_cli_convert_bnb(dense_dir, tmp_path):
    src = str(tmp_path / "bnb-ref")
    _write_reference_bnb_dir(dense_dir, src, "nf4", True, 64)
    dst = str(tmp_path / "flute")
    r = subprocess.run([sys.executable, "-m", "flute_vllm", "convert", "bnb", src, dst, "--scales-dtype", "float32"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert read_quant_config(dst).table == "nf"
    assert load_state_dict_dir(dst)["model.layers.0.self_attn.q_proj.scales"].dtype == torch.float32

    from flute_vllm.cli import main

    with pytest.raises(SystemExit, match="does not exist"):
        main(["convert", "bnb", str(tmp_path / "nope"), dst])
    with pytest.raises(ValueError, match="no bitsandbytes 4-bit layers"):
        convert_dir(dense_dir, str(tmp_path / "x"))
