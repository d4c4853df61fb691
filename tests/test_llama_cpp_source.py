"""The frozen source run by llama.cpp (`large_quantization="gguf"`): same hidden states as torch on the same float32
weights, the three-cache invariants, padding, rows dropped mid-generation, a context that grows, and clear refusals."""

from __future__ import annotations

import gc
import json

import numpy as np
import pytest
import torch

pytest.importorskip("llama_cpp", reason="llama-cpp-python is the llama-cpp extra (.ci/run installs it)")

from llm_modules import LLMModulesForCausalLM  # noqa: E402
from llm_modules import llama_cpp_source  # noqa: E402
from llm_modules.llama_cpp_source import LlamaCppSource  # noqa: E402
from llm_modules.sources import gguf_for_source, load_base_model, load_config  # noqa: E402

# llama.cpp keeps keys and values in float16 and sums in its own order: float32 weights agree with torch to ~1e-3.
TOLERANCE = dict(atol=2e-3, rtol=2e-3)


def write_fetched_layout(hf_dir, root):
    """`root/hf` (the tiny Qwen2 checkpoint), `root/tiny.gguf` (its weights, float32, and its BPE vocabulary) and
    `root/manifest.json` naming the GGUF: the layout `llm-modules fetch` leaves. Tensor names come from the gguf
    package's own map of Hugging Face names."""
    import shutil

    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shutil.copytree(hf_dir, root / "hf")
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    config = model.config
    writer = gguf.GGUFWriter(str(root / "tiny.gguf"), "qwen2")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([token for token, _ in vocab])
    special = set(tokenizer.all_special_ids)
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for _, i in vocab])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]])
    writer.add_eos_token_id(tokenizer.eos_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to the token embeddings
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), tensor.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (root / "manifest.json").write_text(json.dumps({"gguf_file": "tiny.gguf"}))
    return root / "hf"


@pytest.fixture(scope="module")
def fetched_large(tiny_pair, tmp_path_factory):
    return write_fetched_layout(tiny_pair[0], tmp_path_factory.mktemp("fetched") / "tiny-qwen2")


@pytest.fixture(scope="module")
def pair(fetched_large, tiny_pair, tmp_path_factory):
    """(combined model with the frozen model in torch, the same saved model reloaded with it in llama.cpp)."""
    torch.manual_seed(0)
    model = LLMModulesForCausalLM.from_large_and_small(str(fetched_large), tiny_pair[1], cross_attention_heads=4)
    with torch.no_grad():  # not the zero-ish init: differences must show in the logits
        for p in model.bridges.parameters():
            p.add_(0.05 * torch.randn_like(p))
    saved = tmp_path_factory.mktemp("saved") / "combined"
    model.save_pretrained(saved)
    return model.eval(), LLMModulesForCausalLM.from_pretrained(saved, large_quantization="gguf").eval()


