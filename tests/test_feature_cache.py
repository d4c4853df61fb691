"""The frozen-feature cache: same loss as running the large model, manifest checks, rebuilds, training through it."""

from __future__ import annotations

import pytest
import torch

from llm_modules import LLMModulesForCausalLM
from llm_modules.data import DataCollatorForLLMModules, prepare_datasets
from llm_modules.feature_cache import (
    FEATURES_NAME,
    MANIFEST_NAME,
    FeatureCacheDataset,
    FeatureCacheMismatch,
    FeatureRangeError,
    build_feature_cache,
    cached_datasets,
)
from llm_modules.training import TrainingOptions, train

from test_training import stratos_rows


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture()
def model(tiny_pair):
    torch.manual_seed(0)
    return LLMModulesForCausalLM.from_large_and_small(*tiny_pair, cross_attention_heads=4)


@pytest.fixture()
def dataset(model):
    return prepare_datasets(stratos_rows(12), model.tokenizer, subset=1.0, val_split=0.0)[0]


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-5), ("float16", 2e-3), ("bfloat16", 2e-2)])
def test_loss_from_the_cache_equals_the_loss_through_the_large_model(model, dataset, tmp_path, dtype, tolerance):
    cache = build_feature_cache(tmp_path / dtype, model, dataset, dtype=dtype, batch_tokens=64)
    assert cache.manifest["dtype"] == dtype and len(cache) == len(dataset)
    collate = DataCollatorForLLMModules(model.tokenizer.pad_token_id)
    batch = collate([{**dataset[i], "large_hidden_states": cache[i]} for i in range(4)])  # padded: lengths differ
    assert batch["attention_mask"].min() == 0
    model.train()  # the training path: loss only over labelled positions
    model.bridge.eval()  # no dropout, so both losses see the same network
    model.small.eval()
    from_cache = model(**batch).loss
    without = {k: v for k, v in batch.items() if k != "large_hidden_states"}
    through_large = model(**without).loss
    torch.testing.assert_close(from_cache, through_large, rtol=tolerance, atol=tolerance)
    # The cached rows are the frozen model's states, example by example.
    states = model.large_hidden_states(torch.tensor([dataset[5]["input_ids"]]))[0]
    torch.testing.assert_close(cache[5].float(), states, rtol=tolerance * 10, atol=tolerance * 10)


def test_a_matching_cache_is_reused_and_a_stale_one_rebuilt_or_refused(model, dataset, tmp_path):
    directory = tmp_path / "cache"
    build_feature_cache(directory, model, dataset)
    written = (directory / FEATURES_NAME).stat().st_mtime_ns
    build_feature_cache(directory, model, dataset)
    assert (directory / FEATURES_NAME).stat().st_mtime_ns == written  # reused, not recomputed

    other = dataset.select(range(6))
    with pytest.raises(FeatureCacheMismatch, match="dataset_fingerprint"):
        build_feature_cache(directory, model, other, on_mismatch="error")
    with pytest.raises(FeatureCacheMismatch, match="max_length"):
        build_feature_cache(directory, model, dataset, max_length=128, on_mismatch="error")
    rebuilt = build_feature_cache(directory, model, other)
    assert len(rebuilt) == 6 and rebuilt.manifest["num_examples"] == 6

    with torch.no_grad():
        model.large.get_input_embeddings().weight.mul_(2)  # another large model: its states differ
    with pytest.raises(FeatureCacheMismatch, match="large_weights"):
        build_feature_cache(directory, model, other, on_mismatch="error")


def test_states_beyond_float16s_range_are_cached_in_bfloat16_with_one_line(model, dataset, tmp_path, caplog):
    with torch.no_grad():
        model.large.norm.weight.mul_(1e5)  # a source whose hidden states exceed 65,504 (EleutherAI/elk#208)
    states = model.large_hidden_states(torch.tensor([dataset[5]["input_ids"]]))[0]
    assert states.abs().max() > 65504
    directory = tmp_path / "cache"
    with caplog.at_level("WARNING", logger="llm_modules"):
        cache = build_feature_cache(directory, model, dataset, batch_tokens=64)  # float16 by default
    assert all(torch.isfinite(cache[i]).all() for i in range(len(cache)))
    assert (cache.manifest["dtype"], cache.manifest["requested_dtype"]) == ("bfloat16", "float16")
    torch.testing.assert_close(cache[5].float(), states, rtol=1e-2, atol=1e-2 * states.abs().max().item())
    assert len(caplog.messages) == 1, caplog.messages
    assert caplog.messages[0].startswith(f"feature cache {directory}: example ")
    assert "beyond float16's largest value 65504: this cache is stored in bfloat16" in caplog.messages[0]
    written = (directory / FEATURES_NAME).stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level("WARNING", logger="llm_modules"):
        assert build_feature_cache(directory, model, dataset, on_mismatch="error").manifest["dtype"] == "bfloat16"
    assert (directory / FEATURES_NAME).stat().st_mtime_ns == written and not caplog.messages  # reused as it is
    with torch.no_grad():
        model.large.norm.weight.fill_(float("inf"))  # nothing holds that: refused, naming the example
    with pytest.raises(FeatureRangeError, match=r"feature cache .*: example \d+'s hidden states reach (inf|nan), beyond float16"):
        build_feature_cache(tmp_path / "inf", model, dataset, batch_tokens=64)


