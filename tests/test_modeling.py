"""The combined model: the invariants of docs/design.md, generation options, save/load, any pair, real sizes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer

from llm_modules import LLMModulesConfig, LLMModulesForCausalLM
from llm_modules.cli import main as cli_main

PAIRS = {"qwen2+gpt_neo": ("qwen2", "gpt_neo"), "llama+gpt2": ("llama", "gpt2")}


@pytest.fixture(params=list(PAIRS), scope="module")
def pair_model(request, tiny_dirs):
    large, small = PAIRS[request.param]
    torch.manual_seed(0)
    model = LLMModulesForCausalLM.from_large_and_small(tiny_dirs[large], tiny_dirs[small], cross_attention_heads=4)
    return model.eval()


def full_recompute_greedy(model, input_ids, attention_mask, steps):
    """The paper's scheme: run the whole sequence again for every token; returns tokens and per-step logits."""
    ids, mask, logits = input_ids, attention_mask, []
    for _ in range(steps):
        with torch.no_grad():
            step_logits = model(ids, attention_mask=mask, use_cache=False).logits[:, -1]
        logits.append(step_logits)
        ids = torch.cat([ids, step_logits.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids[:, input_ids.shape[1]:], torch.stack(logits, dim=1)


# ---- invariant 1: causality ------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
def test_changing_a_later_token_moves_no_earlier_logit(tiny_pair, causal):
    torch.manual_seed(0)
    model = LLMModulesForCausalLM.from_large_and_small(
        *tiny_pair, cross_attention_heads=4, causal_cross_attention=causal
    ).eval()
    ids = torch.randint(10, model.config.vocab_size, (2, 16))
    changed = ids.clone()
    k = 9
    changed[:, k] = (changed[:, k] + 7) % model.config.vocab_size
    with torch.no_grad():
        before = model(ids).logits[:, :k]
        after = model(changed).logits[:, :k]
    diff = (before - after).abs().max().item()
    if causal:
        assert diff < 1e-6
    else:  # the paper's leaky cross-attention: the future moves the past
        assert diff > 1e-4


def test_noncausal_cross_attention_warns(tiny_pair):
    with pytest.warns(UserWarning, match="ablations"):
        LLMModulesConfig(causal_cross_attention=False)


# ---- invariant 2: cached decoding == full recompute ------------------------------------------------------------


def test_cached_greedy_generation_equals_full_recompute(pair_model):
    model = pair_model
    input_ids = torch.randint(10, model.config.vocab_size, (1, 7))
    mask = torch.ones_like(input_ids)
    out = model.generate(
        input_ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False,
        output_logits=True, return_dict_in_generate=True,
    )
    tokens, logits = full_recompute_greedy(model, input_ids, mask, 20)
    assert torch.equal(out.sequences[:, 7:], tokens)
    assert (torch.stack(out.logits, dim=1) - logits).abs().max().item() < 1e-4


def test_cached_generation_on_left_padded_batch(pair_model):
    model = pair_model
    pad = model.config.pad_token_id
    prompts = [torch.randint(10, model.config.vocab_size, (n,)) for n in (3, 8, 5)]
    width = max(len(p) for p in prompts)
    input_ids = torch.full((3, width), pad)
    mask = torch.zeros(3, width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    out = model.generate(
        input_ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False,
        output_logits=True, return_dict_in_generate=True,
    )
    tokens, logits = full_recompute_greedy(model, input_ids, mask, 20)
    assert torch.equal(out.sequences[:, width:], tokens)
    assert (torch.stack(out.logits, dim=1) - logits).abs().max().item() < 1e-4
    # Padding is invisible: each row continues exactly as its prompt does alone.
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], max_new_tokens=20, min_new_tokens=20, do_sample=False)
        assert torch.equal(alone[0, len(prompt):], out.sequences[row, width:])


def test_cache_holds_all_three_parts(tiny_model):
    from llm_modules import LLMModulesCache

    ids = torch.randint(10, 300, (1, 6))
    out = tiny_model(ids, use_cache=True)
    cache = out.cache
    assert isinstance(cache, LLMModulesCache)
    assert cache.get_seq_length() == 6
    assert all(layer.get_seq_length() == 6 for layer in cache.bridge)
    assert cache.small.get_seq_length() == 6
    assert len(cache.layers) == (
        tiny_model.config.large_config.num_hidden_layers
        + tiny_model.config.num_cross_attention_layers
        + tiny_model.config.small_config.num_hidden_layers
    )


# ---- generation options ----------------------------------------------------------------------------------------


def test_sampling_is_seeded_and_uses_the_cache(tiny_model):
    ids = torch.randint(10, 300, (1, 5))
    kwargs = dict(max_new_tokens=12, do_sample=True, temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.3)
    torch.manual_seed(1)
    first = tiny_model.generate(ids, **kwargs)
    torch.manual_seed(1)
    again = tiny_model.generate(ids, **kwargs)
    torch.manual_seed(1)
    recompute = tiny_model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(first, again)
    assert torch.equal(first, recompute)


def test_beam_search_with_cache_equals_without(tiny_model):
    ids = torch.randint(10, 300, (2, 5))
    cached = tiny_model.generate(ids, max_new_tokens=8, num_beams=3, do_sample=False)
    plain = tiny_model.generate(ids, max_new_tokens=8, num_beams=3, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)


def test_eos_and_stop_strings_end_generation(tiny_model):
    tokenizer = tiny_model.tokenizer
    ids = tokenizer("The quick brown", return_tensors="pt").input_ids
    free = tiny_model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
    # Whatever token greedy decoding emits third becomes the EOS: generation must stop right there.
    stopped = tiny_model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=int(free[2]))[0, ids.shape[1]:]
    assert torch.equal(stopped, free[:3])
    stop_text = tokenizer.decode(free[:4])[-3:]
    with_stop = tiny_model.generate(
        ids, max_new_tokens=12, do_sample=False, stop_strings=[stop_text], tokenizer=tokenizer
    )[0, ids.shape[1]:]
    assert len(with_stop) < 12 and tokenizer.decode(with_stop).endswith(stop_text)


