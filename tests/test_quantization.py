"""The frozen model in int8 / fp16 on the CPU (quantization.py) and the precision benchmark (benchmarking/precision.py).

Tiny random models: these check the wiring and the numerics of the swapped layers; the quality on real weights is
measured by benchmarks/precision_quality.py (docs/performance.md).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from llm_modules import LLMModulesForCausalLM
from llm_modules.benchmarking.precision import bench_precision, format_precision
from llm_modules.cli import main as cli_main
from llm_modules.quantization import Float32Embedding, Int8Linear, quantize_frozen_model, quantize_trained_parts

from test_benchmarking import quiet, tiny_config  # noqa: F401  (a fixture)


def test_int8_linear_scales_per_token_so_an_outlier_row_does_not_flatten_the_others():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    x = torch.randn(3, 64)
    x[0] *= 1000.0  # one token with outsized activations, as Qwen's first token has
    exact = linear(x)
    quantized = Int8Linear(linear)(x)
    for row in range(3):
        error = (quantized[row] - exact[row]).norm() / exact[row].norm()
        assert error < 0.03, f"row {row}: relative error {error:.3f}"
    # What per-tensor scaling (the kernel alone) does to the ordinary rows: the reason Int8Linear exists.
    per_tensor = Int8Linear(linear).product(x) + linear.bias
    assert (per_tensor[1] - exact[1]).norm() / exact[1].norm() > 0.1


def test_int8_linear_takes_outlier_features_out_of_int8_as_llm_int8_does():
    """One input feature far above the rest of its row (Qwen2.5's first token: ~60 where the others are ~1) sets the
    row's int8 scale, so every other feature rounds to a step or two: the row's product is wrong. With the outlier
    threshold, that feature is multiplied in float32 with its (dequantized int8) weight column and the rest quantize
    on their own scale."""
    torch.manual_seed(0)
    linear = nn.Linear(256, 64)
    x = torch.randn(4, 256)
    x[0, 7] = 60.0
    x[2, 100] = -40.0
    exact = linear(x)
    without = Int8Linear(linear)(x)
    layer = Int8Linear(linear, outlier_threshold=6.0)
    with_threshold = layer(x)

    def error(y, row, exact=exact):
        return ((y[row] - exact[row]).norm() / exact[row].norm()).item()

    assert error(without, 0) > 0.05  # the failure
    for row in range(4):
        assert error(with_threshold, row) < 0.02, f"row {row}: {error(with_threshold, row):.4f}"
    assert (layer.outlier_slot >= 0).nonzero().flatten().tolist() == [7, 100]  # only the features past the threshold
    weight = layer.product.weight().dequantize()
    torch.testing.assert_close(layer.outlier_columns[layer.outlier_slot[100]], weight[:, 100])
    torch.testing.assert_close(layer(x), with_threshold)  # again, from the kept columns
    more = torch.randn(2, 256)
    more[0, 10:22] = 30.0  # 12 new features at once: the kept columns grow past their first capacity
    assert error(layer(more), 0, exact=linear(more)) < 0.02 and layer.outlier_count == 14
    # A call without outliers is the plain per-token int8 product.
    torch.testing.assert_close(layer(x[1:2]), Int8Linear(linear)(x[1:2]))


def test_int8_layers_of_the_frozen_model_and_the_trained_parts_use_the_outlier_threshold(tiny_dirs):
    # A tiny model has no massive activation to show the difference (the real one: docs/performance.md); the unit
    # test above shows the mechanism, this one that every int8 layer we build uses it.
    model = LLMModulesForCausalLM.from_large_and_small(tiny_dirs["qwen2"], tiny_dirs["llama"], cross_attention_heads=4,
                                                       large_quantization="int8")
    quantize_trained_parts(model, "int8")
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(layers) > 10 and {m.outlier_threshold for m in layers} == {6.0}


# fp16: loading in bfloat16 rounds the weights first, so not 1e-3
@pytest.mark.parametrize("method, tolerance", [("int8", 0.05), ("fp16", 0.01)])
def test_quantized_frozen_model_tracks_float32_and_keeps_its_hidden_states_float32(tiny_dirs, method, tolerance):
    from llm_modules.sources import load_base_model

    large_dir = tiny_dirs["qwen2"]
    reference = load_base_model(large_dir, dtype=torch.float32)
    quantized = quantize_frozen_model(load_base_model(large_dir, dtype=torch.bfloat16), method)
    linears = [m for m in quantized.modules() if type(m) is nn.Linear]
    assert not linears, f"{len(linears)} linear layers left unquantized"
    assert isinstance(quantized.get_input_embeddings(), Float32Embedding)
    assert not any(p.requires_grad for p in quantized.parameters())
    ids = torch.randint(5, 200, (2, 12))
    with torch.no_grad():
        expected = reference(input_ids=ids).last_hidden_state
        got = quantized(input_ids=ids).last_hidden_state
    assert got.dtype == torch.float32
    error = ((got - expected).norm() / expected.norm()).item()
    assert error < tolerance, f"{method}: relative error {error:.4f}"


@pytest.mark.parametrize("method, tolerance", [("int8", 0.05), ("fp16", 0.01)])
def test_a_gpt2_frozen_model_has_its_conv1d_layers_quantized_and_nothing_large_upcast(tiny_dirs, method, tolerance):
    from transformers.pytorch_utils import Conv1D

    from llm_modules.sources import load_base_model

    reference = load_base_model(tiny_dirs["gpt2"], dtype=torch.float32)
    loaded = load_base_model(tiny_dirs["gpt2"], dtype=torch.bfloat16)
    assert any(type(m) is Conv1D for m in loaded.modules())  # GPT-2's projections: weights [in, out], no nn.Linear
    quantized = quantize_frozen_model(loaded, method)
    left = [name for name, m in quantized.named_modules() if isinstance(m, (nn.Linear, Conv1D))]
    assert not left, f"left unquantized: {left}"
    # Only norms and biases run in float32; every matrix left is an embedding table, still in bfloat16 (pytorch#33433).
    assert {p.dtype for p in quantized.parameters() if p.ndim >= 2} == {torch.bfloat16}
    ids = torch.randint(5, 200, (2, 12))
    with torch.no_grad():
        expected = reference(input_ids=ids).last_hidden_state
        got = quantized(input_ids=ids).last_hidden_state
    error = ((got - expected).norm() / expected.norm()).item()
    assert error < tolerance, f"{method}: relative error {error:.4f}"


class Projection(nn.Module):
    """A linear layer of a kind quantize_frozen_model does not know (as remote code may bring)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().clone())

    def forward(self, x):
        return x @ self.weight.T


