"""flute_vllm: serve lookup-table (LUT) quantized LLMs with vLLM.

Pipeline: tables -> quantize/pack (format v1) -> ops (custom op: CPU reference, CUDA kernel)
-> vllm_plugin / hf / cli.
"""
__version__ = "0.1.0"


def register() -> None:
    """vLLM general-plugin entry point: registers ``--quantization flute``."""
    from .vllm_plugin import register as _register

    _register()
