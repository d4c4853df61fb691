"""Serving saved combined models on vLLM (`vllm serve DIR`): the model class (`model.py`) and the plugin hook.

vLLM finds `register` through our `vllm.general_plugins` entry point (pyproject.toml) in every process it starts,
so a model saved by `llm-modules train` (architecture `LLMModulesForCausalLM`) loads without a fork of vLLM.
Nothing here imports vLLM at module level: `llm_modules` stays importable where vLLM is not installed.
"""

from __future__ import annotations

ARCHITECTURE = "LLMModulesForCausalLM"  # what `save_pretrained` writes into config.json's `architectures`


def register() -> None:
    """Register our config with transformers' `AutoConfig` and our model class with vLLM's `ModelRegistry`."""
    from vllm import ModelRegistry
    from transformers import AutoConfig

    from ..configuration import LLMModulesConfig

    AutoConfig.register(LLMModulesConfig.model_type, LLMModulesConfig, exist_ok=True)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        # A string, so vLLM imports the model class only in the processes that build it.
        ModelRegistry.register_model(ARCHITECTURE, "llm_modules.vllm.model:LLMModulesForVllm")