def test_an_unknown_linear_kind_is_refused_by_name_before_anything_is_swapped(tiny_dirs):
    from llm_modules.sources import load_base_model

    model = load_base_model(tiny_dirs["qwen2"], dtype=torch.bfloat16)
    model.layers[1].mlp.down_proj = Projection(model.layers[1].mlp.down_proj)
    with pytest.raises(ValueError) as refused:
        quantize_frozen_model(model, "int8")
    assert str(refused.value) == (
        "large_quantization='int8' cannot quantize the frozen model's layers of type Projection "
        "(layers.1.mlp.down_proj); it quantizes torch Linear and transformers Conv1D layers: load without it"
    )
    assert any(type(m) is nn.Linear for m in model.modules())  # untouched
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_the_command_line_refuses_an_unknown_linear_kind_as_bad_input(tiny_model, tmp_path, monkeypatch, capsys):
    from llm_modules import quantization

    tiny_model.save_pretrained(tmp_path / "saved")

    def refuse(model, method):
        raise quantization.UnsupportedLayerError(f"large_quantization={method!r} cannot quantize ... of type Projection")

    monkeypatch.setattr(quantization, "layers_to_swap", refuse)
    argv = ["generate", "--model", str(tmp_path / "saved"), "--prompt", "x", "--large-quantization", "int8"]
    assert cli_main(argv) == 2  # not "cannot load" with exit code 3: the model is there, the option cannot take it
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("llm-modules generate: error: --model ") and last.endswith(
        ": large_quantization='int8' cannot quantize ... of type Projection")


