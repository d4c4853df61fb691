"""Where models come from: one rule for telling a local path from a hub id, one error for "not a model", and the
loaders (plain, GGUF, frozen in a dtype or int8).

Every entry point that takes a model name (`from_large_and_small`, `from_pretrained(..., large_model_name_or_path=)`,
the CLI's `--large/--small/--model/--large-model`) goes through `resolve_model_source`, so a mistyped path fails at
once with the same message instead of being sent to the hub, and local paths are recorded absolute.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

# Suffixes that only a file name has (a hub id never ends in them).
FILE_SUFFIXES = (".gguf", ".json", ".jsonl", ".parquet", ".safetensors", ".bin", ".yaml", ".yml")


class ModelSourceError(OSError):
    """A named model is missing, or what is there is not a model (no config.json, not a GGUF file)."""


def looks_like_path(name: str | os.PathLike) -> bool:
    """True when `name` can only be a local path: it exists, is absolute, starts with `.` or `~`, has a file suffix,
    or has more than one `/` (a hub id is `owner/name`, never deeper) or a backslash."""
    text = str(name)
    return (
        Path(text).expanduser().exists()
        or os.path.isabs(text)
        or text.startswith((".", "~"))
        or text.lower().endswith(FILE_SUFFIXES)
        or text.count("/") > 1
        or "\\" in text
    )


def resolve_model_source(name: str | os.PathLike, what: str = "model") -> str:
    """The absolute path of a local model (a dir with config.json, or a .gguf file), or `name` unchanged when it can
    only be a hub id. `what` names the argument in errors (e.g. `--large`).

    Raises `ModelSourceError` when `name` looks like a path (see `looks_like_path`) but is missing, or is a dir
    without config.json, or a file that is not GGUF.
    """
    text = str(name)
    if not looks_like_path(text):
        return hub_or_catalogue_model(text, what)
    path = Path(text).expanduser()
    if not path.exists():
        raise ModelSourceError(f"{what} {text}: no such file or directory")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(
                f"{what} {text}: not a model directory (no config.json; expected a Hugging Face model dir, "
                f"a .gguf file or a hub id)"
            )
    elif path.suffix.lower() != ".gguf":
        raise ModelSourceError(f"{what} {text}: not a model (expected a model directory, a .gguf file or a hub id)")
    return str(path.resolve())


def hub_or_catalogue_model(name: str, what: str = "model") -> str:
    """`name` (not a local path) checked before any hub call: a model `llm-modules fetch` fetched (its plain dir), or
    a hub id `owner/name`, in the local cache when the hub is offline (`HF_HUB_OFFLINE=1`).

    Raises `ModelSourceError` for a name without `/` that is neither a folder here nor a fetched model (with the
    closest folders here: such a name is a mistyped folder far more often than one of the hub's few legacy ids),
    and for a hub id missing from the cache while the hub is offline (transformers would retry, then blame the
    connection).
    """
    import difflib

    from huggingface_hub import constants, try_to_load_from_cache

    if "/" not in name:
        from .fetch import catalogue, fetched_model

        if name in catalogue():
            found = fetched_model(name)
            if found is None:
                raise ModelSourceError(f"{what} {name}: not fetched yet: run `llm-modules fetch {name}` first")
            return str(found.plain)
        folders = [p.name for p in Path.cwd().iterdir() if p.is_dir() and not p.name.startswith(".")]
        close = difflib.get_close_matches(name, folders, n=3, cutoff=0.6)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise ModelSourceError(
            f"{what} {name}: no such folder here{hint}; a hub model is named owner/name, a fetched one as "
            f"`llm-modules fetch --list` shows"
        )
    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(name, "config.json"), str):
        raise ModelSourceError(
            f"{what} {name}: not in the local Hugging Face cache, and the hub is offline (HF_HUB_OFFLINE=1)"
        )
    return name


# ---- GGUF files as sources ---------------------------------------------------------------------------------------

GGUF_PACKAGE = "pip install 'gguf>=0.10,<1'"  # a dependency of ours: missing only from a broken install


def is_gguf(source: str | os.PathLike) -> bool:
    return str(source).lower().endswith(".gguf")


def check_gguf_file(path: str | os.PathLike) -> str:
    """Check that `path` is a whole GGUF file of an architecture transformers can read; return that architecture.

    Raises `ImportError` when the `gguf` package is missing (naming the extra to install) and `ModelSourceError` for
    a file that is not GGUF, is truncated (shorter than its own tensor table says) or corrupt, or holds an
    architecture transformers' GGUF reader lacks. Only the header and the tensor table are read (with transformers'
    reader's table functions, private but pinned with transformers <5.25 and tested: gguf's own `GGUFReader` builds
    every tokenizer string and takes seconds, and the public `GgufHeader` refuses block types (Q5_0) that the
    dequantising loader reads), well under a second.
    """
    import struct

    path = Path(path)
    try:
        import gguf
    except ImportError as error:
        raise ImportError(f"reading {path} needs the gguf package: {GGUF_PACKAGE}") from error
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    from transformers.integrations.gguf.reader import _mapped, _read_metadata, _read_tensor_table

    size = path.stat().st_size
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ModelSourceError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        blob = _mapped(str(path))
        metadata, tensor_count, position = _read_metadata(blob, str(path))
        tensors, position = _read_tensor_table(blob, tensor_count, position)
        alignment = metadata.get("general.alignment", 32)
        data_start = -(-position // alignment) * alignment
        needed = data_start
        for name, shape, ggml_type, offset in tensors:
            block_elements, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
            elements = 1
            for dim in shape:
                elements *= dim
            needed = max(needed, data_start + offset + elements // block_elements * block_bytes)
    except (ValueError, IndexError, KeyError, struct.error) as error:  # the reader's words for a short or damaged file
        raise ModelSourceError(f"{path}: truncated or corrupt GGUF file ({size:,} bytes; {error})") from None
    if needed > size:
        raise ModelSourceError(f"{path}: truncated GGUF file ({size:,} bytes; its tensor table needs {needed:,})")
    architecture = metadata["general.architecture"]
    readable = sorted(set(GGUF_CONFIG_MAPPING) - {"general", "tokenizer"})
    if architecture not in readable:
        import transformers

        raise ModelSourceError(
            f"{path}: architecture {architecture!r} cannot be read from GGUF by transformers "
            f"{transformers.__version__} (it reads: {', '.join(readable)})"
        )
    return architecture


def gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of the GGUF file `path` (`check_gguf_file` it first), read without the tensors."""
    from transformers.integrations.gguf.reader import _mapped, _read_metadata

    return _read_metadata(_mapped(str(path)), str(path))[0]


