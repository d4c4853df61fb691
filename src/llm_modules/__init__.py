"""llm-modules: make a small language model smarter by wiring it to a frozen large one (arXiv 2502.08213).

The public classes load on first use (PEP 562), so `llm-modules --help` does not pay for importing torch and
transformers. Importing `llm_modules.modeling` (which any of these names does) registers the model with
`AutoConfig` and `AutoModelForCausalLM`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "LLMModulesConfig": "configuration",
    "DepthConnection": "bridge",
    "EnhancedCrossAttention": "bridge",
    "LLMModulesBridge": "bridge",
    "LLMModulesCache": "cache",
    "LLMModulesForCausalLM": "modeling",
}

if TYPE_CHECKING:
    from .configuration import LLMModulesConfig
    from .bridge import DepthConnection, EnhancedCrossAttention, LLMModulesBridge
    from .cache import LLMModulesCache
    from .modeling import LLMModulesForCausalLM


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'llm_modules' has no attribute {name!r}")
    importlib.import_module(".modeling", __name__)  # registers the Auto classes whichever name comes first
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "DepthConnection",
    "EnhancedCrossAttention",
    "LLMModulesBridge",
    "LLMModulesCache",
    "LLMModulesConfig",
    "LLMModulesForCausalLM",
    "__version__",
]