def test_streamer_receives_every_generated_token(tiny_model):
    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.reshape(-1).tolist())

        def end(self):
            self.chunks.append("end")

    streamer = Collect()
    ids = torch.randint(10, 300, (1, 4))
    out = tiny_model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, streamer=streamer)
    assert streamer.chunks[0] == ids[0].tolist()  # the prompt first, as transformers streamers expect
    assert [c[0] for c in streamer.chunks[1:-1]] == out[0, 4:].tolist()
    assert streamer.chunks[-1] == "end"


# ---- invariant 3: frozen means frozen --------------------------------------------------------------------------


def test_the_sources_decoder_layers_are_listed_as_blocks_for_fsdp2_and_device_map(tiny_model):
    """accelerate's transformer-based FSDP2 wrap (and device_map) read `_no_split_modules`: the sources' layer class
    must be there, or their layers all fall into the root FSDP2 unit (transformers collects the set from the direct
    children only, and the sources are one level down, in a ModuleList)."""
    from llm_modules.bridge import transformer_blocks

    for part in (*tiny_model.sources, tiny_model.small):
        classes = {type(layer).__name__ for layer in transformer_blocks(part)}
        assert classes and classes <= tiny_model._no_split_modules, (classes, tiny_model._no_split_modules)


def test_training_changes_only_bridge_small_and_head(tiny_pair):
    torch.manual_seed(0)
    model = LLMModulesForCausalLM.from_large_and_small(*tiny_pair, cross_attention_heads=4)
    loaded = AutoModel.from_pretrained(tiny_pair[0])
    large_before = {k: v.clone() for k, v in model.large.state_dict().items()}
    for name, tensor in loaded.state_dict().items():  # composing must not re-initialise the pretrained weights
        assert torch.equal(large_before[name], tensor), name
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert not any(p.requires_grad for p in model.large.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    assert not model.large.training  # no dropout in the frozen model
    ids = torch.randint(10, model.config.vocab_size, (2, 12))
    trained_before = {k: v.clone() for k, v in model.trained_state_dict().items()}
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        loss.backward()
        assert all(p.grad is None for p in model.large.parameters())
        assert model.small.get_input_embeddings().weight.grad is None
        optimizer.step()
        optimizer.zero_grad()
    for name, tensor in model.large.state_dict().items():
        assert torch.equal(large_before[name], tensor), name
    changed = {k for k, v in model.trained_state_dict().items() if not torch.equal(v, trained_before[k])}
    assert any(k.startswith("bridges.0.") for k in changed)
    assert any(k.startswith("small.") for k in changed)
    assert "lm_head.weight" in changed


def test_loss_matches_full_logits_cross_entropy(tiny_model):
    ids = torch.randint(10, 300, (2, 10))
    labels = ids.clone()
    labels[0, :4] = -100
    with torch.no_grad():
        out = tiny_model(ids, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    expected = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, expected, atol=1e-5)
    tiny_model.train()
    train_out = tiny_model(ids, labels=labels)
    tiny_model.eval()
    assert train_out.logits is None  # training skips the [batch, seq, vocab] logits


# ---- invariant 4: save / load ----------------------------------------------------------------------------------


def test_save_and_reload_gives_identical_logits_without_large_weights(tiny_model, tiny_pair, tmp_path):
    ids = torch.randint(10, 300, (2, 9))
    with torch.no_grad():
        expected = tiny_model(ids).logits
    tiny_model.save_pretrained(tmp_path / "combined")
    with safe_open(str(tmp_path / "combined" / "model.safetensors"), "pt") as saved:
        keys = list(saved.keys())
    assert keys and not any(k.startswith(("large.", "sources.")) for k in keys)
    assert "small.wte.weight" not in keys  # unused token embeddings are not trained, so not saved
    config = json.loads((tmp_path / "combined" / "config.json").read_text())
    assert config["large_model_name_or_path"] == str(tiny_pair[0])
    reloaded = LLMModulesForCausalLM.from_pretrained(tmp_path / "combined")
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected)
    assert reloaded.tokenizer is not None and len(reloaded.tokenizer) == len(tiny_model.tokenizer)
    via_auto = AutoModelForCausalLM.from_pretrained(tmp_path / "combined")
    assert isinstance(via_auto, LLMModulesForCausalLM)
    assert AutoTokenizer.from_pretrained(tmp_path / "combined").eos_token == tiny_model.tokenizer.eos_token