def test_llama_cpp_hidden_states_match_torch_on_the_same_weights(fetched_large, one_thread):
    gguf_file = gguf_for_source(str(fetched_large))
    source = LlamaCppSource(gguf_file, load_config(str(gguf_file)))
    reference = load_base_model(str(fetched_large), dtype=torch.float32).eval()
    ids = torch.randint(5, 300, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(input_ids=ids).last_hidden_state
    got = source(input_ids=ids).last_hidden_state
    assert got.shape == expected.shape == (2, 23, 64)
    torch.testing.assert_close(got, expected, **TOLERANCE)
    assert list(source.parameters()) == []  # nothing of the frozen model is held in torch


def test_the_combined_model_in_llama_cpp_gives_torch_s_logits_and_tokens(pair, one_thread):
    torch_model, llama_model = pair
    ids = torch.randint(5, 300, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(llama_model(input_ids=ids).logits, torch_model(input_ids=ids).logits, **TOLERANCE)
        expected = torch_model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        got = llama_model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert got.tolist() == expected.tolist()


def test_cached_decoding_equals_recompute_and_is_causal(pair, one_thread):
    _, model = pair
    ids = torch.randint(5, 300, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        out = model(input_ids=ids[:, :10], use_cache=True)
        cache, steps = out.cache, [out.logits]
        for i in range(10, 16):
            steps.append(model(input_ids=ids[:, i:i + 1], attention_mask=torch.ones(1, i + 1, dtype=torch.long),
                               cache=cache, use_cache=True).logits)
        assert cache.get_seq_length() == 16
        torch.testing.assert_close(torch.cat(steps, 1), full, **TOLERANCE)
        changed = ids.clone()
        changed[0, 12] = (changed[0, 12] + 1) % 300
        later = model(input_ids=changed, use_cache=False).logits
    torch.testing.assert_close(later[:, :12], full[:, :12], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(later[:, 12:], full[:, 12:], **TOLERANCE)


def test_left_padded_rows_and_dropped_rows_give_each_row_s_own_logits(pair, one_thread):
    _, model = pair
    generator = torch.Generator().manual_seed(4)
    long, short = torch.randint(5, 300, (1, 9), generator=generator), torch.randint(5, 300, (1, 5), generator=generator)
    ids = torch.cat([long, torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1)])
    mask = torch.cat([torch.ones(1, 9), torch.cat([torch.zeros(1, 4), torch.ones(1, 5)], 1)]).long()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        torch.testing.assert_close(out.logits[1, 4:], model(input_ids=short).logits[0], **TOLERANCE)
        cache = out.cache
        cache.batch_select_indices(torch.tensor([1]))  # the long row finished; the short one goes on
        following = torch.tensor([[7]])
        step = model(input_ids=following, attention_mask=torch.cat([mask[1:], torch.ones(1, 1, dtype=torch.long)], 1),
                     cache=cache, use_cache=True).logits
        alone = model(input_ids=torch.cat([short, following], 1)).logits[:, -1:]
    torch.testing.assert_close(step, alone, **TOLERANCE)


def test_a_full_context_grows_and_keeps_every_live_row(pair, one_thread, monkeypatch):
    _, model = pair
    monkeypatch.setattr(llama_cpp_source, "FIRST_CONTEXT", 8)  # llama.cpp makes it 256 cells
    gc.collect()  # the caches of earlier tests
    model.large.close()  # the next call makes a new, small context, which this generation outgrows
    ids = torch.randint(5, 300, (2, 120), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        prompt = model(input_ids=ids, use_cache=True)  # 240 tokens: fits
        assert model.large._cells == 256
        # 240 + 240 live: grows to 512 at the prefill, then to 1024 mid-generation, each time the live rows replayed
        got = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0)
        assert model.large._cells == 1024
        del prompt
        recomputed = model(input_ids=got[:, :-1], use_cache=False).logits[:, 119:].argmax(-1)
    assert recomputed.tolist() == got[:, 120:].tolist()


def test_what_llama_cpp_cannot_do_is_refused_with_the_reason(pair, fetched_large, tiny_pair, one_thread):
    _, model = pair
    ids = torch.randint(5, 300, (1, 4))
    with pytest.raises(NotImplementedError, match="beam search"):
        model.generate(ids, max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0)
    with pytest.raises(ValueError, match="not one: pass the .gguf file"):
        LLMModulesForCausalLM.from_large_and_small(*tiny_pair, large_quantization="gguf")
    with pytest.raises(ValueError, match="token ids must lie in"):
        model(input_ids=torch.tensor([[5, 10_000]]))
    with pytest.raises(ValueError, match="depth connections read the frozen model's inner layers"):
        LLMModulesForCausalLM.from_large_and_small(str(fetched_large), tiny_pair[1], large_quantization="gguf",
                                                   cross_attention_heads=4, num_depth_connections=1)


def test_generate_command_runs_the_frozen_model_in_llama_cpp(pair, tiny_pair, tmp_path, capsys):
    from llm_modules.cli import main

    torch_model, _ = pair
    torch_model.save_pretrained(tmp_path / "combined")
    code = main(["generate", "--model", str(tmp_path / "combined"), "--prompt", "The quick brown", "--max-new-tokens", "4",
                 "--large-quantization", "gguf"])
    assert code == 0
    assert capsys.readouterr().out.strip()
    torch_model_dir = tmp_path / "no-gguf"
    LLMModulesForCausalLM.from_large_and_small(*tiny_pair).save_pretrained(torch_model_dir)
    code = main(["generate", "--model", str(torch_model_dir), "--prompt", "x", "--large-quantization", "gguf"])
    captured = capsys.readouterr()
    assert code == 2 and "pass the .gguf file" in captured.err and "Traceback" not in captured.err


def test_the_server_s_engine_answers_each_request_as_generate_does(pair, one_thread):
    from transformers import AutoTokenizer

    from llm_modules.serving.engine import BatchingEngine, GenerationRequest

    torch_model, model = pair
    tokenizer = AutoTokenizer.from_pretrained(model.config.large_model_name_or_path)
    prompts = [tokenizer(text)["input_ids"] for text in ("the quick brown fox", "what is 3 plus", "dog")]
    with BatchingEngine(model, tokenizer, max_batch_size=4) as engine:
        assert engine.max_batch_size == 1  # llama.cpp's rows cannot be left-padded into a running batch
        answers = [g.result() for g in [engine.submit(GenerationRequest(ids, 6, ignore_eos=True)) for ids in prompts]]
    for ids, answer in zip(prompts, answers):
        with torch.no_grad():
            expected = torch_model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert answer == expected[0, len(ids):].tolist()


def test_bench_decode_times_the_llama_cpp_precision(fetched_large, tiny_pair, capsys, one_thread):
    from llm_modules.cli import main

    assert main(["bench", "decode", "--precisions", "gguf"]) == 2
    assert "--precisions gguf runs llama.cpp on a real GGUF" in capsys.readouterr().err
    assert main(["bench", "decode", "--precisions", "float32", "gguf", "--large", str(fetched_large), "--small",
                 str(tiny_pair[1]), "--contexts", "8", "--new-tokens", "3", "--threads", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| float32", "| gguf"))]
    assert len(rows) == 2 and all(float(row.split("|")[4]) > 0 for row in rows)  # combined s/token, both measured


# ---- the frozen model without its LM head ------------------------------------------------------------------------


def test_the_headless_copy_gives_the_whole_file_s_hidden_states(fetched_large, one_thread):
    gguf_file = gguf_for_source(str(fetched_large))
    config = load_config(str(gguf_file))
    headless, whole = LlamaCppSource(gguf_file, config), LlamaCppSource(gguf_file, config, headless=False)
    assert headless.input_width == 64 and whole.input_width == 0  # tokens come in as their embedding rows
    assert headless.vocab_size == whole.vocab_size
    ids = torch.randint(0, whole.vocab_size, (2, 19), generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(headless(input_ids=ids).last_hidden_state, whole(input_ids=ids).last_hidden_state,
                               atol=1e-6, rtol=1e-6)


# ---- the small model in llama.cpp (trained_quantization="gguf") ----------------------------------------------------


@pytest.fixture(scope="module")
def llama_small(tiny_dirs, tmp_path_factory):
    """A tiny Llama small model 64 wide (Q8_0 blocks rows of 32), saved like a hub checkpoint."""
    from transformers import AutoTokenizer

    from llm_modules.tiny_models import save_tiny_causal_lm

    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    return save_tiny_causal_lm(tmp_path_factory.mktemp("llama64") / "llama", "llama", tokenizer, hidden_size=64,
                               layers=2, heads=4)


@pytest.fixture(scope="module")
def small_pair(fetched_large, llama_small, tmp_path_factory):
    """(combined model in torch with a Llama small model, the same with its small model in llama.cpp from a float32
    GGUF, the saved dir)."""
    import copy

    from llm_modules.llama_cpp_source import LlamaCppSmallModel

    torch.manual_seed(0)
    model = LLMModulesForCausalLM.from_large_and_small(str(fetched_large), str(llama_small), cross_attention_heads=4,
                                                       small_position_embeddings="keep")
    with torch.no_grad():
        for p in model.bridges.parameters():
            p.add_(0.05 * torch.randn_like(p))
    saved = tmp_path_factory.mktemp("saved-llama") / "combined"
    model.save_pretrained(saved)
    in_llama_cpp = copy.deepcopy(model)
    in_llama_cpp.small = LlamaCppSmallModel(in_llama_cpp.small, file_type="f32")
    return model.eval(), in_llama_cpp.eval(), saved


def test_the_small_model_in_llama_cpp_gives_torch_s_hidden_states(small_pair, one_thread):
    torch_model, model, _ = small_pair
    embeds = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(7))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = torch_model.small(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
    expected = expected.last_hidden_state
    got = model.small(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], **TOLERANCE)
    assert (got[~mask.bool()] == 0).all() and list(model.small.parameters()) == []


def test_small_model_in_llama_cpp_keeps_the_cache_invariants(small_pair, one_thread):
    torch_model, model, _ = small_pair
    ids = torch.randint(5, 300, (1, 14), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(full, torch_model(input_ids=ids).logits, **TOLERANCE)
        out = model(input_ids=ids[:, :9], use_cache=True)
        cache, steps = out.cache, [out.logits]
        for i in range(9, 14):
            steps.append(model(input_ids=ids[:, i:i + 1], attention_mask=torch.ones(1, i + 1, dtype=torch.long),
                               cache=cache, use_cache=True).logits)
        torch.testing.assert_close(torch.cat(steps, 1), full, **TOLERANCE)  # cached == recompute
        changed = ids.clone()
        changed[0, 10] = (changed[0, 10] + 1) % 300
        later = model(input_ids=changed, use_cache=False).logits
        torch.testing.assert_close(later[:, :10], full[:, :10], atol=1e-5, rtol=1e-5)  # causal
        expected = torch_model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        got = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert got.tolist() == expected.tolist()


def test_trained_quantization_gguf_loads_runs_and_stays_close_to_float32(small_pair, one_thread, capsys):
    from llm_modules.cli import main
    from llm_modules.llama_cpp_source import LlamaCppSmallModel
    from llm_modules.quantization import Int8Linear

    torch_model, _, saved = small_pair
    model = LLMModulesForCausalLM.from_pretrained(saved, large_quantization="gguf", trained_quantization="gguf")
    assert isinstance(model.small, LlamaCppSmallModel) and model.small.file_type == "q8_0"
    assert isinstance(model.lm_head, Int8Linear)
    ids = torch.randint(5, 300, (2, 11), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        got, expected = model(input_ids=ids).logits, torch_model(input_ids=ids).logits
    # Q8_0 blocks and int8 head: close to float32, not equal (the real pair's agreement is in docs/performance.md)
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9
    code = main(["generate", "--model", str(saved), "--prompt", "The quick brown", "--max-new-tokens", "4",
                 "--large-quantization", "gguf", "--trained-quantization", "gguf"])
    assert code == 0 and capsys.readouterr().out.strip()
    faster = LLMModulesForCausalLM.from_pretrained(saved, trained_quantization="gguf-q4_0")
    assert faster.small.file_type == "q4_0"
    with torch.no_grad():
        assert (faster(input_ids=ids).logits - expected).abs().max() < 0.2 * expected.abs().max()


def test_what_the_small_model_in_llama_cpp_cannot_do_is_refused(small_pair, fetched_large, tiny_pair, tmp_path, capsys):
    from llm_modules.cli import main
    from llm_modules.quantization import quantize_trained_parts

    neo = LLMModulesForCausalLM.from_large_and_small(str(fetched_large), tiny_pair[1], cross_attention_heads=4,
                                                     small_position_embeddings="keep")
    with pytest.raises(ValueError, match="Llama-architecture models; this one is 'gpt_neo'"):
        quantize_trained_parts(neo, "gguf")
    neo.save_pretrained(tmp_path / "neo")
    code = main(["generate", "--model", str(tmp_path / "neo"), "--prompt", "x", "--trained-quantization", "gguf"])
    captured = capsys.readouterr()
    assert code == 2 and "Llama-architecture" in captured.err and "Traceback" not in captured.err
    zero = LLMModulesForCausalLM.from_large_and_small(str(fetched_large), tiny_pair[1], cross_attention_heads=4)
    with pytest.raises(ValueError, match="small_position_embeddings='keep'"):
        quantize_trained_parts(zero, "gguf")
    _, model, _ = small_pair
    with pytest.raises(NotImplementedError, match="beam search"):
        model.generate(torch.randint(5, 300, (1, 4)), max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0)


def test_bench_decode_times_the_small_model_in_llama_cpp(fetched_large, llama_small, capsys, one_thread):
    from llm_modules.cli import main

    assert main(["bench", "decode", "--trained-quantization", "gguf"]) == 2
    assert "--trained-quantization goes with --precisions" in capsys.readouterr().err
    assert main(["bench", "decode", "--precisions", "gguf", "--trained-quantization", "gguf", "--large",
                 str(fetched_large), "--small", str(llama_small), "--contexts", "8", "--new-tokens", "3",
                 "--threads", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| gguf")]
    assert len(rows) == 1 and float(rows[0].split("|")[4]) > 0


def test_the_server_s_engine_answers_as_generate_does_with_the_small_model_in_llama_cpp(small_pair, one_thread):
    from transformers import AutoTokenizer

    from llm_modules.serving.engine import BatchingEngine, GenerationRequest

    torch_model, model, _ = small_pair
    tokenizer = AutoTokenizer.from_pretrained(model.config.large_model_name_or_path)
    prompts = [tokenizer(text)["input_ids"] for text in ("the quick brown fox", "dog")]
    with BatchingEngine(model, tokenizer, max_batch_size=4) as engine:
        assert engine.max_batch_size == 1
        answers = [g.result() for g in [engine.submit(GenerationRequest(ids, 5, ignore_eos=True)) for ids in prompts]]
    for ids, answer in zip(prompts, answers):
        with torch.no_grad():
            expected = torch_model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert answer == expected[0, len(ids):].tolist()
