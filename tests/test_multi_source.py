"""Several frozen sources and depth connections: the invariants of docs/design.md for N = 1, 2, 3 sources of different
architectures and widths sharing one tokenizer, with separate or concatenated bridges and with depth connections."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from llm_modules import LLMModulesConfig, LLMModulesForCausalLM
from llm_modules.cli import main as cli_main
from llm_modules.tiny_models import save_tiny_causal_lm, train_tokenizer

from conftest import CORPUS

# name -> (sources, options); widths 64, 48 and 32, all on one tokenizer.
SETUPS = {
    "1": (["qwen2"], {}),
    "2": (["qwen2", "llama"], {}),
    "3": (["qwen2", "llama", "gpt2"], {}),
    "2-concat": (["qwen2", "llama"], {"source_fusion": "concat"}),
    "1-depth": (["qwen2"], {"depth_connections": [(0, 1), (1, 0)]}),
    "2-depth": (["qwen2", "llama"], {"num_depth_connections": 1}),
}


@pytest.fixture(scope="module")
def shared_dirs(tmp_path_factory):
    """Tiny sources of three architectures and a small GPT-Neo, all with one tokenizer."""
    root = tmp_path_factory.mktemp("shared")
    tok = train_tokenizer(CORPUS, vocab_size=320)
    return {
        "qwen2": save_tiny_causal_lm(root / "qwen2", "qwen2", tok, hidden_size=64, layers=2, heads=4),
        "llama": save_tiny_causal_lm(root / "llama", "llama", tok, seed=1, hidden_size=48, layers=2, heads=4),
        "gpt2": save_tiny_causal_lm(root / "gpt2", "gpt2", tok, seed=2, hidden_size=32, layers=2, heads=4),
        "small": save_tiny_causal_lm(root / "small", "gpt_neo", tok, seed=3, hidden_size=32, layers=2, heads=4),
    }


def compose(shared_dirs, name, **extra):
    sources, options = SETUPS[name]
    torch.manual_seed(0)
    model = LLMModulesForCausalLM.from_large_and_small(
        [shared_dirs[s] for s in sources], shared_dirs["small"], cross_attention_heads=4, **options, **extra
    ).eval()
    with torch.no_grad():  # open the zero-initialised gates, so the depth connections show in every test
        for connection in model.depth:
            connection.gate.normal_()
    return model


@pytest.fixture(params=list(SETUPS), scope="module")
def model(request, shared_dirs):
    return compose(shared_dirs, request.param)


def left_padded_batch(vocab_size, pad):
    prompts = [torch.randint(10, vocab_size, (n,)) for n in (3, 7, 5)]
    ids = torch.full((3, 7), pad)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, 7 - len(prompt):] = prompt
        mask[row, 7 - len(prompt):] = 1
    return ids, mask


def test_parts_follow_the_sources(model):
    config = model.config
    assert len(model.sources) == config.num_sources
    assert len(model.bridges) == (1 if config.source_fusion == "concat" else config.num_sources)
    assert [b.pre_proj.in_features for b in model.bridges] == config.bridge_widths
    assert len(model.depth) == len(config.depth_connection_list)
    paths = config.large_model_name_or_path
    assert isinstance(paths, str) if config.num_sources == 1 else len(paths) == config.num_sources


def test_changing_a_later_token_moves_no_earlier_logit(model, one_thread):
    torch.manual_seed(1)
    ids = torch.randint(10, model.config.vocab_size, (2, 10))
    changed = ids.clone()
    changed[:, 6] = (changed[:, 6] + 7) % model.config.vocab_size
    with torch.no_grad():
        diff = (model(ids).logits[:, :6] - model(changed).logits[:, :6]).abs().max().item()
    assert diff < 1e-6


def test_cached_greedy_equals_full_recompute_on_left_padded_batch(model, one_thread):
    torch.manual_seed(2)
    ids, mask = left_padded_batch(model.config.vocab_size, model.config.pad_token_id)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                  output_logits=True, return_dict_in_generate=True)
    cached = model.generate(ids, **kwargs)
    recomputed = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, recomputed.sequences)
    assert (torch.stack(cached.logits) - torch.stack(recomputed.logits)).abs().max().item() < 1e-4
    cache = model(ids, attention_mask=mask, use_cache=True).cache
    assert all(layer.get_seq_length() == 7 for layer in cache.layers)  # every source, bridge, depth and small layer


def test_beam_search_with_cache_equals_without(model, one_thread):
    torch.manual_seed(3)
    ids = torch.randint(10, model.config.vocab_size, (1, 6))
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, num_beams=2, do_sample=False)
    assert torch.equal(model.generate(ids, **kwargs), model.generate(ids, use_cache=False, **kwargs))


@pytest.mark.parametrize("name", ["3", "2-depth"])
def test_training_step_leaves_every_source_frozen(shared_dirs, name, one_thread):
    model = compose(shared_dirs, name)
    frozen = {k: v.clone() for k, v in model.sources.state_dict().items()}
    trained = {k: v.clone() for k, v in model.trained_state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    assert not any(source.training for source in model.sources)
    ids = torch.randint(10, model.config.vocab_size, (2, 8))
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is None for p in model.sources.parameters())
    optimizer.step()
    model.eval()
    assert all(torch.equal(frozen[k], v) for k, v in model.sources.state_dict().items())
    changed = {k.split(".")[0] + "." + k.split(".")[1] for k, v in model.trained_state_dict().items()
               if not torch.equal(v, trained[k])}
    assert {f"bridges.{i}" for i in range(len(model.bridges))} <= changed
    assert {f"depth.{j}" for j in range(len(model.depth))} <= changed


@pytest.mark.parametrize("name", ["3", "2-concat", "2-depth"])
def test_save_and_reload_only_what_trains(shared_dirs, name, tmp_path, capsys, one_thread):
    model = compose(shared_dirs, name)
    ids = torch.randint(10, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path / "combined")
    with safe_open(str(tmp_path / "combined" / "model.safetensors"), "pt") as saved:
        assert not any(k.startswith("sources.") for k in saved.keys())  # noqa: SIM118 (a safetensors handle, not a dict)
    config = json.loads((tmp_path / "combined" / "config.json").read_text())
    assert config["format_version"] == 1
    assert config["large_model_name_or_path"] == [str(shared_dirs[s]) for s in SETUPS[name][0]]
    reloaded = LLMModulesForCausalLM.from_pretrained(tmp_path / "combined")
    assert reloaded.config.depth_connections == model.config.depth_connections
    assert cli_main(["info", "--model", str(tmp_path / "combined")]) == 0
    assert [line.split()[:3] for line in capsys.readouterr().out.splitlines() if line.startswith("source")] == [
        ["source", f"{i}:", source] for i, source in enumerate(SETUPS[name][0])
    ]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected)


def test_one_source_as_a_list_is_the_one_source_model(shared_dirs, one_thread):
    torch.manual_seed(0)
    alone = LLMModulesForCausalLM.from_large_and_small(shared_dirs["qwen2"], shared_dirs["small"], cross_attention_heads=4)
    torch.manual_seed(0)
    listed = LLMModulesForCausalLM.from_large_and_small([shared_dirs["qwen2"]], shared_dirs["small"], cross_attention_heads=4)
    assert listed.config.large_model_name_or_path == alone.config.large_model_name_or_path == str(shared_dirs["qwen2"])
    ids = torch.randint(10, 300, (1, 6))
    with torch.no_grad():
        assert torch.equal(listed.eval()(ids).logits, alone.eval()(ids).logits)


@pytest.mark.parametrize("options", [{"num_depth_connections": 2}, {"depth_connections": [[[1, 0]], [[0, 1]]]}])
def test_fresh_depth_connections_change_nothing(shared_dirs, options, one_thread):
    sources = [shared_dirs["qwen2"], shared_dirs["llama"]]
    torch.manual_seed(0)
    plain = LLMModulesForCausalLM.from_large_and_small(sources, shared_dirs["small"], cross_attention_heads=4).eval()
    torch.manual_seed(0)
    deep = LLMModulesForCausalLM.from_large_and_small(sources, shared_dirs["small"], cross_attention_heads=4, **options)
    missing, unexpected = deep.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("depth.") for k in missing)
    ids = torch.randint(10, 300, (2, 7))
    with torch.no_grad():
        assert torch.equal(deep.eval()(ids).logits, plain(ids).logits)


def test_depth_options_are_checked():
    small = {"model_type": "gpt_neo", "hidden_size": 32, "num_layers": 4, "num_heads": 4,
             "attention_types": [[["global"], 4]], "vocab_size": 50}
    large = {"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 6, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 50}
    config = LLMModulesConfig(large_config=large, small_config=small, cross_attention_heads=4, num_depth_connections=2)
    assert config.depth_connections == [[[2, 1], [4, 2]]]  # evenly spaced over 6 and 4 blocks
    with pytest.raises(ValueError, match="out of range"):
        LLMModulesConfig(large_config=large, small_config=small, cross_attention_heads=4, depth_connections=[(6, 0)])
    with pytest.raises(ValueError, match="not both"):
        LLMModulesConfig(large_config=large, small_config=small, cross_attention_heads=4,
                         depth_connections=[(1, 1)], num_depth_connections=1)


def test_sources_with_different_tokenizers_are_refused(shared_dirs, tiny_dirs):
    with pytest.raises(ValueError, match=r"share one tokenizer: .*qwen2 has 320 tokens, .*llama has 400"):
        LLMModulesForCausalLM.from_large_and_small([shared_dirs["qwen2"], tiny_dirs["llama"]], shared_dirs["small"])
