"""The flute QuantizationConfig: parsing, validation, checkpoint detection, skipped layers."""
import pytest

pytest.importorskip("vllm")

import flute_vllm  # noqa: E402

flute_vllm.register()
from flute_vllm.vllm_plugin.flute import FluteConfig  # noqa: E402

BASE = {"quant_method": "flute", "format_version": 1, "bits": 4, "group_size": 64, "table": "nf",
        "modules_to_not_convert": ["lm_head"]}


def test_registered_with_vllm():
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    assert "flute" in QUANTIZATION_METHODS
    assert get_quantization_config("flute") is FluteConfig
    flute_vllm.register()  # idempotent
    assert QUANTIZATION_METHODS.count("flute") == 1


def test_from_config_reads_every_field():
    cfg = FluteConfig.from_config({**BASE, "bits": 3, "group_size": -1, "table": "custom"})
    assert (cfg.spec.bits, cfg.spec.group_size, cfg.spec.table) == (3, -1, "custom")
    assert cfg.get_name() == "flute"
    assert FluteConfig.override_quantization_method(BASE, None) == "flute"
    assert FluteConfig.override_quantization_method({"quant_method": "gptq"}, None) is None


@pytest.mark.parametrize("field,value,message", [
    ("bits", 5, "quantization_config.bits=5 is not supported"),
    ("group_size", 100, "quantization_config.group_size=100 is not supported"),
    ("table", "lloyd", "quantization_config.table='lloyd' is unknown"),
    ("format_version", 2, "format_version=2"),
])
def test_bad_fields_are_named(field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        FluteConfig.from_config({**BASE, field: value})


def test_missing_field_is_named():
    cfg = dict(BASE)
    del cfg["group_size"]
    with pytest.raises(ValueError, match="missing the field 'group_size'"):
        FluteConfig.from_config(cfg)


def test_modules_to_not_convert_with_fused_layers():
    cfg = FluteConfig.from_config({**BASE, "modules_to_not_convert": ["lm_head", "layers.0.mlp.gate_proj",
                                                                      "layers.0.mlp.up_proj", "layers.1.self_attn"]})
    cfg.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    assert cfg.is_skipped("model.layers.0.mlp.gate_up_proj")
    assert not cfg.is_skipped("model.layers.0.mlp.down_proj")
    assert cfg.is_skipped("model.layers.1.self_attn.qkv_proj")
    assert cfg.is_skipped("model.layers.1.self_attn.o_proj")
    assert not cfg.is_skipped("model.layers.10.self_attn.o_proj")  # "layers.1." is not "layers.10."
    partial = FluteConfig.from_config({**BASE, "modules_to_not_convert": ["layers.0.mlp.gate_proj"]})
    partial.packed_modules_mapping = cfg.packed_modules_mapping
    with pytest.raises(ValueError, match="only some of the fused sub-layers"):
        partial.is_skipped("model.layers.0.mlp.gate_up_proj")
