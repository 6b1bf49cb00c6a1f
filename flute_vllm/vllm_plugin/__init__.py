"""vLLM integration: the ``flute`` QuantizationConfig and linear method.

``register()`` is called by vLLM's plugin loader (entry point group ``vllm.general_plugins``) in
every vLLM process; it must not initialise CUDA.
"""
from __future__ import annotations

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from . import flute  # noqa: F401  (the decorator registers "flute" with vLLM)

    _registered = True