def test_reload_with_missing_large_model_says_how_to_point_at_it(tiny_model, tiny_pair, tmp_path):
    tiny_model.save_pretrained(tmp_path / "combined")
    config_path = tmp_path / "combined" / "config.json"
    config = json.loads(config_path.read_text())
    config["large_model_name_or_path"] = str(tmp_path / "moved-away")
    config_path.write_text(json.dumps(config))
    with pytest.raises(OSError, match="large_model_name_or_path"):
        LLMModulesForCausalLM.from_pretrained(tmp_path / "combined")
    reloaded = LLMModulesForCausalLM.from_pretrained(tmp_path / "combined", large_model_name_or_path=tiny_pair[0])
    assert reloaded.config.large_model_name_or_path == str(tiny_pair[0])


def test_weights_that_do_not_fit_the_config_name_the_tensors(tiny_model, tiny_pair, tmp_path):
    tiny_model.save_pretrained(tmp_path / "combined")
    config_path = tmp_path / "combined" / "config.json"
    config = json.loads(config_path.read_text())
    config["adapter_dim"] = 8
    config["num_cross_attention_layers"] = 1
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unexpected: bridges\.0\.layers\.1\..*wrong shape: bridges\.0\.layers\.0\.adapter"):
        LLMModulesForCausalLM.from_pretrained(tmp_path / "combined")


def test_a_plain_model_dir_is_refused(tiny_pair):
    with pytest.raises(ValueError, match="not an llm-modules model"):
        LLMModulesForCausalLM.from_pretrained(tiny_pair[0])


# ---- invariant 5: any pair; long inputs ------------------------------------------------------------------------


def test_vocabulary_and_widths_come_from_the_pair(pair_model, tiny_dirs):
    config = pair_model.config
    assert pair_model.lm_head.out_features == config.vocab_size == len(pair_model.tokenizer)
    assert pair_model.bridge.pre_proj.in_features == config.large_config.hidden_size
    assert pair_model.bridge.proj.out_features == config.small_config.hidden_size
    assert config.eos_token_id == pair_model.tokenizer.eos_token_id
    assert config.pad_token_id == pair_model.tokenizer.pad_token_id


def test_the_two_pairs_have_different_vocabularies(tiny_dirs):
    sizes = {len(AutoTokenizer.from_pretrained(tiny_dirs[name])) for name in ("qwen2", "llama")}
    assert len(sizes) == 2


