"""Composing a combined model from pretrained causal LMs, saving what trains, and reloading it.

Split out of modeling.py, which keeps the data path (forward, generation): this is the other concern, how a
`LLMModulesForCausalLM` comes to exist and goes to disk. `CheckpointMixin` comes before `PreTrainedModel` in the
model's bases, so its `save_pretrained`/`from_pretrained` replace transformers' (which would write or look for the
frozen weights too). The methods use `cls(config, large_model=..., small_model=...)`, `trained_parts` and
`trained_state_dict` of the model class.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from .configuration import FORMAT_VERSION, LLMModulesConfig
from .head_init import init_head_from_small, small_output_embeddings
from .quantization import UnsupportedLayerError
from .sources import (
    ModelSourceError,
    NoGGUFFileError,
    as_dtype,
    check_same_vocabulary,
    load_base_model,
    load_config,
    load_frozen_model,
    load_tokenizer,
    resolve_model_source,
)

if TYPE_CHECKING:
    from .modeling import LLMModulesForCausalLM

WEIGHTS_NAME = "model.safetensors"
logger = logging.getLogger(__name__)


def unsharded_class(model: torch.nn.Module) -> type:
    """The model's own class: FSDP2's `fully_shard` swaps it for a subclass named FSDP<name>."""
    cls = type(model)
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return cls
    return cls.__bases__[-1] if issubclass(cls, FSDPModule) else cls


class CheckpointMixin:
    """`from_large_and_small`, `save_pretrained`, `from_pretrained` and `load_trained_weights` of
    `modeling.LLMModulesForCausalLM`."""

    @classmethod
    def from_large_and_small(
        cls,
        large_model_name_or_path: str | os.PathLike | list[str | os.PathLike],
        small_model_name_or_path: str | os.PathLike,
        *,
        dtype: torch.dtype | str | None = None,
        large_dtype: torch.dtype | str | None = None,
        large_quantization: str | None = None,
        device_map: Any = None,
        quantization_config: Any = None,
        trust_remote_code: bool = False,
        **config_overrides: Any,
    ) -> "LLMModulesForCausalLM":
        """Compose a combined model from pretrained causal LMs (hub ids, local dirs or .gguf files).

        `large_model_name_or_path` is one frozen source or a list of them; several sources must share one tokenizer
        (the first one's is the model's; ValueError names both sources when a vocabulary differs). Each source's
        base transformer is loaded frozen (its LM head is never loaded); the small model's base
        transformer is loaded pretrained, or built from its config when `small_init="scratch"`. `dtype` (default
        float32) applies to the trained parts, `large_dtype` (default: `dtype` when given, else the checkpoint's own) to
        the frozen model; `device_map` is passed to the large model and the rest follows it. `quantization_config` (e.g. `BitsAndBytesConfig(load_in_8bit=True)` or
        `load_in_4bit=True`; needs bitsandbytes and a GPU) loads the frozen model quantized to save memory; the trained
        parts stay in `dtype`. `large_quantization="int8"` quantizes the frozen model for the CPU instead
        (`quantization.quantize_frozen_model`; loaded in bfloat16 first unless `large_dtype` says otherwise).
        `config_overrides` are `LLMModulesConfig` options.
        """
        dtype = config_overrides.pop("torch_dtype", dtype)  # the transformers 4.x name, still common in scripts
        large_dtype = large_dtype if large_dtype is not None else dtype
        names = large_model_name_or_path if isinstance(large_model_name_or_path, (list, tuple)) else [large_model_name_or_path]
        if not names:
            raise ValueError("large_model_name_or_path is an empty list: name at least one frozen source")
        # Local paths are recorded absolute, so the saved model reloads from any working directory.
        large_sources = [resolve_model_source(name, "large model") for name in names]
        small_source = resolve_model_source(small_model_name_or_path, "small model")
        tokenizer = load_tokenizer(large_sources[0], trust_remote_code=trust_remote_code)
        for source in large_sources[1:]:  # before loading any weights
            check_same_vocabulary(large_sources[0], tokenizer, source, load_tokenizer(source, trust_remote_code=trust_remote_code))
        sources = [
            load_frozen_model(
                source, large_dtype, large_quantization, device_map=device_map,
                quantization_config=quantization_config, trust_remote_code=trust_remote_code,
            )
            for source in large_sources
        ]
        large = sources[0]
        # Trained parts default to float32 whatever the checkpoint holds (a bf16 checkpoint would otherwise train in
        # bf16 next to a float32 bridge); `dtype="auto"` keeps the checkpoint's.
        trained_dtype = torch.float32 if dtype is None else as_dtype(dtype)
        if config_overrides.get("small_init", "pretrained") == "pretrained":
            small = load_base_model(small_source, dtype=trained_dtype or "auto", trust_remote_code=trust_remote_code)
            small_config = small.config
        else:
            small = None
            small_config = load_config(small_source, trust_remote_code=trust_remote_code)
        special = {
            "vocab_size": max(len(tokenizer), large.config.vocab_size),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        }
        config = LLMModulesConfig(
            large_config=large.config,
            additional_large_configs=[source.config for source in sources[1:]] or None,
            small_config=small_config,
            # A string for one source, so one-source configs read as they always have.
            large_model_name_or_path=large_sources if len(large_sources) > 1 else large_sources[0],
            small_model_name_or_path=small_source,
            **{**special, **config_overrides},
        )
        # Read before the combined model frees the small model's token embeddings (tied models' output embeddings).
        small_head = None
        if config.head_init == "small":
            small_head = small_output_embeddings(small, small_source, trust_remote_code)
        model = cls(config, large_model=sources, small_model=small)
        device = next(iter(large.parameters()), torch.empty(0)).device  # a llama.cpp source holds none: CPU
        for part in model.trained_parts():
            part.to(device=device, dtype=trained_dtype)
        if small_head is not None:
            copied = init_head_from_small(model.lm_head.weight, tokenizer,
                                          load_tokenizer(small_source, trust_remote_code=trust_remote_code), small_head)
            logger.info(f"head_init='small': {copied:,} of {config.vocab_size:,} head rows start from the small "
                        "model's output embeddings")
        model.tokenizer = tokenizer
        return model

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        is_main_process: bool = True,
        state_dict: dict[str, torch.Tensor] | None = None,
        weights: bool = True,
        **kwargs: Any,
    ) -> None:
        """Write config.json, the trained weights as safetensors and the large tokenizer; never the frozen weights.
        `weights=False` writes all but the weights (a sharded checkpoint holds them in its own format).

        Takes the arguments `Trainer` passes: `state_dict` (a gathered full state dict under FSDP/DeepSpeed, of
        which only the trained tensors are kept) and `is_main_process`. Weights are always safetensors, so
        `safe_serialization` and the sharding options are accepted and ignored. `push_to_hub=True` (with `repo_id`,
        `token`, `private`, `commit_message`) uploads the saved dir.
        """
        if not is_main_process:
            return
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        if not self.config.large_model_name_or_path:
            raise ValueError(
                "config.large_model_name_or_path is empty: set it to the hub id or directory of the frozen model so "
                "that from_pretrained can reload it"
            )
        self.config.architectures = [unsharded_class(self).__name__]
        self.config.format_version = FORMAT_VERSION  # the weights below are in the current layout
        self.config.save_pretrained(directory)
        self.generation_config.save_pretrained(directory)
        if not weights:
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(directory)
            return
        trained = self.trained_state_dict()
        if state_dict is not None:
            trained = {name: state_dict[name] for name in trained}
        tensors = {name: t.detach().contiguous().cpu() for name, t in trained.items()}
        # Write then rename, so a crash mid-save never leaves a truncated weights file under the real name.
        tmp = directory / (WEIGHTS_NAME + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt", "llm_modules": "trained-only"})
        os.replace(tmp, directory / WEIGHTS_NAME)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)
        if kwargs.get("push_to_hub"):
            from huggingface_hub import create_repo, upload_folder

            repo_id = kwargs.get("repo_id") or directory.name
            token = kwargs.get("token")
            create_repo(repo_id, exist_ok=True, private=kwargs.get("private"), token=token)
            upload_folder(repo_id=repo_id, folder_path=directory, commit_message=kwargs.get("commit_message"), token=token)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        large_model_name_or_path: str | os.PathLike | list[str | os.PathLike] | None = None,
        dtype: torch.dtype | str | None = None,
        large_dtype: torch.dtype | str | None = None,
        large_quantization: str | None = None,
        trained_quantization: str | None = None,
        device_map: Any = None,
        quantization_config: Any = None,
        trust_remote_code: bool = False,
        **kwargs: Any,
    ) -> "LLMModulesForCausalLM":
        """Reload a saved combined model: the frozen model from the recorded id/path, the rest from the dir.

        `large_model_name_or_path` points at the frozen model when it moved since saving (a list, one per source, for
        a model of several sources); `large_dtype`,
        `large_quantization` and `quantization_config` set its precision, as in `from_large_and_small`.
        `trained_quantization` ("int8"; "gguf" or "gguf-q4_0": the small model's blocks in llama.cpp) prepares the
        trained parts for inference on the CPU (`quantization.quantize_trained_parts`: the model can then neither
        train nor be saved).
        """
        directory = Path(resolve_model_source(pretrained_model_name_or_path, "combined model"))
        if not directory.is_dir():
            if directory.is_file():
                raise ModelSourceError(f"{directory}: a single file, not a saved llm-modules model dir")
            from huggingface_hub import snapshot_download

            directory = Path(snapshot_download(str(pretrained_model_name_or_path), **kwargs))
        config_path = directory / "config.json"
        if json.loads(config_path.read_text()).get("model_type") != LLMModulesConfig.model_type:
            raise ValueError(f"{config_path} is not an llm-modules model (model_type is not 'llm_modules')")
        config = LLMModulesConfig.from_pretrained(directory)
        if large_model_name_or_path is not None:
            given = large_model_name_or_path
            names = [str(n) for n in given] if isinstance(given, (list, tuple)) else [str(given)]
            what = "large_model_name_or_path"
        else:
            names, what = config.large_model_names_or_paths, f"large_model_name_or_path (recorded in {config_path})"
        if len(names) != config.num_sources:
            raise ValueError(f"{what} names {len(names)} frozen models; the saved model has {config.num_sources} sources")
        hint = ("point at where it is now with LLMModulesForCausalLM.from_pretrained(dir, large_model_name_or_path=...) "
                "(CLI: --large-model PATH)")
        sources = []
        for index, name in enumerate(names):
            try:
                # A recorded path that is gone fails here, without asking the hub for it.
                source = resolve_model_source(name, what)
            except ModelSourceError as error:
                raise ModelSourceError(f"{error}; {hint}") from None
            try:
                sources.append(load_frozen_model(
                    source, large_dtype if large_dtype is not None else dtype, large_quantization,
                    device_map=device_map, quantization_config=quantization_config, trust_remote_code=trust_remote_code,
                ))
            except (UnsupportedLayerError, NoGGUFFileError):
                raise  # the model is where it should be; large_quantization cannot take it
            except (OSError, ValueError) as error:
                raise ModelSourceError(f"cannot load {what} {source!r}: {error}; {hint}") from error
            names[index] = source  # recorded as resolved (absolute)
        if large_model_name_or_path is not None:
            config.large_model_name_or_path = names if len(names) > 1 else names[0]
        model = cls(config, large_model=sources)
        model.load_trained_weights(directory / WEIGHTS_NAME)
        device = next(iter(sources[0].parameters()), torch.empty(0)).device  # a llama.cpp source holds none: CPU
        for part in model.trained_parts():
            part.to(device=device, dtype=as_dtype(dtype))
        if trained_quantization is not None:
            from .quantization import quantize_trained_parts

            quantize_trained_parts(model, trained_quantization)
        try:
            model.tokenizer = AutoTokenizer.from_pretrained(directory)
        except (OSError, ValueError):
            model.tokenizer = None
        model.eval()
        return model

    def load_trained_weights(self, path: str | os.PathLike) -> None:
        """Load a trained-only safetensors file; every tensor must match the config by name and shape."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no trained weights at {path}")
        state = load_file(str(path))
        if self.config.format_version == 0:  # one source, its bridge saved as `bridge.`
            state = {"bridges.0." + k[len("bridge."):] if k.startswith("bridge.") else k: v for k, v in state.items()}
        expected = self.trained_state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        mismatched = [
            f"{name} (file {tuple(state[name].shape)}, config {tuple(expected[name].shape)})"
            for name in sorted(set(state) & set(expected))
            if state[name].shape != expected[name].shape
        ]
        if missing or unexpected or mismatched:
            problems = []
            for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
                if names:
                    shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
                    problems.append(f"{label}: {shown}")
            raise ValueError(f"weights in {path} do not fit its config: " + "; ".join(problems))
        params = dict(self.named_parameters())
        with torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(tensor)


__all__ = ["CheckpointMixin", "WEIGHTS_NAME"]
