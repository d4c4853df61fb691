"""Cheaper weights for the frozen model on the CPU: `large_quantization="int8"` or `"fp16"` (CLI
`--large-quantization`).

Decoding one token reads every weight of the frozen model once, so on a CPU its speed is set by the bytes per weight
and by how fast the kernel turns them into float32 products. Measured here (docs/performance.md; AMD EPYC without
AVX512, one thread, a 1536x8960 product of one row): float32 6.0 ms; torch's bfloat16 4.9 ms (its bf16 kernel converts
in software without AVX512-BF16, so it is bound by compute, not memory); PyTorch's dynamic quantization kernels
(fbgemm, `torch.ao.nn.quantized.dynamic.Linear`) 3.7 ms with float16 weights and 1.2 ms with int8 weights; torchao
0.18's `Int8WeightOnlyConfig` / `Int8DynamicActivationInt8WeightConfig` 9-58 ms in eager mode (its fast CPU path
needs `torch.compile`). Hence fbgemm. PyTorch marks `torch.ao` eager quantization deprecated in favour of torchao;
the pinned torch range keeps it, and tests cover it, until torchao's eager CPU path is as fast here.

- `"fp16"`: every linear layer holds float16 weights; activations stay float32 (no overflow, same results as float32
  to about 1e-3).
- `"int8"`: every linear layer holds int8 weights (symmetric, one scale per output channel); activations are quantized
  to int8 per token at run time, their few outlier features (magnitude > 6) multiplied in float32 (`Int8Linear`).

Linear layers are torch's `nn.Linear` and transformers' `Conv1D` (GPT-2 and its family: the same product with the
weight stored transposed, `[in, out]`). A model holding a weight matrix in a layer of any other kind is refused,
naming the kind, before anything is swapped: left alone, that layer would keep its weights unquantized and be
upcast to float32 with the norms (`torch.ao.quantization.quantize_dynamic` skips such layers without a word,
pytorch#33433). Token and position embeddings keep the checkpoint's precision (a lookup reads one row, not the table)
and return float32; the rest (norms, biases, rotary tables: vectors only) runs in float32, so the hidden states the
model returns are float32. On a GPU, load the frozen
model with `quantization_config=BitsAndBytesConfig(load_in_8bit=True)` instead (bitsandbytes).
"""

from __future__ import annotations

import warnings
from functools import partial

import torch
from torch import nn

LARGE_QUANTIZATIONS = ("int8", "fp16")
TRAINED_QUANTIZATIONS = ("int8", "gguf", "gguf-q4_0")
# Input features beyond this magnitude skip int8 (`Int8Linear`): LLM.int8()'s threshold. On Qwen2.5-Coder-1.5B's last
# hidden state at position 0, int8 without it gave cosine -0.56 to float32, with it 0.9994 (20: 0.9976).
INT8_OUTLIER_THRESHOLD = 6.0


class UnsupportedLayerError(ValueError):
    """The frozen model holds weights in a layer kind that `quantize_frozen_model` cannot quantize (bad input for
    `large_quantization`: the command line exits with code 2)."""


