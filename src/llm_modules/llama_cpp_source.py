"""Models run by llama.cpp on GGUF files' own quantized blocks: the frozen source (`large_quantization="gguf"`,
`LlamaCppSource`) and the trained small model (`trained_quantization="gguf"`, `LlamaCppSmallModel`).

Decoding one token on a CPU reads every weight once. Our own int8 forward of Qwen2.5-Coder-1.5B costs 2.2-2.6x
llama.cpp's whole Q4_K_M token (docs/performance.md), and torch's 4-bit CPU kernels were no faster than our int8, so
the frozen model runs in llama.cpp itself, through llama-cpp-python (the maintained binding of llama.cpp's C API;
its `Llama` class is for text in and text out, so its low-level functions are used). With embeddings on and pooling
"none", llama.cpp returns each token's last hidden state after the final norm: what transformers'
`last_hidden_state` is, and what the bridge (or, for the small model, the new head) reads. The small model's ~5,000
small torch calls per token cost as much as its weights (docs/performance.md), so it can run there too, fed the
bridge output as embedding rows; the bridge and the head stay in torch.

The KV cache lives inside llama.cpp's context, one sequence id per batch row. `LlamaCppCacheLayer` (a model's part
of the combined model's cache) holds the rows' sequence ids and the inputs each row was given, so the cache's length,
dropping rows (`batch_select_indices`: the server's finished requests) and several live caches at once work. When
the context runs out of cells it is rebuilt twice as large and every live row's inputs are decoded again. Reordering
(beam search), cropping (assisted decoding) and repeating rows are refused with a message.

Numbers differ from the torch model on the same weights: llama.cpp multiplies Q4_K/Q6_K blocks with activations
quantized to 8 bits, and its batched prompt and its one-token steps take different kernels (cached vs recomputed
hidden states agree to about 1% of their largest value on Qwen2.5-Coder-1.5B Q4_K_M; F32 GGUF weights: 1e-4).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import tempfile
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer
from transformers.modeling_outputs import BaseModelOutputWithPast

LLAMA_CPP_PACKAGE = "pip install 'llm-modules[llama-cpp]'"  # builds llama-cpp-python from source (docs/performance.md)
# Sequence ids one context serves (llama.cpp's LLAMA_MAX_SEQ is 256); rows of every live cache together.
MAX_SEQUENCES = 256
FIRST_CONTEXT = 4096  # KV cells of a new context (all rows together); doubled as needed (llama.cpp pads to 256)
BATCH_TOKENS = 512  # tokens per llama_decode call at most (llama.cpp takes no more than the context's cells)


logger = logging.getLogger(__name__)
_log_callback = None  # llama.cpp's log callback, kept alive here while llama.cpp may call it


def import_llama_cpp() -> Any:
    """The `llama_cpp` module, llama.cpp's log sent to this module's logger at DEBUG, or ImportError naming the extra
    to install.

    llama.cpp writes every load step to stderr, and at error level some that do not apply here (a GGUF tokenizer
    token "not control-type": its tokenizer is never used; "default pooling_type is [-1], but [0] was specified":
    pooling "none" is what is asked). Each failure that matters also comes back as a code this module turns into an
    exception, so the log is for debugging only."""
    global _log_callback
    try:
        import llama_cpp
    except ImportError as error:
        message = f"'gguf' quantization runs models in llama.cpp: {LLAMA_CPP_PACKAGE}"
        raise ImportError(message) from error
    if _log_callback is None:
        @llama_cpp.llama_log_callback
        def to_debug_log(level: int, text: bytes, user_data: Any) -> None:
            logger.debug("llama.cpp: %s", text.decode("utf-8", "replace").rstrip())

        _log_callback = to_debug_log
        llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
    return llama_cpp


class LlamaCppCacheLayer(DynamicLayer):
    """A llama.cpp model's KV cache inside the combined model's cache: the llama.cpp sequence id of each batch row and
    the inputs it was given (`[(position, token id or embedding row), ...]` per row, padding left out), the keys and
    values being in llama.cpp."""

    def __init__(self) -> None:
        super().__init__()
        self.length = 0  # columns seen, padding included: what `get_seq_length` reports, as for a DynamicLayer
        self.sequences: list[int] = []  # kept as one list object: the finalizer releases what it holds then
        self.inputs: list[list[tuple[int, Any]]] = []  # per row: (position, token id or embedding row)
        self.source: LlamaCppModel | None = None

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise RuntimeError("a llama.cpp model keeps its keys and values inside llama.cpp")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("beam search is not available with a model in llama.cpp ('gguf' quantization: its "
                                  "KV cache is not reordered); use greedy decoding or sampling")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("cropping the cache (assisted decoding, prompt lookup) is not available with "
                                  "a model in llama.cpp ('gguf' quantization)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats != 1:
            raise NotImplementedError("repeating cached rows is not available with a model in llama.cpp ('gguf' "
                                      "quantization)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        keep = [int(i) for i in indices]
        kept = set(keep)
        dropped = [s for i, s in enumerate(self.sequences) if i not in kept]
        if self.source is not None and dropped:
            self.source.release(dropped)
        self.sequences[:] = [self.sequences[i] for i in keep]
        self.inputs = [self.inputs[i] for i in keep]

    def offload(self) -> None:  # nothing held in torch
        pass

    def prefetch(self) -> None:
        pass


class LlamaCppCache(Cache):
    """The cache of one llama.cpp source: one `LlamaCppCacheLayer` (the combined cache takes its `layers`)."""

    def __init__(self) -> None:
        super().__init__(layers=[LlamaCppCacheLayer()])


class LlamaCppModel(nn.Module):
    """A GGUF model run by llama.cpp with its KV cache, one sequence id per batch row; what the frozen source
    (`LlamaCppSource`, token ids in) and the small model (`LlamaCppSmallModel`, embeddings in) share. Both return each
    token's last hidden state after the final norm (embeddings on, pooling "none"), float32, zeros at padding.

    A row's inputs are kept as `(position, item)` pairs in its cache layer (an item: a token id, or an embedding row
    `[D_in]`), so a context that runs out of cells is rebuilt twice as large and every live row replayed into it.
    """

    def __init__(self, gguf_file: str | os.PathLike, config: Any, threads: int | None = None, input_width: int = 0,
                 name: str | None = None):
        """`input_width`: 0 to give llama.cpp token ids, else the width of the embedding rows it is given. `name`: the
        file named in errors (default `gguf_file`)."""
        super().__init__()
        self.llama_cpp = import_llama_cpp()
        self.gguf_file = str(gguf_file)
        self.name = name or self.gguf_file
        self.config = config
        self.threads = threads
        self.input_width = input_width
        lib = self.llama_cpp
        lib.llama_backend_init()
        self._model = lib.llama_model_load_from_file(self.gguf_file.encode(), lib.llama_model_default_params())
        if not self._model:
            raise ValueError(f"{self.name}: llama.cpp could not load this GGUF file")
        self.hidden_size = lib.llama_model_n_embd(self._model)
        if self.hidden_size != config.hidden_size:
            raise ValueError(f"{self.name}: llama.cpp reads width {self.hidden_size}, its config says "
                             f"{config.hidden_size}")
        # llama.cpp's context (made at the first call, replaced as it grows) in a list the finalizer reads at exit.
        self._holder: list = [None]
        self._cells = 0
        self._chunk = BATCH_TOKENS  # tokens per llama_decode call in this context
        self._batch = lib.llama_batch_init(BATCH_TOKENS, input_width, 1)
        self._embd = (np.ctypeslib.as_array(self._batch.embd, shape=(BATCH_TOKENS, input_width))
                      if input_width else None)
        self._free = list(range(MAX_SEQUENCES - 1, -1, -1))
        self._layers: weakref.WeakSet[LlamaCppCacheLayer] = weakref.WeakSet()
        weakref.finalize(self, _free_llama, lib, self._batch, self._model, self._holder)

    @property
    def _context(self) -> Any:
        return self._holder[0]

    def close(self) -> None:
        """Free llama.cpp's context (its KV cells); the next call makes a new one. Raises RuntimeError while a live
        cache still holds rows in it."""
        if any(layer.sequences for layer in self._layers):
            raise RuntimeError("a cache still holds rows in this llama.cpp context; drop it before close()")
        if self._context is not None:
            self.llama_cpp.llama_free(self._context)
        self._holder[0], self._cells = None, 0

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def new_cache(self) -> LlamaCppCache:
        return LlamaCppCache()

    # ---- llama.cpp's context ------------------------------------------------------------------------------------

    def _build_context(self, cells: int) -> None:
        lib = self.llama_cpp
        params = lib.llama_context_default_params()
        params.n_ctx = cells
        params.n_batch = params.n_ubatch = BATCH_TOKENS
        params.n_seq_max = MAX_SEQUENCES
        params.kv_unified = True  # the cells are shared by all rows, not split into MAX_SEQUENCES equal parts
        params.embeddings = True
        params.pooling_type = lib.LLAMA_POOLING_TYPE_NONE
        params.n_threads = params.n_threads_batch = self._threads()
        context = lib.llama_init_from_model(self._model, params)
        if not context:
            raise RuntimeError(f"llama.cpp could not make a context of {cells} cells for {self.name}")
        if self._context is not None:
            lib.llama_free(self._context)
        # llama.cpp pads the cells to a multiple of 256 and caps its batch at them: read both back.
        self._holder[0], self._cells = context, lib.llama_n_ctx(context)
        self._chunk = min(BATCH_TOKENS, lib.llama_n_batch(context))

    def _threads(self) -> int:
        return self.threads or torch.get_num_threads()

    def _reserve(self, needed: int) -> None:
        """Make room for `needed` more tokens: a larger context, every live row decoded into it again."""
        used = sum(len(row) for layer in self._layers for row in layer.inputs)
        if self._context is not None and used + needed <= self._cells:
            return
        cells = max(FIRST_CONTEXT, self._cells)
        while cells < used + needed:
            cells *= 2
        self._build_context(cells)
        replay = [(s, p, t) for layer in self._layers for s, row in zip(layer.sequences, layer.inputs) for p, t in row]
        for start in range(0, len(replay), self._chunk):
            self._decode(replay[start:start + self._chunk])

    def _embedding_rows(self, items: list[Any]) -> np.ndarray:
        """The embedding rows `[len(items), input_width]` llama.cpp is given for these items."""
        return torch.stack(items).numpy()

    def _decode(self, entries: list[tuple[int, int, Any]]) -> torch.Tensor:
        """Run `(sequence, position, item)` entries (at most the context's batch) through llama.cpp; their last hidden
        states `[len(entries), D]` float32."""
        lib, batch = self.llama_cpp, self._batch
        batch.n_tokens = len(entries)
        if self._embd is not None:
            self._embd[:len(entries)] = self._embedding_rows([item for _, _, item in entries])
        for i, (sequence, position, item) in enumerate(entries):
            if self._embd is None:
                batch.token[i] = item
            batch.pos[i] = position
            batch.n_seq_id[i], batch.seq_id[i][0], batch.logits[i] = 1, sequence, 1
        code = lib.llama_decode(self._context, batch)
        if code != 0:
            raise RuntimeError(f"llama.cpp's decode failed with code {code} ({self.name})")
        states = np.ctypeslib.as_array(lib.llama_get_embeddings(self._context), shape=(len(entries), self.hidden_size))
        return torch.from_numpy(states.copy())

    def release(self, sequences: list[int]) -> None:
        """Forget these sequence ids' cells and make the ids free again."""
        if self._context is not None:
            memory = self.llama_cpp.llama_get_memory(self._context)
            for sequence in sequences:
                self.llama_cpp.llama_memory_seq_rm(memory, sequence, -1, -1)
        self._free.extend(sequences)

    def _allocate(self, rows: int) -> list[int]:
        if rows > len(self._free):
            gc.collect()  # caches kept alive only by reference cycles release their rows when collected
        if rows > len(self._free):
            raise ValueError(f"llama.cpp serves {MAX_SEQUENCES} rows at once per model; {rows} more asked "
                             f"with {MAX_SEQUENCES - len(self._free)} in use")
        return [self._free.pop() for _ in range(rows)]

    # ---- forward ------------------------------------------------------------------------------------------------

    def _run(self, items: list[list[Any]], attention_mask: torch.Tensor | None, position_ids: torch.LongTensor | None,
             cache: Cache | None) -> BaseModelOutputWithPast:
        """`items` `[batch][seq]` (token ids or embedding rows); `attention_mask` `[batch, past + seq]` (0: padding,
        not given to llama.cpp); `position_ids` `[batch, seq]` (default: past + 0..seq-1); `cache`: a
        `LlamaCppCache`, or None to compute the sequence alone (its cells are freed after)."""
        batch, length = len(items), len(items[0])
        layer = None
        if cache is not None:
            layer = cache.layers[0]
            if not isinstance(layer, LlamaCppCacheLayer):
                raise TypeError("a llama.cpp model needs its own cache (its new_cache())")
        past = layer.length if layer is not None else 0
        mask = attention_mask[:, -length:] if attention_mask is not None else torch.ones(batch, length)
        if position_ids is None:
            position_ids = torch.arange(past, past + length).expand(batch, length)
        if layer is not None and layer.sequences and len(layer.sequences) != batch:
            raise ValueError(f"the cache holds {len(layer.sequences)} rows; {batch} given")
        rows = [  # each row's (position, item) pairs, padding left out
            [(p, item) for item, p, m in zip(row_items, positions, row_mask) if m]
            for row_items, positions, row_mask in zip(items, position_ids.tolist(), mask.tolist())
        ]
        self._reserve(sum(len(row) for row in rows))
        if layer is None:
            sequences = self._allocate(batch)
        else:
            if not layer.sequences:  # a new cache: its rows get sequence ids, given back when it is collected
                layer.sequences.extend(self._allocate(batch))
                layer.inputs = [[] for _ in range(batch)]
                layer.source = self
                self._layers.add(layer)
                weakref.finalize(layer, self.release, layer.sequences)
            sequences = layer.sequences
        entries = [(s, p, item) for s, row in zip(sequences, rows) for p, item in row]
        hidden = torch.zeros(batch, length, self.hidden_size)
        try:
            threads = self._threads()
            self.llama_cpp.llama_set_n_threads(self._context, threads, threads)
            states = [self._decode(entries[start:start + self._chunk]) for start in range(0, len(entries), self._chunk)]
            if states:
                hidden[mask.bool()] = torch.cat(states)  # entries run row by row, column by column: the mask's order
        finally:
            if layer is None:
                self.release(sequences)
        if layer is not None:
            for row, given in zip(layer.inputs, rows):
                row.extend(given)
            layer.length += length
        return BaseModelOutputWithPast(last_hidden_state=hidden)


class LlamaCppSource(LlamaCppModel):
    """A frozen base transformer computed by llama.cpp from a GGUF file: called like transformers' base models,
    `source(input_ids, attention_mask, position_ids, cache, use_cache)` -> `last_hidden_state` `[batch, seq, D]`
    float32 (zeros at padded positions). CPU only; no weights in torch (`parameters()` is empty).

    `config`: the transformers config of the same file (`sources.load_config`), which the combined model reads for
    sizes. `threads`: llama.cpp's threads for each call (default: torch's, read at every call). `headless` (default):
    for the architectures `llama_cpp_files.headless_gguf` takes, llama.cpp runs a copy of the file without its LM
    head (written to a temporary file, removed once loaded) and the tokens come in as their embedding rows, read from
    the original file: the same hidden states, without computing logits nobody reads.
    Raises ValueError for a file llama.cpp cannot load and for token ids outside its vocabulary.
    """

    def __init__(self, gguf_file: str | os.PathLike, config: Any, threads: int | None = None, headless: bool = True):
        import gguf

        from .llama_cpp_files import TokenEmbeddingRows, headless_gguf

        self._token_rows = None
        with tempfile.TemporaryDirectory(prefix="llm-modules-") as scratch:
            copy = Path(scratch) / "headless.gguf"
            reader = gguf.GGUFReader(str(gguf_file)) if headless else None  # parsed once, for the copy and the rows
            if reader is not None and headless_gguf(reader, copy):
                # llama.cpp maps the file: removing it once loaded leaves the mapping readable.
                super().__init__(copy, config, threads, input_width=config.hidden_size, name=str(gguf_file))
                self._token_rows = TokenEmbeddingRows(reader)
                self.vocab_size = self._token_rows.vocab_size
            else:
                super().__init__(gguf_file, config, threads)
                self.vocab_size = self.llama_cpp.llama_vocab_n_tokens(self.llama_cpp.llama_model_get_vocab(self._model))
        self.gguf_file = str(gguf_file)

    def _embedding_rows(self, items: list[Any]) -> np.ndarray:
        return self._token_rows.rows(items)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        """`input_ids` `[batch, seq]`; `attention_mask` `[batch, past + seq]` (0: padding, not given to llama.cpp);
        `position_ids` `[batch, seq]` (default: past + 0..seq-1); `cache`: a `LlamaCppCache`, or None to compute the
        sequence alone (its cells are freed after)."""
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("the llama.cpp source takes input_ids, not inputs_embeds")
        if int(input_ids.max()) >= self.vocab_size or int(input_ids.min()) < 0:
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}) for {self.gguf_file}; got "
                             f"{int(input_ids.min())}..{int(input_ids.max())}")
        return self._run(input_ids.tolist(), attention_mask, position_ids, cache)


