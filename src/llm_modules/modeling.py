"""LLM Modules: a frozen large causal LM -> Enhanced Cross-Attention bridge -> small causal LM -> new head.

Read top to bottom: `EnhancedCrossAttention`, the `LLMModulesBridge` that stacks them, the `LLMModulesCache` that
holds the three caches, then `LLMModulesForCausalLM` (forward, generate support, loading and saving).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration import LLMModulesConfig
from .sources import ModelSourceError, load_base_model, load_config, load_tokenizer, resolve_model_source

WEIGHTS_NAME = "model.safetensors"


def cross_attention_mask(
    attention_mask: torch.Tensor | None, query_length: int, key_length: int, causal: bool
) -> torch.Tensor | None:
    """Boolean mask `[batch, 1, query, key]` (True = attend) for queries at the last `query_length` positions.

    Query i sees keys <= i that are not padding. A padding query sees only itself, so no row is empty (an empty
    row gives NaN) and no padding row reads the future. Returns None when nothing needs masking.
    """
    past = key_length - query_length
    if attention_mask is None or bool(attention_mask.all()):
        if not causal or query_length == 1:
            return None
        attention_mask = None
    key_pos = torch.arange(key_length, device=attention_mask.device if attention_mask is not None else None)
    query_pos = key_pos[past:, None]
    allowed = key_pos[None, :] <= query_pos
    if not causal:
        allowed = torch.ones_like(allowed)
    if attention_mask is not None:
        valid = attention_mask[:, None, :].bool()
        allowed = (allowed & valid) | (key_pos[None, :] == query_pos)
    else:
        allowed = allowed[None]
    return allowed[:, None]


def extend_causal_tables(model: nn.Module, length: int) -> None:
    """Grow fixed `[1, 1, N, N]` boolean causal tables (GPT-Neo's eager attention) to cover `length` positions.

    With zeroed positions the small model is not limited by its position table, but some architectures also size a
    causal mask buffer by it. The window of a local-attention table is read from its last row, so global and
    sliding-window tables both keep their shape of mask.
    """
    for module in model.modules():
        table = getattr(module, "bias", None)
        if not (isinstance(table, torch.Tensor) and table.dtype == torch.bool and table.dim() == 4):
            continue
        size = table.shape[-1]
        if size >= length:
            continue
        window = int(table[0, 0, -1].sum())
        new_size = max(length, 2 * size)
        grown = torch.ones(new_size, new_size, dtype=torch.bool, device=table.device).tril()
        if window < size:
            grown = grown ^ grown.tril(-window)
        module.bias = grown[None, None]


class EnhancedCrossAttention(nn.Module):
    """Small-width states attend to large-width memory, then an adapter and a sigmoid gate blend in the result.

    Queries come from the small-width states `[.., small_dim]`, keys and values from the large model's projected
    states `[.., large_dim]`. Output: `g * a + (1 - g) * states` with `g = sigmoid(W [states; a])`.
    """

    def __init__(self, large_dim: int, small_dim: int, num_heads: int, adapter_dim: int, dropout: float, gate: bool):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = small_dim // num_heads
        self.dropout = dropout
        self.query_norm = nn.LayerNorm(small_dim)
        self.memory_norm = nn.LayerNorm(large_dim)
        self.q_proj = nn.Linear(small_dim, small_dim)
        self.k_proj = nn.Linear(large_dim, small_dim)
        self.v_proj = nn.Linear(large_dim, small_dim)
        self.o_proj = nn.Linear(small_dim, small_dim)
        self.adapter_down = nn.Linear(small_dim, adapter_dim)
        self.adapter_up = nn.Linear(adapter_dim, small_dim)
        self.adapter_norm = nn.LayerNorm(small_dim)
        self.adapter_dropout = nn.Dropout(dropout)
        self.gate = nn.Linear(2 * small_dim, small_dim) if gate else None

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:2], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        memory: torch.Tensor,
        states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache_layer: DynamicLayer | None = None,
    ) -> torch.Tensor:
        query = self._heads(self.q_proj(self.query_norm(states)))
        memory = self.memory_norm(memory)
        key, value = self._heads(self.k_proj(memory)), self._heads(self.v_proj(memory))
        if cache_layer is not None:
            key, value = cache_layer.update(key, value)
        attended = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=self.dropout if self.training else 0.0
        )
        attended = self.o_proj(attended.transpose(1, 2).reshape(states.shape))
        adapter = self.adapter_up(F.gelu(self.adapter_down(attended)))
        attended = attended + self.adapter_norm(self.adapter_dropout(adapter))
        if self.gate is None:
            return states + attended
        gate = torch.sigmoid(self.gate(torch.cat([states, attended], dim=-1)))
        # The blend itself is the new state; the paper's code adds `states` once more and the norm grows per layer.
        return gate * attended + (1 - gate) * states


class LLMModulesBridge(nn.Module):
    """Large hidden states `[.., D_L]` -> small-model input embeddings `[.., D_S]` (docs/design.md, step 2)."""

    def __init__(self, config: LLMModulesConfig):
        super().__init__()
        large, small = config.large_hidden_size, config.small_hidden_size
        middle = (large + small) // 2
        self.causal = config.causal_cross_attention
        self.pre_proj = nn.Linear(large, large)
        self.proj = nn.Linear(large, small)
        self.intermediate = nn.Sequential(
            nn.Linear(large, middle), nn.LayerNorm(middle), nn.GELU(), nn.Linear(middle, small), nn.LayerNorm(small)
        )
        self.layers = nn.ModuleList(
            EnhancedCrossAttention(
                large, small, config.cross_attention_heads, config.adapter_dim, config.dropout, config.gate
            )
            for _ in range(config.num_cross_attention_layers)
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache_layers: list[DynamicLayer] | None = None,
    ) -> torch.Tensor:
        pre = self.pre_proj(hidden_states)
        states = self.intermediate(pre)
        past = cache_layers[0].get_seq_length() if cache_layers else 0
        query_length = hidden_states.shape[1]
        mask = cross_attention_mask(attention_mask, query_length, past + query_length, self.causal)
        for i, layer in enumerate(self.layers):
            states = layer(pre, states, mask, cache_layers[i] if cache_layers else None)
        return states + self.proj(pre)


class LLMModulesCache(Cache):
    """The three caches of a combined model as one `Cache`.

    `layers` is the union of the large model's layers, one layer per cross-attention layer (its keys and values
    over all past positions) and the small model's layers, so `get_seq_length`, beam reordering, batch expansion
    and `crop` work unchanged; `large` and `small` are `DynamicCache` views over the same layer objects.
    """

    def __init__(self, config: LLMModulesConfig):
        self.large = DynamicCache(config=config.large_config)
        self.small = DynamicCache(config=config.small_config)
        self.bridge = [DynamicLayer() for _ in range(config.num_cross_attention_layers)]
        super().__init__(layers=[*self.large.layers, *self.bridge, *self.small.layers])


class LLMModulesPreTrainedModel(PreTrainedModel):
    config_class = LLMModulesConfig
    base_model_prefix = ""
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        # Only the bridge and the new head are ours; the sub-models init themselves (or come pretrained).
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class LLMModulesForCausalLM(LLMModulesPreTrainedModel, GenerationMixin):
    """Frozen large LM (base transformer, no LM head) -> bridge -> small LM (token embeddings bypassed) -> new head.

    `LLMModulesForCausalLM(config)` builds random weights from the config alone; `from_large_and_small` composes
    two pretrained models; `save_pretrained` stores only what trains and `from_pretrained` reloads the frozen model
    from the id or path recorded in the config.
    """

    def __init__(
        self, config: LLMModulesConfig, large_model: PreTrainedModel | None = None, small_model: PreTrainedModel | None = None
    ):
        super().__init__(config)
        self.large = large_model if large_model is not None else AutoModel.from_config(config.large_config)
        self.bridge = LLMModulesBridge(config)
        self.small = small_model if small_model is not None else AutoModel.from_config(config.small_config)
        self.lm_head = nn.Linear(config.small_hidden_size, config.vocab_size, bias=False)
        self.tokenizer = None  # the large model's tokenizer, when known; saved with the model
        self.post_init()
        self._freeze()

    def _freeze(self) -> None:
        self.large.requires_grad_(False)
        self.large.eval()
        # The small model reads the bridge output, never its own token embeddings: free them (GPT-Neo-125M: 38.6M
        # parameters, 147 MiB in fp32, which the paper's code even trains; freeing them keeps the real-size training
        # step under 10 GiB, README Performance). An empty table stays in their place, so the module tree and
        # `get_input_embeddings()` are what transformers expects.
        unused = self.small.get_input_embeddings()
        empty = nn.Embedding(0, unused.embedding_dim, device=unused.weight.device, dtype=unused.weight.dtype)
        self.small.set_input_embeddings(empty)
        self.small.get_input_embeddings().requires_grad_(False)

    def train(self, mode: bool = True) -> "LLMModulesForCausalLM":
        super().train(mode)
        self.large.eval()  # frozen means no dropout either, whatever Trainer asks of the whole model
        return self

    def get_input_embeddings(self) -> nn.Module:
        return self.large.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    # ---- forward --------------------------------------------------------------------------------------------

    def large_hidden_states(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """Last hidden states of the frozen model (its base transformer only: no LM head is ever computed)."""
        with torch.no_grad():
            out = self.large(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=cache is not None,
            )
        return out.last_hidden_state

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        large_hidden_states: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        r"""
        input_ids: token ids of the LARGE model's tokenizer, `[batch, seq]`.
        attention_mask: 2D padding mask over past and current tokens, `[batch, past + seq]`.
        position_ids: positions of the current tokens (defaults to the count of real tokens before each one).
        cache: an `LLMModulesCache` (created on demand when `use_cache`).
        labels: next-token targets, shifted inside like Hugging Face causal LMs; -100 is ignored. In training mode
            only the labelled positions go through the new head and `logits` is None, which saves the
            `[batch, seq, vocab]` tensor over the large vocabulary.
        logits_to_keep: compute logits for the last N positions only (0 = all), as `generate` asks for.
        large_hidden_states: precomputed last hidden states of the frozen model (the feature cache); skips it.
        num_items_in_batch: labelled tokens in the whole accumulated batch, as `transformers.Trainer` passes it: the
            loss is then this batch's summed cross-entropy over that count, so accumulation equals one big batch.
        """
        if input_ids is None and large_hidden_states is None:
            raise ValueError("Pass input_ids (or large_hidden_states from the feature cache).")
        reference = input_ids if input_ids is not None else large_hidden_states
        batch, length = reference.shape[:2]
        if use_cache is None:
            use_cache = not self.training and labels is None
        if use_cache and cache is None:
            cache = LLMModulesCache(self.config)
        if cache is not None and not isinstance(cache, LLMModulesCache):
            raise TypeError(f"cache must be an LLMModulesCache, got {type(cache).__name__}")
        past = cache.get_seq_length() if cache is not None else 0

        # Always a full 2D mask: without one, all-zero small-model positions read as packed sequences.
        if attention_mask is None:
            attention_mask = torch.ones(batch, past + length, dtype=torch.long, device=reference.device)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]

        if large_hidden_states is None:
            large_hidden_states = self.large_hidden_states(
                input_ids, attention_mask, position_ids, cache.large if cache is not None else None
            )
        bridge_dtype = self.bridge.pre_proj.weight.dtype
        inputs_embeds = self.bridge(
            large_hidden_states.to(bridge_dtype), attention_mask, cache.bridge if cache is not None else None
        )

        if self.config.small_position_embeddings == "zero":
            small_positions = torch.zeros_like(position_ids)
        else:
            limit = getattr(self.config.small_config, "max_position_embeddings", None)
            if limit is not None and int(position_ids.max()) >= limit:
                raise ValueError(
                    f"sequence reaches position {int(position_ids.max())} but the small model has {limit} positions "
                    "and small_position_embeddings='keep'; use small_position_embeddings='zero' for longer inputs"
                )
            small_positions = position_ids
        if self.config.small_position_embeddings == "zero":
            extend_causal_tables(self.small, past + length)
        small_out = self.small(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=small_positions,
            cache=cache.small if cache is not None else None,
            use_cache=cache is not None,
        )
        hidden = small_out.last_hidden_state

        loss = None
        logits = None
        if labels is not None:
            loss = self.loss_from_hidden(hidden, labels, num_items_in_batch)
        if labels is None or not self.training:
            kept = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
            logits = self.lm_head(kept)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)

    def loss_from_hidden(
        self, hidden: torch.Tensor, labels: torch.LongTensor, num_items_in_batch: int | torch.Tensor | None = None
    ) -> torch.Tensor:
        """Next-token cross-entropy, running the new head only where a label is set: the mean over this batch's
        labelled tokens, or their sum over `num_items_in_batch` when given."""
        targets = labels[:, 1:].to(hidden.device)
        keep = targets != -100
        if not bool(keep.any()):
            # No labelled token: a zero that still depends on the parameters, so DDP and AMP see a graph.
            return hidden.sum() * 0.0
        logits = self.lm_head(hidden[:, :-1][keep]).float()
        if num_items_in_batch is None:
            return F.cross_entropy(logits, targets[keep])
        return F.cross_entropy(logits, targets[keep], reduction="sum") / num_items_in_batch

    # ---- generation -----------------------------------------------------------------------------------------

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length):
        # transformers would build DynamicCache(config=self.config), which cannot hold three models' caches.
        # Private hook, pinned by the transformers range in pyproject.toml and covered by tests/test_modeling.py.
        if model_kwargs.get("cache") is not None or generation_config.use_cache is False:
            return super()._prepare_cache_for_generation(
                generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
            )
        model_kwargs["cache"] = LLMModulesCache(self.config)

    # ---- composing, saving, loading -------------------------------------------------------------------------

    @classmethod
    def from_large_and_small(
        cls,
        large_model_name_or_path: str | os.PathLike,
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
        """Compose a combined model from two pretrained causal LMs (hub ids, local dirs or .gguf files).

        The large model's base transformer is loaded frozen (its LM head is never loaded); the small model's base
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
        # Local paths are recorded absolute, so the saved model reloads from any working directory.
        large_source = resolve_model_source(large_model_name_or_path, "large model")
        small_source = resolve_model_source(small_model_name_or_path, "small model")
        large = _load_frozen_model(
            large_source, large_dtype, large_quantization, device_map=device_map,
            quantization_config=quantization_config, trust_remote_code=trust_remote_code,
        )
        tokenizer = load_tokenizer(large_source, trust_remote_code=trust_remote_code)
        # Trained parts default to float32 whatever the checkpoint holds (a bf16 checkpoint would otherwise train in
        # bf16 next to a float32 bridge); `dtype="auto"` keeps the checkpoint's.
        trained_dtype = torch.float32 if dtype is None else _as_dtype(dtype)
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
            small_config=small_config,
            large_model_name_or_path=large_source,
            small_model_name_or_path=small_source,
            **{**special, **config_overrides},
        )
        model = cls(config, large_model=large, small_model=small)
        device = next(large.parameters()).device
        for part in (model.bridge, model.small, model.lm_head):
            part.to(device=device, dtype=trained_dtype)
        model.tokenizer = tokenizer
        return model

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """What training changes: the bridge, the small model (without its unused token embeddings) and the head."""
        frozen_embeddings = {id(p) for p in self.small.get_input_embeddings().parameters()}
        return {
            name: param.detach()
            for name, param in self.named_parameters()
            if not name.startswith("large.") and id(param) not in frozen_embeddings
        }

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        is_main_process: bool = True,
        state_dict: dict[str, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        """Write config.json, the trained weights as safetensors and the large tokenizer; never the frozen weights.

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
        self.config.architectures = [type(self).__name__]
        self.config.save_pretrained(directory)
        self.generation_config.save_pretrained(directory)
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
        large_model_name_or_path: str | os.PathLike | None = None,
        dtype: torch.dtype | str | None = None,
        large_dtype: torch.dtype | str | None = None,
        large_quantization: str | None = None,
        device_map: Any = None,
        quantization_config: Any = None,
        trust_remote_code: bool = False,
        **kwargs: Any,
    ) -> "LLMModulesForCausalLM":
        """Reload a saved combined model: the frozen model from the recorded id/path, the rest from the dir.

        `large_model_name_or_path` points at the frozen model when it moved since saving; `large_dtype`,
        `large_quantization` and `quantization_config` set its precision, as in `from_large_and_small`.
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
            large_source, what = large_model_name_or_path, "large_model_name_or_path"
        else:
            large_source, what = config.large_model_name_or_path, f"large_model_name_or_path (recorded in {config_path})"
        hint = ("point at where it is now with LLMModulesForCausalLM.from_pretrained(dir, large_model_name_or_path=...) "
                "(CLI: --large-model PATH)")
        try:
            # A recorded path that is gone fails here, without asking the hub for it.
            large_source = resolve_model_source(large_source, what)
        except ModelSourceError as error:
            raise ModelSourceError(f"{error}; {hint}") from None
        try:
            large = _load_frozen_model(
                large_source, large_dtype if large_dtype is not None else dtype, large_quantization,
                device_map=device_map, quantization_config=quantization_config, trust_remote_code=trust_remote_code,
            )
        except (OSError, ValueError) as error:
            raise ModelSourceError(f"cannot load {what} {large_source!r}: {error}; {hint}") from error
        if large_model_name_or_path is not None:
            config.large_model_name_or_path = large_source
        model = cls(config, large_model=large)
        model.load_trained_weights(directory / WEIGHTS_NAME)
        device = next(large.parameters()).device
        for part in (model.bridge, model.small, model.lm_head):
            part.to(device=device, dtype=_as_dtype(dtype))
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

    def parameter_summary(self) -> dict[str, int]:
        """Parameter counts: frozen (large model), trainable and its parts (bridge, small model, head)."""
        def count(params) -> int:
            return sum(p.numel() for p in params)

        return {
            "frozen_large": count(self.large.parameters()),
            "bridge": count(self.bridge.parameters()),
            "small_model": count(p for p in self.small.parameters() if p.requires_grad),
            "lm_head": count(self.lm_head.parameters()),
            "trainable": count(p for p in self.parameters() if p.requires_grad),
            "unused_small_embeddings": count(self.small.get_input_embeddings().parameters()),
        }


def _load_frozen_model(
    source: str, dtype: torch.dtype | str | None, quantization: str | None, **kwargs: Any
) -> PreTrainedModel:
    """The frozen base transformer in `dtype`, or int8 (`quantization.quantize_frozen_model`) from bfloat16 weights."""
    if quantization is None:
        return load_base_model(source, dtype=_as_dtype(dtype), **kwargs)
    from .quantization import LARGE_QUANTIZATIONS, quantize_frozen_model

    if quantization not in LARGE_QUANTIZATIONS:  # before loading gigabytes
        raise ValueError(f"large_quantization must be one of {LARGE_QUANTIZATIONS}, got {quantization!r}")
    large = load_base_model(source, dtype=_as_dtype(dtype) or torch.bfloat16, **kwargs)
    return quantize_frozen_model(large, quantization)


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    return getattr(torch, dtype)


# `AutoModelForCausalLM.from_pretrained(dir)` then works on saved combined models too.
AutoConfig.register(LLMModulesConfig.model_type, LLMModulesConfig, exist_ok=True)
AutoModelForCausalLM.register(LLMModulesConfig, LLMModulesForCausalLM, exist_ok=True)