class Int8Linear(nn.Module):
    """`y = x W^T + b` with int8 weights and int8 activations scaled per token (per row of `x`), the few outlier
    input features computed apart in float32 (LLM.int8(), Dettmers et al. 2022).

    fbgemm's dynamic kernel scales the activations per tensor: over a prompt, one token with outsized activations
    (the first token of Qwen models carries values ~100x the rest) would flatten every other token to a few int8
    levels. Dividing each row by its own max first and multiplying the output back is exact algebra (the product is
    linear in each row) and makes the kernel's scale a per-token one.

    Within a row, one feature can still dwarf the others: Qwen2.5's first token holds one input feature of 15-330
    where the rest are ~1, so its own int8 scale rounds every other feature to 0 or 1 step, and its hidden states
    come out wrong (measured in docs/performance.md). Input features whose magnitude passes `outlier_threshold` in any
    row of the call are therefore taken out of the int8 product and multiplied in float32 with those weight columns
    (dequantized from the int8 weights once per feature and kept), as LLM.int8() does; `None` turns it off.
    Shapes: `x` (..., in_features) float32 -> (..., out_features) float32.
    """

    def __init__(self, linear: nn.Linear, outlier_threshold: float | None = None):
        super().__init__()
        from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear
        from torch.ao.quantization import per_channel_dynamic_qconfig

        weights_only = nn.Linear(linear.in_features, linear.out_features, bias=False)
        weights_only.weight = nn.Parameter(linear.weight.detach().float(), requires_grad=False)
        weights_only.qconfig = per_channel_dynamic_qconfig
        self.product = DynamicQuantizedLinear.from_float(weights_only)
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.register_buffer("bias", bias)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.outlier_threshold = outlier_threshold
        # The dequantized weight columns of the outlier features met so far, one row each (`[capacity, out_features]`,
        # the first `outlier_count` in use), and each input feature's row there (-1: none yet): outlier features
        # recur (the same channels, token after token), so each is dequantized once.
        self.register_buffer("outlier_columns", torch.zeros(0, linear.out_features), persistent=False)
        self.register_buffer("outlier_slot", torch.full((linear.in_features,), -1), persistent=False)
        self.outlier_count = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outliers = None
        if self.outlier_threshold is not None:
            features = (x.abs() > self.outlier_threshold).reshape(-1, self.in_features).any(0).nonzero().flatten()
            if len(features):
                outliers = x.index_select(-1, features) @ self._columns(features)
                x = x.index_fill(-1, features, 0.0)
        scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
        y = self.product(x / scale) * scale
        if outliers is not None:
            y = y + outliers
        return y if self.bias is None else y + self.bias

    def _columns(self, features: torch.Tensor) -> torch.Tensor:
        """`[len(features), out_features]` float32: the int8 weight's columns of `features`, dequantized."""
        missing = features[self.outlier_slot[features] < 0]
        if len(missing):
            # The kernel itself dequantizes them: a one-hot row quantizes exactly (its scale is 1/255), so row i of
            # the product is column `missing[i]` of the int8 weight times its scales. One product of a few rows costs
            # about one decode step; unpacking the whole matrix to read the columns cost ~100 (measured, 1536x8960).
            one_hot = torch.zeros(len(missing), self.in_features).index_put_(
                (torch.arange(len(missing)), missing), torch.tensor(1.0))
            columns = self.product(one_hot)
            needed = self.outlier_count + len(missing)
            if needed > len(self.outlier_columns):  # grow by doubling: features arrive a few at a time
                grown = torch.zeros(max(needed, 2 * len(self.outlier_columns), 8), self.out_features)
                grown[:self.outlier_count] = self.outlier_columns[:self.outlier_count]
                self.outlier_columns = grown
            self.outlier_columns[self.outlier_count:needed] = columns
            self.outlier_slot[missing] = torch.arange(self.outlier_count, needed)
            self.outlier_count = needed
        return self.outlier_columns.index_select(0, self.outlier_slot[features])


