"""GGUF files written for llama.cpp: the frozen model without its LM head, and the trained small model.

`headless_gguf`: the combined model reads the frozen model's last hidden states and never its logits, but llama.cpp
computes a model's LM head at every step (with embeddings on too). Qwen2.5-Coder-1.5B Q4_K_M's head is 191 MB of Q6_K
blocks, a fifth of what a token reads. The copy written here keeps every block byte for byte, replaces the vocabulary
by one dummy token (llama.cpp's "none" tokenizer) and the token embeddings by one zero row, and drops the head; the
tokens then come in as embedding rows that `TokenEmbeddingRows` dequantizes from the original file, the same numbers
llama.cpp's own lookup produces. Only for architectures whose llama.cpp graph reads the token embeddings at the input
alone (`HEADLESS_ARCHITECTURES`).

`small_model_gguf`: a trained Llama-architecture small model's blocks (the bridge output is its input and the new head
stays in torch, so again one dummy token), written in float32 by the gguf package and quantized by llama.cpp's own
`llama_model_quantize` (Q8_0 by default, or Q4_0).

The gguf package writes the files (the format's maintained Python writer, from llama.cpp's repository); the tensor
names come from its map of Hugging Face names.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

# llama.cpp graphs (src/models/*.cpp of the vendored llama.cpp) that use `tok_embd` only through `build_inp_embd`.
HEADLESS_ARCHITECTURES = ("llama", "qwen2", "qwen3")
# The small model's GGUF types: llama.cpp's quantized ones (by its own quantizer), or plain floats.
SMALL_FILE_TYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "f16": None, "f32": None}


def _copy_metadata(reader: Any, writer: Any, skip: tuple[str, ...]) -> None:
    import gguf

    for field in reader.fields.values():
        if field.name.startswith(skip):
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            item = field.types[-1]
            if item == gguf.GGUFValueType.STRING:
                value = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
            else:
                value = [field.parts[i].tolist()[0] for i in field.data]
            writer.add_key_value(field.name, value, kind, sub_type=item)
        elif kind == gguf.GGUFValueType.STRING:
            writer.add_key_value(field.name, bytes(field.parts[field.data[0]]).decode("utf-8"), kind)
        else:
            writer.add_key_value(field.name, field.parts[field.data[0]].tolist()[0], kind)


def _finish(writer: Any) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def headless_gguf(reader: Any, destination: str | os.PathLike) -> bool:
    """Write the GGUF file `reader` (a `gguf.GGUFReader`: parsing one costs ~7 s for Qwen2.5-Coder-1.5B, so the caller
    shares it with `TokenEmbeddingRows`) without its LM head, vocabulary and token embeddings to `destination`.

    Returns False, writing nothing, when the architecture is not in `HEADLESS_ARCHITECTURES` (the caller keeps the
    whole file). The blocks are copied as stored (quantized bytes unchanged).
    """
    import gguf

    architecture = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    if architecture not in HEADLESS_ARCHITECTURES:
        return False
    width = int(reader.fields[f"{architecture}.embedding_length"].parts[-1][0])
    writer = gguf.GGUFWriter(str(destination), architecture)
    _copy_metadata(reader, writer, ("GGUF.", "general.architecture", "tokenizer.", f"{architecture}.vocab_size"))
    writer.add_tokenizer_model("none")
    writer.add_vocab_size(1)
    for tensor in reader.tensors:
        if tensor.name.startswith("output."):  # output.weight (and a bias): not output_norm
            continue  # the LM head
        if tensor.name == "token_embd.weight":
            writer.add_tensor(tensor.name, np.zeros((1, width), np.float32))
            continue
        writer.add_tensor(tensor.name, tensor.data, raw_shape=tensor.data.shape, raw_dtype=tensor.tensor_type)
    _finish(writer)
    return True


class TokenEmbeddingRows:
    """The token embedding table of a GGUF file, read a few rows at a time: `rows(ids)` -> float32 `[len(ids), D]`.

    `reader`: the file's `gguf.GGUFReader`; the table stays in the file (memory-mapped) and each call dequantizes only
    the rows asked for, with the gguf package's dequantizers (the same block formats llama.cpp's lookup reads).
    Raises ValueError for a file without a `token_embd.weight` tensor."""

    def __init__(self, reader: Any):
        tables = [t for t in reader.tensors if t.name == "token_embd.weight"]
        if not tables:
            raise ValueError(f"{reader.data.filename}: no token_embd.weight tensor")
        self.table = tables[0]
        self.vocab_size = int(self.table.shape[-1])

    def rows(self, ids: list[int]) -> np.ndarray:
        import gguf

        picked = self.table.data[np.asarray(ids, dtype=np.int64)]
        return np.ascontiguousarray(gguf.quants.dequantize(picked, self.table.tensor_type), dtype=np.float32)


def _rows_for_rope(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder a q/k projection's output rows (or bias) from transformers' rotate-half RoPE (each head's first half
    pairs with its second half) to llama.cpp's Llama RoPE (adjacent pairs), as llama.cpp's convert_hf_to_gguf.py
    does."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def small_model_gguf(small: nn.Module, destination: str | os.PathLike, file_type: str = "q8_0") -> None:
    """Write the trained small model `small` (a transformers Llama base model, its token embeddings unused) as a GGUF
    of one dummy token, its blocks in `file_type` ("q8_0", "q4_0": quantized by llama.cpp; "f16"; "f32").

    Raises ValueError for another architecture or RoPE scaling, an unknown `file_type`, or widths llama.cpp's blocks
    of 32 cannot divide.
    """
    import gguf

    config = small.config
    if config.model_type != "llama":
        raise ValueError(f"the small model runs in llama.cpp for Llama-architecture models; this one is "
                         f"{config.model_type!r}")
    rope = getattr(config, "rope_parameters", None) or {"rope_type": "default", "rope_theta": config.rope_theta}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"the small model's RoPE scaling {rope.get('rope_type')!r} is not written to GGUF here")
    if file_type not in SMALL_FILE_TYPES:
        raise ValueError(f"file_type must be one of {tuple(SMALL_FILE_TYPES)}, got {file_type!r}")
    quantized = SMALL_FILE_TYPES[file_type]
    if quantized and (config.hidden_size % 32 or config.intermediate_size % 32):
        raise ValueError(f"{file_type.upper()} blocks rows of 32 values; the small model is {config.hidden_size} wide "
                         f"with {config.intermediate_size} in its MLP")
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    destination = Path(destination)
    plain = destination if not quantized else destination.with_suffix(".f32.gguf")
    writer = gguf.GGUFWriter(str(plain), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_causal_attention(True)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if file_type == "f16" else gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("none")
    writer.add_vocab_size(1)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, tensor in small.state_dict().items():
        if name.startswith("embed_tokens.") or name.endswith("rotary_emb.inv_freq"):
            continue
        tensor = tensor.detach().float().cpu()
        if ".q_proj." in name:
            tensor = _rows_for_rope(tensor, heads)
        elif ".k_proj." in name:
            tensor = _rows_for_rope(tensor, kv_heads)
        array = tensor.numpy()
        if file_type == "f16" and array.ndim == 2:
            array = array.astype(np.float16)
        writer.add_tensor(names.get_name("model." + name, try_suffixes=(".weight", ".bias")), array)
    writer.add_tensor("token_embd.weight", np.zeros((1, config.hidden_size), np.float32))
    _finish(writer)
    if quantized:
        try:
            _quantize(plain, destination, quantized)
        finally:
            plain.unlink(missing_ok=True)


def _quantize(source: Path, destination: Path, file_type: str) -> None:
    from .llama_cpp_source import import_llama_cpp

    lib = import_llama_cpp()
    params = lib.llama_model_quantize_default_params()
    params.ftype = getattr(lib, file_type)
    params.nthread = torch.get_num_threads()
    code = lib.llama_model_quantize(str(source).encode(), str(destination).encode(), ctypes.byref(params))
    if code != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source} ({file_type}, code {code})")