class NoGGUFFileError(ValueError):
    """`large_quantization="gguf"` for a frozen model that has no GGUF file (bad input: exit code 2)."""


def gguf_for_source(source: str) -> Path:
    """The GGUF file to run with llama.cpp for a frozen source: the file itself, or for a dir `llm-modules fetch`
    made (`<name>/hf`) the GGUF its manifest names beside it. Raises NoGGUFFileError otherwise."""
    path = Path(source)
    if path.suffix.lower() == ".gguf":
        return path
    manifest = path.parent / "manifest.json"
    if path.name == "hf" and manifest.is_file():
        name = json.loads(manifest.read_text()).get("gguf_file")
        if name and (path.parent / name).is_file():
            return path.parent / name
    raise NoGGUFFileError(f"large_quantization='gguf' runs the frozen model in llama.cpp from a .gguf file; {source} "
                          "is not one: pass the .gguf file as the large model (--large-model FILE.gguf)")


def pretrained_kwargs(source: str) -> tuple[str, dict]:
    """(what to pass to `from_pretrained`, extra keyword arguments): a .gguf file becomes its folder + `gguf_file`."""
    if is_gguf(source):
        check_gguf_file(source)
        path = Path(source)
        return str(path.parent), {"gguf_file": path.name}
    return source, {}