def test_inputs_longer_than_the_small_position_table(tiny_pair):
    torch.manual_seed(0)
    zero = LLMModulesForCausalLM.from_large_and_small(*tiny_pair, cross_attention_heads=4).eval()
    limit = zero.config.small_config.max_position_embeddings
    ids = torch.randint(10, 300, (1, limit + 20))
    with torch.no_grad():
        short = zero(ids[:, :limit]).logits
        assert zero(ids).logits.shape[1] == limit + 20  # grows GPT-Neo's causal tables (global and local)
        assert torch.equal(zero(ids[:, :limit]).logits, short)  # ... without changing what they mask
    keep = LLMModulesForCausalLM.from_large_and_small(
        *tiny_pair, cross_attention_heads=4, small_position_embeddings="keep"
    ).eval()
    assert keep(ids[:, :limit]).logits.shape[1] == limit
    with pytest.raises(ValueError, match="small_position_embeddings='zero'"):
        keep(ids)


def test_scratch_small_model_is_built_from_its_config(tiny_pair):
    torch.manual_seed(0)
    model = LLMModulesForCausalLM.from_large_and_small(*tiny_pair, cross_attention_heads=4, small_init="scratch")
    pretrained = AutoModel.from_pretrained(tiny_pair[1])
    name = "h.0.attn.attention.q_proj.weight"
    assert not torch.equal(model.small.state_dict()[name], pretrained.state_dict()[name])

@pytest.mark.parametrize("small", ["gpt_neo", "llama"])  # ties its embeddings; unties them (head read from the file)
def test_head_init_small_starts_shared_tokens_from_the_small_models_output_embeddings(tiny_dirs, small, tmp_path):
    large = tiny_dirs["qwen2"]
    torch.manual_seed(0)
    model = LLMModulesForCausalLM.from_large_and_small(large, tiny_dirs[small], cross_attention_heads=4,
                                                       head_init="small")
    torch.manual_seed(0)
    paper = LLMModulesForCausalLM.from_large_and_small(large, tiny_dirs[small], cross_attention_heads=4)
    reference = AutoModelForCausalLM.from_pretrained(tiny_dirs[small]).get_output_embeddings().weight
    small_vocab = AutoTokenizer.from_pretrained(tiny_dirs[small]).get_vocab()
    shared = {i: small_vocab[token] for token, i in model.tokenizer.get_vocab().items() if token in small_vocab}
    assert len(shared) > 100
    rows = torch.tensor(list(shared))
    assert torch.equal(model.lm_head.weight[rows], reference[torch.tensor(list(shared.values()))])
    assert not torch.equal(paper.lm_head.weight[rows], model.lm_head.weight[rows])
    others = [i for i in range(model.config.vocab_size) if i not in shared]
    assert torch.equal(model.lm_head.weight[others], paper.lm_head.weight[others])  # the paper's random rows
    model.save_pretrained(tmp_path / "saved")
    reloaded = LLMModulesForCausalLM.from_pretrained(tmp_path / "saved")
    assert reloaded.config.head_init == "small" and torch.equal(reloaded.lm_head.weight, model.lm_head.weight)


def test_head_init_small_needs_a_pretrained_small_model(tiny_pair):
    with pytest.raises(ValueError, match="small_init='pretrained'"):
        LLMModulesConfig(head_init="small", small_init="scratch")
    with pytest.raises(ValueError, match="head_init must be"):
        LLMModulesConfig(head_init="large")


# ---- real sizes ------------------------------------------------------------------------------------------------


def test_real_size_parameter_summary(capsys):
    assert cli_main(["info", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert 1.53e9 < summary["frozen_large"] < 1.55e9  # Qwen2-1.5B without its (tied) LM head
    assert 16.3e6 < summary["bridge"] < 16.5e6
    assert summary["lm_head"] == 768 * 151936
    assert 85e6 < summary["small_model"] < 87e6  # GPT-Neo-125M blocks + positions, token embeddings excluded
    assert summary["trainable"] == summary["bridge"] + summary["small_model"] + summary["lm_head"]


def test_frozen_model_in_half_precision_trained_parts_in_fp32(tiny_pair):
    model = LLMModulesForCausalLM.from_large_and_small(
        *tiny_pair, cross_attention_heads=4, large_dtype=torch.bfloat16
    ).eval()
    assert model.large.dtype == torch.bfloat16
    assert model.bridge.pre_proj.weight.dtype == model.lm_head.weight.dtype == torch.float32
    ids = torch.randint(10, 300, (1, 5))
    assert model(ids).logits.dtype == torch.float32
    assert model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False).shape == (1, 9)
