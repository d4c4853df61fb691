"""What the vLLM model supports, said before anything loads; the frozen source's weights. No vLLM import here, so
the checks run (and are tested) where vLLM is not installed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from ..configuration import LLMModulesConfig

# Hugging Face model types whose base decoder stack vLLM 0.32 has as a class taking `inputs_embeds`
# (module, class). vLLM has no GPT-Neo (nor GPT-Neo-X under that type), so a GPT-Neo small model cannot run there.
SUPPORTED_DECODERS = {
    "qwen2": ("vllm.model_executor.models.qwen2", "Qwen2Model"),
    "llama": ("vllm.model_executor.models.llama", "LlamaModel"),
}
# Head sizes of vLLM's CPU attention backend (vllm/v1/attention/backends/cpu_attn.py); other backends take these too.
BACKEND_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


class UnsupportedForVllm(ValueError):
    """A saved model this vLLM integration cannot serve; the message says why and what to use instead."""


def padded_head_size(size: int) -> int:
    """The smallest backend head size >= `size` (the bridge's heads are zero-padded to it), or `size` itself."""
    return next((s for s in BACKEND_HEAD_SIZES if s >= size), size)


def check_supported(config: LLMModulesConfig) -> None:
    """Raise `UnsupportedForVllm` unless the model is one source + the paper's bridge + a supported small model."""
    problems = []
    if config.num_sources != 1:
        problems.append(
            f"it has {config.num_sources} frozen sources; the vLLM model runs one (each further source is a whole "
            "decoder stack with its own KV cache, not built yet): serve it with `llm-modules serve`"
        )
    if config.depth_connections:
        problems.append(
            "it has depth connections, which read inner layers of the source and rewrite inner layers of the small "
            "model; vLLM's decoder stacks expose neither: serve it with `llm-modules serve`"
        )
    for role, sub in (("source", config.large_config), ("small model", config.small_config)):
        if sub.model_type not in SUPPORTED_DECODERS:
            problems.append(
                f"its {role} is a {sub.model_type!r} model; vLLM 0.32 has decoder stacks for "
                f"{', '.join(sorted(SUPPORTED_DECODERS))} here (it has no GPT-Neo at all)"
            )
    if not config.causal_cross_attention:
        problems.append("causal_cross_attention=False (an ablation that reads later tokens) cannot run on a KV cache")
    if problems:
        raise UnsupportedForVllm("this model cannot be served on vLLM: " + "; ".join(problems))


def source_weights(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The frozen source's base-transformer tensors from a plain Hugging Face dir, named as in the base model
    (`layers.0.self_attn.q_proj.weight`, ...; the LM head is skipped). A `.gguf` file raises UnsupportedForVllm."""
    from safetensors import safe_open

    if path.suffix == ".gguf" or not path.is_dir():
        raise UnsupportedForVllm(
            f"the source {path} is not a plain Hugging Face dir: the vLLM model reads safetensors dirs only "
            "(`llm-modules fetch` keeps one beside each .gguf, under hf/); point the saved model at it"
        )
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UnsupportedForVllm(f"the source {path} has no .safetensors files")
    for file in files:
        with safe_open(str(file), framework="pt") as reader:
            for name in reader.keys():
                if name.startswith("lm_head."):
                    continue
                yield name.removeprefix("model."), reader.get_tensor(name)


def saved_config(directory: Path) -> LLMModulesConfig:
    """The config of a saved combined model dir (ValueError when it is not one)."""
    raw = json.loads((directory / "config.json").read_text())
    if raw.get("model_type") != LLMModulesConfig.model_type:
        raise ValueError(f"{directory} is not a saved llm-modules model (model_type is {raw.get('model_type')!r})")
    return LLMModulesConfig.from_pretrained(directory)