def load_base_model(source: str, *, trust_remote_code: bool = False, **kwargs: Any) -> PreTrainedModel:
    """The base transformer (no LM head) of a model dir, hub id or .gguf file (`resolve_model_source` first).

    A GGUF file is dequantised tensor by tensor straight into `dtype` by transformers' GGUF reader, so
    `dtype=torch.bfloat16` never holds a float32 copy of the whole model (only of the tensor being converted).
    `kwargs` go to `AutoModel.from_pretrained` (dtype, device_map, quantization_config).
    """
    from transformers import AutoModel

    name, extra = pretrained_kwargs(source)
    if extra and kwargs.get("quantization_config") is not None:
        raise ValueError(f"{source}: a GGUF source is dequantised on load; quantization_config cannot be combined with it")
    with quiet_gguf_quantizer():
        model = AutoModel.from_pretrained(name, trust_remote_code=trust_remote_code, **extra, **kwargs)
    return plain_weights(model) if extra else model


def load_causal_lm(source: str, *, trust_remote_code: bool = False, **kwargs: Any) -> PreTrainedModel:
    """Like `load_base_model`, with the LM head (`AutoModelForCausalLM`)."""
    from transformers import AutoModelForCausalLM

    name, extra = pretrained_kwargs(source)
    with quiet_gguf_quantizer():
        model = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=trust_remote_code, **extra, **kwargs)
    return plain_weights(model) if extra else model