class LlamaCppSmallModel(LlamaCppModel):
    """The trained small model run by llama.cpp (`trained_quantization="gguf"`): its blocks written to a GGUF
    (`llama_cpp_files.small_model_gguf`, Q8_0 by default; a temporary file, removed once loaded), called like the
    transformers base model it replaces, `small(inputs_embeds, attention_mask, position_ids, cache, use_cache)` ->
    `last_hidden_state` `[batch, seq, D_S]` float32 (zeros at padding). The bridge output `inputs_embeds`
    `[batch, seq, D_S]` is its input, as in torch; the new head stays in torch.

    Raises ValueError for a small model `small_model_gguf` cannot write (not a Llama architecture).
    """

    def __init__(self, small: nn.Module, file_type: str = "q8_0", threads: int | None = None):
        from .llama_cpp_files import small_model_gguf

        with tempfile.TemporaryDirectory(prefix="llm-modules-") as scratch:
            path = Path(scratch) / f"small-{file_type}.gguf"
            small_model_gguf(small, path, file_type)
            super().__init__(path, small.config, threads, input_width=small.config.hidden_size,
                             name=f"the small model in GGUF ({file_type})")
        self.file_type = file_type

    def get_input_embeddings(self) -> nn.Module:
        return nn.Embedding(0, self.hidden_size)  # bypassed, as in torch

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        """`inputs_embeds` `[batch, seq, D_S]`; the rest as `LlamaCppSource.forward`."""
        if kwargs.get("input_ids") is not None:
            raise ValueError("the small model reads the bridge output (inputs_embeds), not input_ids")
        rows = inputs_embeds.detach().float().cpu()
        return self._run([list(row.unbind(0)) for row in rows], attention_mask, position_ids, cache)


def _free_llama(lib: Any, batch: Any, model: Any, context_holder: list) -> None:
    if context_holder[0] is not None:
        lib.llama_free(context_holder[0])
    lib.llama_batch_free(batch)
    lib.llama_model_free(model)
