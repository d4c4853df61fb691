"""llm-modules: make a small language model smarter by wiring it to a frozen large one (arXiv 2502.08213)."""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration import LLMModulesConfig
from .modeling import EnhancedCrossAttention, LLMModulesBridge, LLMModulesCache, LLMModulesForCausalLM

__version__ = "0.1.0"

# `AutoModelForCausalLM.from_pretrained(dir)` then works on saved combined models too.
AutoConfig.register(LLMModulesConfig.model_type, LLMModulesConfig, exist_ok=True)
AutoModelForCausalLM.register(LLMModulesConfig, LLMModulesForCausalLM, exist_ok=True)

__all__ = [
    "EnhancedCrossAttention",
    "LLMModulesBridge",
    "LLMModulesCache",
    "LLMModulesConfig",
    "LLMModulesForCausalLM",
]