def load_tokenizer(source: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer of a model dir, hub id or .gguf file (a GGUF file holds its tokenizer and chat template)."""
    from transformers import AutoTokenizer

    name, extra = pretrained_kwargs(source)
    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code, **extra)
    if extra:
        restore_gguf_normalizer(tokenizer, source)
    return tokenizer


# The normalizer a model's own Hugging Face tokenizer has and transformers' GGUF tokenizer conversion leaves out
# (5.24), by the GGUF's `tokenizer.ggml.pre` (llama.cpp's name for the pre-tokenizer). Qwen2's tokenizer.json (Qwen2,
# Qwen2.5 and their Coder models) normalizes to NFC: without it a decomposed accent tokenizes byte by byte, text the
# model never saw in training (transformers#31630; llama.cpp's own tokenizer skips it too, llama.cpp#7476).
GGUF_NORMALIZERS = {"qwen2": "NFC"}


def restore_gguf_normalizer(tokenizer: PreTrainedTokenizerBase, path: str | os.PathLike) -> None:
    """Give a tokenizer read from the GGUF file `path` the normalizer its model was trained with (`GGUF_NORMALIZERS`)
    when the conversion left it out."""
    from tokenizers import normalizers

    wanted = GGUF_NORMALIZERS.get(gguf_metadata(path).get("tokenizer.ggml.pre"))
    if wanted is not None and tokenizer.backend_tokenizer.normalizer is None:
        tokenizer.backend_tokenizer.normalizer = getattr(normalizers, wanted)()


def load_config(source: str, *, trust_remote_code: bool = False) -> PretrainedConfig:
    """The config of a model dir, hub id or .gguf file."""
    from transformers import AutoConfig

    name, extra = pretrained_kwargs(source)
    return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code, **extra)


@contextlib.contextmanager
def quiet_gguf_quantizer() -> Iterator[None]:
    """Silence transformers' GGUF quantizer while loading. For the architectures it cannot keep packed (Qwen2 and
    Llama in 5.24) it still warns that "the weights stay quantized regardless" and suggests float32, while its
    legacy path dequantises every tensor into the dtype asked: advice that would double the memory for nothing."""
    from transformers.utils import logging as hf_logging

    logger = hf_logging.get_logger("transformers.quantizers.quantizer_gguf")
    level = logger.level
    logger.setLevel(hf_logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def plain_weights(model: PreTrainedModel) -> PreTrainedModel:
    """Forget that a model came from GGUF once its weights are plain tensors.

    transformers' legacy GGUF path dequantises every tensor but keeps its GGUF quantizer on the model and
    `quantization_config` on the config, so `save_pretrained` refuses ("quantized with gguf and is not
    serializable") and a composite config would carry the GGUF settings into every saved combined model. The
    legacy path leaves no packed tensors behind (checked here), so both are dropped.
    """
    import torch

    packed = [name for name, p in model.named_parameters() if p.dtype in (torch.uint8, torch.int8)]
    if packed:  # transformers' newer packed path keeps GGUF blocks; those are not plain weights
        raise ValueError(f"GGUF weights were kept packed ({packed[0]}, ...); load with dtype float32 or bfloat16")
    model.hf_quantizer = None
    model.is_quantized = False
    for config in (model.config, *(getattr(model.config, k, None) for k in getattr(model.config, "sub_configs", {}))):
        if config is not None and hasattr(config, "quantization_config"):
            del config.quantization_config
    return model


def check_same_vocabulary(first: str, first_tokenizer: Any, other: str, other_tokenizer: Any) -> None:
    """Raise ValueError naming both sources, their vocabulary sizes and the first differing token, when two frozen
    sources do not share one tokenizer (their hidden states would then describe different token sequences)."""
    vocab_a, vocab_b = first_tokenizer.get_vocab(), other_tokenizer.get_vocab()
    if vocab_a == vocab_b:
        return
    ids_a = {i: t for t, i in vocab_a.items()}
    ids_b = {i: t for t, i in vocab_b.items()}
    index = next(i for i in sorted(set(ids_a) | set(ids_b)) if ids_a.get(i) != ids_b.get(i))
    raise ValueError(
        f"frozen sources must share one tokenizer: {first} has {len(vocab_a)} tokens, {other} has {len(vocab_b)}; "
        f"first difference at id {index}: {ids_a.get(index)!r} vs {ids_b.get(index)!r}"
    )


def load_frozen_model(
    source: str, dtype: torch.dtype | str | None, quantization: str | None, **kwargs: Any
) -> PreTrainedModel:
    """The frozen base transformer in `dtype`, or int8/fp16 (`quantization.quantize_frozen_model`) from bfloat16
    weights, or `quantization="gguf"`: run by llama.cpp on the source's GGUF file (`llama_cpp_source`; `dtype` does
    not apply, the file's blocks are used as they are). Raises ValueError for an unknown `quantization`, before
    loading anything, and for "gguf" with a GPU `device_map`, a `quantization_config` or a source without a GGUF."""
    import torch

    if quantization is None:
        return load_base_model(source, dtype=as_dtype(dtype), **kwargs)
    if quantization == "gguf":
        from .llama_cpp_source import LlamaCppSource

        if kwargs.get("quantization_config") is not None or kwargs.get("device_map") not in (None, "cpu"):
            raise ValueError("large_quantization='gguf' runs the frozen model in llama.cpp on the CPU; "
                             "it takes neither quantization_config nor device_map")
        gguf_file = gguf_for_source(source)
        config = load_config(str(gguf_file), trust_remote_code=kwargs.get("trust_remote_code", False))
        return LlamaCppSource(gguf_file, config)
    from .quantization import LARGE_QUANTIZATIONS, quantize_frozen_model

    if quantization not in LARGE_QUANTIZATIONS:  # before loading gigabytes
        raise ValueError(f"large_quantization must be one of {(*LARGE_QUANTIZATIONS, 'gguf')}, got {quantization!r}")
    large = load_base_model(source, dtype=as_dtype(dtype) or torch.bfloat16, **kwargs)
    return quantize_frozen_model(large, quantization)


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype from its name (`"float16"`), None for None or `"auto"` (the checkpoint's own dtype)."""
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    return getattr(torch, dtype)