def test_combined_model_loads_with_a_quantized_frozen_model_and_decodes_with_caches(tiny_pair, tmp_path):
    # Seeded: on a random tiny model, int8 decoding one token at a time and the full forward round activations
    # differently, which flips near-tied argmaxes for about half the seeds (0, 2, 3, 5 here); the test once
    # depended on the RNG state the tests before it left.
    torch.manual_seed(1)
    model = LLMModulesForCausalLM.from_large_and_small(
        *tiny_pair, large_quantization="int8", cross_attention_heads=4
    )
    assert isinstance(model.large.get_input_embeddings(), Float32Embedding)
    ids = torch.randint(5, 200, (1, 6))
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        full = model(cached[:, :-1]).logits
    # Greedy with caches == the argmax of one cache-free forward over what it generated.
    assert torch.equal(full[0, ids.shape[1] - 1:].argmax(-1), cached[0, ids.shape[1]:])
    model.save_pretrained(tmp_path / "saved")
    reloaded = LLMModulesForCausalLM.from_pretrained(tmp_path / "saved", large_quantization="fp16")
    assert not [m for m in reloaded.large.modules() if type(m) is nn.Linear]


def test_unknown_quantization_fails_before_loading(tiny_pair):
    with pytest.raises(ValueError, match="large_quantization must be one of"):
        LLMModulesForCausalLM.from_large_and_small(
            *tiny_pair, large_quantization="int4"
        )


def test_precision_bench_reports_each_precision_with_its_floor(tiny_config):  # noqa: F811
    result = bench_precision(
        tiny_config, precisions=("float32", "bfloat16", "int8"), contexts=(6,), threads=(1,), new_tokens=3,
        clock="cpu", log=quiet,
    )
    rows = {r["precision"]: r for r in result["rows"]}
    assert set(rows) == {"float32", "bfloat16", "int8"}
    for row in rows.values():
        assert row["floor_s"] == pytest.approx(row["large_alone_s"] + row["small_alone_s"])
        assert row["combined_s"] > 0 and row["combined_over_float32"] > 0
    assert rows["float32"]["combined_over_float32"] == 1.0
    table = format_precision(result)
    assert "| int8 | 1 | 6 |" in table and "combined / floor" in table


def test_cli_precision_bench_writes_json_and_rejects_bad_precisions(tiny_config, tmp_path, capsys):  # noqa: F811
    tiny_config.save_pretrained(tmp_path / "config")
    out = tmp_path / "precision.json"
    code = cli_main([
        "bench", "decode", "--config", str(tmp_path / "config"), "--precisions", "float32", "fp16",
        "--contexts", "5", "--threads", "1", "--new-tokens", "3", "--json", str(out),
    ])
    assert code == 0
    assert [r["precision"] for r in json.loads(out.read_text())["rows"]] == ["float32", "fp16"]
    assert cli_main(["bench", "decode", "--precisions", "int4"]) == 2
    assert "--precisions: unknown 'int4'" in capsys.readouterr().err
    assert cli_main(["bench", "decode", "--large", "x"]) == 2
    assert "--large/--small need --precisions" in capsys.readouterr().err


def test_trained_parts_in_int8_track_float32_and_decode_with_caches(tiny_dirs):
    """The bridges, the small model's blocks and the head become per-token int8 layers; the frozen source is left as
    loaded; logits stay close to float32, and decoding with the three caches gives the logits of one cache-free
    forward over the same tokens within int8's rounding (fbgemm picks its zero point over the whole input, so a row
    alone and a row among others round apart: not bit-equal, and a near-tie on a random tiny model may flip)."""
    torch.manual_seed(1)
    model = LLMModulesForCausalLM.from_large_and_small(tiny_dirs["qwen2"], tiny_dirs["llama"], cross_attention_heads=4,
                                                       dropout=0.0).eval()
    ids = torch.randint(5, 200, (1, 7))
    with torch.no_grad():
        reference = model(ids).logits
    frozen_before = {name: type(module) for name, module in model.sources.named_modules()}
    quantize_trained_parts(model, "int8")
    assert {name: type(module) for name, module in model.sources.named_modules()} == frozen_before
    assert isinstance(model.lm_head, Int8Linear)
    assert not [m for part in (model.bridges, model.small) for m in part.modules() if type(m) is nn.Linear]
    with torch.no_grad():
        logits = model(ids).logits
        assert logits.dtype == torch.float32
        scale = reference.abs().max()
        assert (logits - reference).abs().max() < 0.05 * scale
        out = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
        full = model(out.sequences[:, :-1]).logits[0, ids.shape[1] - 1:]
    cached = torch.cat(out.logits)
    assert (cached - full).abs().max() < 0.05 * scale  # the bound int8 keeps against float32 above
    with pytest.raises(ValueError, match="trained_quantization must be one of"):
        quantize_trained_parts(model, "int4")