def test_an_interrupted_build_is_redone_and_foreign_dirs_are_refused(model, dataset, tmp_path):
    directory = tmp_path / "cache"
    build_feature_cache(directory, model, dataset)
    (directory / MANIFEST_NAME).unlink()  # as if killed before the manifest, written last
    cache = build_feature_cache(directory, model, dataset, on_mismatch="error")
    assert (directory / MANIFEST_NAME).is_file() and len(cache) == len(dataset)

    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FeatureCacheMismatch, match="not a feature cache"):
        build_feature_cache(foreign, model, dataset)
    assert (foreign / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("fusion", [None, "separate", "concat"])  # one source; two sources, either fusion
def test_training_from_a_float32_cache_matches_training_through_the_large_model(tiny_dirs, tmp_path, fusion):
    sources = tiny_dirs["qwen2"] if fusion is None else [tiny_dirs["qwen2"], tiny_dirs["gpt_neo"]]
    composition = {} if fusion is None else {"source_fusion": fusion}
    weights = []
    for cached in (False, True):
        torch.manual_seed(0)
        model = LLMModulesForCausalLM.from_large_and_small(sources, tiny_dirs["gpt_neo"], cross_attention_heads=4,
                                                           **composition)
        train_set, val_set, _ = prepare_datasets(stratos_rows(), model.tokenizer, subset=1.0, val_split=0.25)
        if cached:
            train_set, val_set = cached_datasets(tmp_path / "cache", model, train_set, val_set, dtype="float32")
            assert isinstance(train_set, FeatureCacheDataset) and isinstance(val_set, FeatureCacheDataset)
            widths = [source.config.hidden_size for source in model.sources]
            assert train_set[0]["large_hidden_states"].shape[-1] == sum(widths)  # the sources side by side
        options = TrainingOptions(
            output_dir=str(tmp_path / f"out-{cached}"), max_steps=3, batch_size=2, lr_bridge=3e-3, lr_small=3e-3,
            save_steps=3, report_to="none", trainer_args={"disable_tqdm": True},
        )
        trainer = train(model, model.tokenizer, train_set, val_set, options)
        weights.append((model.trained_state_dict(), trainer.model_card["eval_loss"]))
    (plain, plain_loss), (cached_weights, cached_loss) = weights
    for name in plain:
        torch.testing.assert_close(cached_weights[name], plain[name], rtol=1e-4, atol=1e-5, msg=name)
    assert cached_loss == pytest.approx(plain_loss, rel=1e-5)


def test_a_cache_refuses_depth_connections_and_the_model_refuses_states_of_the_wrong_width(tiny_dirs, tmp_path):
    sources = [tiny_dirs["qwen2"], tiny_dirs["gpt_neo"]]
    deep = LLMModulesForCausalLM.from_large_and_small(sources, tiny_dirs["gpt_neo"], cross_attention_heads=4,
                                                      num_depth_connections=1)
    rows = prepare_datasets(stratos_rows(4), deep.tokenizer, subset=1.0, val_split=0.0)[0]
    with pytest.raises(ValueError, match="depth connections"):
        build_feature_cache(tmp_path / "deep", deep, rows)
    assert not (tmp_path / "deep").exists()
    two = LLMModulesForCausalLM.from_large_and_small(sources, tiny_dirs["gpt_neo"], cross_attention_heads=4)
    with pytest.raises(ValueError, match=r"64 \+ 32 wide"):
        two(large_hidden_states=torch.zeros(1, 3, 64), attention_mask=torch.ones(1, 3, dtype=torch.long))