class Float32Embedding(nn.Module):
    """An embedding table kept in its own dtype whose output is float32, the quantized layers' input dtype."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self.embedding = embedding

    @property
    def weight(self) -> torch.Tensor:  # transformers reads `get_input_embeddings().weight` (e.g. for its dtype)
        return self.embedding.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(input_ids).float()


def _float16_linear(linear: nn.Linear) -> nn.Module:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear
    from torch.ao.quantization import float16_dynamic_qconfig

    linear.float()
    linear.qconfig = float16_dynamic_qconfig
    return DynamicQuantizedLinear.from_float(linear)


def as_linear(module: nn.Module) -> nn.Linear:
    """`module` (an `nn.Linear`, or transformers' `Conv1D`: `y = x W + b` with `W` `[in, out]`) as an `nn.Linear`
    computing the same product; the weights keep their dtype."""
    if type(module) is nn.Linear:
        return module
    in_features, out_features = module.weight.shape
    linear = nn.Linear(in_features, out_features, bias=module.bias is not None, device="meta")
    linear.weight = nn.Parameter(module.weight.detach().t().contiguous(), requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
    return linear


def layers_to_swap(model: nn.Module, method: str) -> list[str]:
    """Names of the modules `quantize_frozen_model` replaces: linear layers (`nn.Linear`, `Conv1D`) and embeddings.

    Raises `UnsupportedLayerError` naming the kind (and its layers) of any other module that holds a weight matrix.
    """
    from transformers.pytorch_utils import Conv1D

    names, unknown = [], {}
    for name, module in model.named_modules():
        if type(module) in (nn.Linear, Conv1D, nn.Embedding):
            names.append(name)
        elif not isinstance(module, nn.Embedding) and any(p.ndim >= 2 for p in module.parameters(recurse=False)):
            # nn.Embedding subclasses (scaled or learned-position tables) are lookups: they keep their precision.
            unknown.setdefault(type(module).__name__, []).append(name)
    if unknown:
        kinds = "; ".join(
            f"{kind} ({', '.join(layers[:3])}{f', ... ({len(layers)} in all)' if len(layers) > 3 else ''})"
            for kind, layers in unknown.items()
        )
        raise UnsupportedLayerError(
            f"large_quantization={method!r} cannot quantize the frozen model's layers of type {kinds}; it quantizes "
            "torch Linear and transformers Conv1D layers: load without it"
        )
    return names


def quantize_frozen_model(model: nn.Module, method: str = "int8") -> nn.Module:
    """Swap the linear layers of a frozen (inference-only) model for `method`'s, in place; returns the model.

    Layer by layer, so the peak memory is the model as loaded (e.g. bfloat16) plus one layer in float32. The result
    cannot be trained or saved with `save_pretrained`; the combined model never saves its frozen part.

    Raises ValueError for an unknown `method` or a model that is not on the CPU, `UnsupportedLayerError` (a ValueError)
    for a model with weight matrices in a layer kind other than `nn.Linear`, `Conv1D` and embeddings (nothing is
    swapped then), RuntimeError when this PyTorch build has no x86/fbgemm quantized engine.
    """
    if method not in LARGE_QUANTIZATIONS:
        raise ValueError(f"large_quantization must be one of {LARGE_QUANTIZATIONS}, got {method!r}")
    devices = {p.device.type for p in model.parameters()} - {"cpu"}
    if devices:
        raise ValueError(
            f"large_quantization={method!r} runs on the CPU; the frozen model is on {sorted(devices)[0]} "
            "(on a GPU, pass quantization_config=BitsAndBytesConfig(load_in_8bit=True) instead)"
        )
    engines = torch.backends.quantized.supported_engines
    engine = next((name for name in ("x86", "fbgemm") if name in engines), None)
    if engine is None:
        raise RuntimeError(f"this PyTorch build has no x86/fbgemm quantized engine (it has {engines})")
    torch.backends.quantized.engine = engine
    swap = partial(Int8Linear, outlier_threshold=INT8_OUTLIER_THRESHOLD) if method == "int8" else _float16_linear
    # Module swapping by hand: `torch.ao.quantization.quantize_dynamic` wants the whole model in float32 first (a
    # 1.5B model loaded in bfloat16 would double in memory) and has no per-token activation scales.
    # Names, not modules: a list holding the replaced modules would keep every layer's float32 copy alive until the end
    # (measured: 10.3 GiB peak instead of 3.8 for the 1.5B pair).
    names = layers_to_swap(model, method)  # before the first swap: a refused model is left as it was
    for name in names:
        module = model.get_submodule(name)
        if type(module) is not nn.Embedding:
            with warnings.catch_warnings():  # torch's deprecation notice of torch.ao, once per layer (see above)
                warnings.simplefilter("ignore", UserWarning)
                replacement = swap(as_linear(module))
        else:
            replacement = Float32Embedding(module)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
        del module, replacement
    for module in model.modules():  # norms and other small float tensors: the quantized layers work in float32
        if not isinstance(module, (Float32Embedding, nn.Embedding)):
            for tensor_name, tensor in list(module.named_parameters(recurse=False)):
                tensor.data = tensor.data.float()
    model.requires_grad_(False)
    return model


def quantize_trained_parts(model: nn.Module, method: str = "int8") -> nn.Module:
    """Swap the linear layers of a combined model's trained parts (bridges, depth connections, the small model's
    blocks, the new head over the large vocabulary) for `method`'s, in place, for inference; returns the model.

    Decoding one token reads every trained weight too: on the real pair (Qwen2.5-Coder-1.5B + SmolLM2-135M) the head
    (151,936 x 576) and SmolLM2's blocks are about 0.9 GB in float32, a third of the bytes of a token with the frozen
    model in int8. `"int8"`: the same per-token int8 layers as `quantize_frozen_model` (`Int8Linear`). `"gguf"`: the
    bridges and the head in int8 likewise, the small model's blocks run by llama.cpp in Q8_0
    (`llama_cpp_source.LlamaCppSmallModel`: its ~5,000 small torch calls per token cost as much as its weights);
    `"gguf-q4_0"`: the same with Q4_0 blocks (faster, less exact: docs/performance.md). The
    model cannot be trained or saved afterwards. Raises ValueError for an unknown `method` or a model not on the CPU,
    and for "gguf" with a small model llama.cpp cannot take here (not a Llama architecture), depth connections or
    `small_position_embeddings="zero"`; `UnsupportedLayerError` as `quantize_frozen_model` does.
    """
    if method not in TRAINED_QUANTIZATIONS:
        raise ValueError(f"trained_quantization must be one of {TRAINED_QUANTIZATIONS}, got {method!r}")
    if method.startswith("gguf"):
        from .llama_cpp_source import LlamaCppSmallModel

        if model.config.depth_connection_list:
            raise ValueError(f"trained_quantization={method!r} runs the small model in llama.cpp, where depth "
                             "connections cannot reach its blocks")
        if model.config.small_position_embeddings == "zero":
            # llama.cpp's causal mask compares positions: with all of them 0 a prompt token would see later ones.
            raise ValueError(f"trained_quantization={method!r} needs small_position_embeddings='keep' (llama.cpp "
                             "masks by position; this model feeds its small model position 0 everywhere)")
        model.small = LlamaCppSmallModel(model.small, file_type="q4_0" if method == "gguf-q4_0" else "q8_0")
    # The trained parts are direct children; the frozen sources are left as they were loaded.
    for part in (model.bridges, model.depth, model.small):
        if next(part.parameters(), None) is not None:  # `depth` is empty without depth connections; llama.cpp: none
            quantize_frozen_model(part, "int8")
    with warnings.catch_warnings():  # torch's deprecation notice of torch.ao (see the module docstring)
        warnings.simplefilter("ignore", UserWarning)
        model.lm_head = Int8Linear(as_linear(model.lm_head), outlier_threshold=INT8_OUTLIER_THRESHOLD)
    return model
